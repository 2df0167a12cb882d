"""The worker entry point under torchrun or Slurm (Ray Train calls `loop.train` itself):

    torchrun --nproc_per_node 8 -m infinitune.launcher.worker RUN_DIR/config.yaml

The config is the resolved job config the launcher saved in the run directory, loaded and checked whole here
(every section and how they fit), as `infinitune train` checks it; the run directory is the config's directory
unless --run-dir says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from infinitune.launcher.cli import EXIT_USAGE
from infinitune.launcher.job_config import choose_zero_stage, load_job_config
from infinitune.launcher.local import exit_with_launcher
from infinitune.trainer.context import RunContext
from infinitune.trainer.loop import train
from infinitune.trainer.process import configure_logging, exit_now, leave_together
from infinitune.typed_config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the resolved job config (RUN_DIR/config.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's directory)")
    args = parser.parse_args(argv)
    exit_with_launcher()
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir or Path(args.config).resolve().parent)
    configure_logging(rank, run_dir / "logs" / f"rank{rank}.log")
    try:  # checked for the world it runs in: torchrun's, not the config's cluster.num_workers
        cfg = load_job_config(args.config, [f"cluster.num_workers={os.environ.get('WORLD_SIZE', '1')}"])
        # A config that `infinitune train` did not write may leave the stage to choose: each rank chooses the same.
        cfg, stage = choose_zero_stage(cfg)
    except ConfigError as e:
        logging.getLogger("infinitune").error("%s", e)
        return EXIT_USAGE
    logging.getLogger("infinitune").info("ZeRO stage %s", stage)
    try:
        code = train(cfg.trainer_spec(run_dir), RunContext())
    except Exception:
        logging.getLogger("infinitune").exception("the worker failed")  # into its log file too
        return 1
    leave_together()
    return code


if __name__ == "__main__":
    exit_now(main())
