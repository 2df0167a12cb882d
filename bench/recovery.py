"""Recovery, for the tiny model: how long from a loss to the first new training step, and how many steps were
run again.

Default: on the embedded Ray cluster, a worker is killed (SIGKILL) after step K. The death time is when the
fault fired (the marker file it creates, just before the SIGKILL); the first new step is the first training
step logged after it (the restarted workers begin again after the last checkpoint). Steps lost = K - the last
checkpoint's step.

--hosts (root): on hosts made of network namespaces (infinitune/testing/hosts.py), the host running rank 1 is
lost after step K (every process on it killed), once with a spare host waiting (2 workers continue on the spare)
and once without (num_workers [1, 2]: the job continues on 1 worker). Ray's failure detection as configured
(--fast-detection: the tests' settings; default: Ray's own).

    python bench/recovery.py [--kill-after 13] [--every 5] [--repeat 2]
    python bench/recovery.py --hosts [--fast-detection]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after", type=int, default=13)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recovery.json"))
    ap.add_argument("--hosts", action="store_true", help="a lost host on namespaced hosts, with and without a spare")
    ap.add_argument("--fast-detection", action="store_true", help="with --hosts: the tests' Ray health checks")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.hosts:
        return lost_host(args)
    from infinitune.testing.jobs import job_config, make_tiny_setup, run_dir_of
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


def lost_host(args) -> None:
    import time

    from infinitune.testing.host_jobs import FAILURE_DETECTION, fault_job, host_of_rank, start_driver
    from infinitune.testing.hosts import Hosts
    from infinitune.testing.jobs import make_tiny_setup, run_dir_of, wait_for_step
    from infinitune.testing.tiny import train_tiny_tokenizer

    rows = []
    for spare in (True, False):
        with Hosts(4 if spare else 3) as hosts:
            hosts.start_s3(hosts[0])
            hosts.start_ray_cluster({**hosts.s3_env, **(FAILURE_DETECTION if args.fast_detection else {})})
            train_tiny_tokenizer(hosts.shared / "tokenizer")
            setup = make_tiny_setup(hosts.shared / "setup", hosts.shared / "tokenizer")
            cluster = None if spare else {"num_workers": [1, 2], "worker_start_timeout_s": 15}
            config = fault_job(hosts, setup, "spare" if spare else "no-spare", cluster)
            driver, log = start_driver(hosts, config)
            try:
                wait_for_step(config, args.kill_after, timeout=300)
            except TimeoutError:
                raise SystemExit(log.read_text()[-5000:]) from None
            victim = host_of_rank(hosts, config, 1)
            lost = time.time()
            victim.kill()
            driver.wait(timeout=900)
            if driver.returncode:
                raise SystemExit(log.read_text()[-5000:])
            metrics = [json.loads(x) for x in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
            after = [m for m in metrics if "train/loss" in m and m["time"] > lost]
            last_step = max(m["step"] for m in metrics if "train/loss" in m and m["time"] <= lost)
            # The first step of the restarted workers: the first logged after the loss that is not a step the
            # old group was still finishing (it restarts after the last checkpoint, at or before last_step).
            first = next(m for m in after if m["step"] <= last_step)
            workers = [m["cluster/workers"] for m in metrics if "cluster/workers" in m]
            rows.append(
                {
                    "spare": spare,
                    "seconds_to_first_new_step": round(first["time"] - lost, 1),
                    "lost_after_step": last_step,
                    "first_new_step": first["step"],
                    "workers": workers,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {"fast_detection": args.fast_detection, "checkpoint_every": 5, "runs": rows}
    print(json.dumps(result, indent=1))
    out = Path(args.out).with_name("recovery_hosts" + ("_fast" if args.fast_detection else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
