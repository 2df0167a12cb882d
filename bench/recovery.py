"""Recovery on the embedded Ray cluster: a worker is killed (SIGKILL) after step K; how long from its death to
the first new training step, and how many steps were lost (steps run again), for the tiny model.

The death time is when the fault fired (the marker file it creates, just before the SIGKILL); the first new
step is the first training step logged after it (the restarted workers begin again after the last
checkpoint). Steps lost = K - the last checkpoint's step.

    python bench/recovery.py [--kill-after 13] [--every 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after", type=int, default=13)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recovery.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from train_helpers import job_config, make_tiny_setup, run_dir_of

    from infinitune.testing.tiny import train_tiny_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_tiny_tokenizer(root / "tokenizer")
        setup = make_tiny_setup(root, root / "tokenizer")
        for i in range(args.repeat):
            config = job_config(
                setup,
                root / "runs",
                f"recovery{i}",
                train={"max_steps": args.steps, "eval_every": 0},
                checkpoint={"every_steps": args.every},
            )
            fired = root / f"fired{i}"
            env = {
                **os.environ,
                "INFINITUNE_FAULT": f"rank1:after_step:{args.kill_after}",
                "INFINITUNE_FAULT_ONCE": str(fired),
            }
            out = subprocess.run(
                [sys.executable, "-m", "infinitune.launcher.cli", "train", str(config)],
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
            death = fired.stat().st_mtime
            metrics = [json.loads(x) for x in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
            last_checkpoint = args.kill_after - args.kill_after % args.every
            # The restarted workers' first step is the one after the last checkpoint (rank 0 may still log
            # step K itself just after rank 1 died).
            first = next(
                m for m in metrics if "train/loss" in m and m["time"] > death and m["step"] == last_checkpoint + 1
            )
            rows.append(
                {
                    "seconds_to_first_new_step": first["time"] - death,
                    "first_step_after": first["step"],
                    "steps_lost": args.kill_after - last_checkpoint,
                    "steps_run_again": args.kill_after - first["step"] + 1,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "kill_after_step": args.kill_after,
        "checkpoint_every": args.every,
        "runs": rows,
        "median_seconds_to_first_new_step": statistics.median(r["seconds_to_first_new_step"] for r in rows),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
