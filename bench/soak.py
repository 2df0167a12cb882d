"""Long-run stability: the tiny model trained for thousands of steps on 2 local DeepSpeed ZeRO-3 workers, with
checkpoints and evaluations along the way; rank 0's host memory, open file descriptors and threads are logged
at every step (metrics.jsonl). Reports the memory slope after warm-up (MB per 1000 steps, least squares), the
range of descriptors and threads, and how many checkpoints are left (must be checkpoint.keep_last).

    .venv/bin/python bench/soak.py [--steps 3000] [--every 100] [--eval-every 250]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def slope_mb_per_1000(steps: list[int], rss_gb: list[float]) -> float:
    n = len(steps)
    mx, my = sum(steps) / n, sum(rss_gb) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(steps, rss_gb))
    var = sum((x - mx) ** 2 for x in steps)
    return cov / var * 1000 * 1024 if var else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100, help="checkpoint interval")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps left out of the slope")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of
    from infinitune.testing.tiny import train_tiny_tokenizer
    from infinitune.trainer.checkpoint_format import step_dirs

    root = Path(tempfile.mkdtemp(prefix="soak-"))
    train_tiny_tokenizer(root / "tokenizer")
    setup = make_tiny_setup(root / "setup", root / "tokenizer", records=1500)
    config = job_config(
        setup,
        root / "runs",
        "soak",
        train={"max_steps": args.steps, "eval_every": args.eval_every, "eval_generations": 2, "max_new_tokens": 8},
        checkpoint={"every_steps": args.every, "keep_last": args.keep_last},
        logging={"log_every": 1, "tensorboard": True},
    )
    t0 = time.perf_counter()
    code = run(config)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"the soak run failed (exit {code}):\n{logs(config)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "memory/host_rss_gb" in r]
    kept = [r for r in steps if r["step"] > args.warmup * args.steps]
    result = {
        "steps": args.steps,
        "wall_s": round(wall, 1),
        "checkpoints_written": args.steps // args.every,
        "evaluations": args.steps // args.eval_every,
        "rss_first_gb": round(steps[0]["memory/host_rss_gb"], 4),
        "rss_after_warmup_gb": round(kept[0]["memory/host_rss_gb"], 4),
        "rss_last_gb": round(steps[-1]["memory/host_rss_gb"], 4),
        "rss_slope_mb_per_1000_steps": round(
            slope_mb_per_1000([r["step"] for r in kept], [r["memory/host_rss_gb"] for r in kept]), 3
        ),
        "open_fds_range": [min(r["proc/open_fds"] for r in kept), max(r["proc/open_fds"] for r in kept)],
        "threads_range": [min(r["proc/threads"] for r in kept), max(r["proc/threads"] for r in kept)],
        "checkpoints_left": [d.name for _, d in step_dirs(run_dir_of(config) / "checkpoints")],
        "keep_last": args.keep_last,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
