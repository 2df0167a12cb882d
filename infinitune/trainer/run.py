"""The worker entry point under plain torchrun or Slurm (Ray Train calls `loop.train` itself):

    torchrun --nproc_per_node 2 -m infinitune.trainer.run RUN_DIR/config.yaml

The config is the resolved job config the launcher saved in the run directory; the run directory is the
config's directory unless --run-dir says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from infinitune.data_pipeline.config import DataConfig
from infinitune.trainer.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
)
from infinitune.trainer.context import RunContext
from infinitune.trainer.loop import TrainerSpec, train
from infinitune.typed_config import from_dict

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def spec_from_dict(config: dict[str, Any], run_dir: str | os.PathLike):
    """A TrainerSpec from a resolved job config: each section built by its own type."""
    sections = {name: from_dict(cls, config.get(name) or {}, name) for name, cls in SECTIONS.items()}
    return TrainerSpec(**sections, run_dir=str(run_dir), resolved_config=config)


def configure_logging(rank: int, log_file: str | os.PathLike | None = None) -> None:
    """Rank 0 logs progress, the others warnings; with `log_file`, everything also goes there."""
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("infinitune")  # ours only: Ray and DeepSpeed keep their own settings
    root.setLevel(logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the resolved job config (RUN_DIR/config.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's directory)")
    args = parser.parse_args(argv)
    configure_logging(int(os.environ.get("RANK", "0")))
    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    spec = spec_from_dict(config, args.run_dir or Path(args.config).resolve().parent)

    code = train(spec, RunContext())
    import torch.distributed as dist

    if dist.is_initialized():
        # Every rank leaves together: a rank that tears its process group down while another still sends its
        # last collective makes that one fail at exit.
        dist.barrier()
        dist.destroy_process_group()
    return code


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown once everything is written: C++ threads of the collective
    libraries, joined in static destructors, have been seen to abort a finished worker there (exit 134,
    "terminate called without an active exception"), turning a complete run into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
