"""The race: infinitune against TRL's SFTTrainer (with and without its packing) and transformers' Trainer with
DeepSpeed ZeRO-3, on this CPU, side by side in one run.

Every contender gets the same model (a 4-layer Llama from a config with SmolLM2's 49,152-token vocabulary, and
SmolLM2-135M-Instruct), the same records (alpaca_en_demo.json less 40 held out), the same sequence length,
AdamW (betas 0.9/0.95, no weight decay, clip 1.0, constant learning rate, fp32, sdpa attention), trains only
on the answer tokens, and trains the same number of answer tokens: infinitune runs its steps first, and each
peer stops at the optimizer step that brings its trained answer tokens closest to as many. A step carries the
same records on average for everyone: packed contenders take a micro-batch of sequences of `--seq-len` tokens
(4 for the tiny Llama, 2 for SmolLM2), the unpacked ones that many sequences' worth of records (records per
packed sequence, from the prepared manifest), padded.

Each contender runs in its own process (its own peak memory and start-up time) and reports:
- trained tokens/s: answer tokens trained after the first step, over the wall time from the end of the first
  step to the end of the last (data, logging and all);
- peak memory: the training process's peak RSS up to its last step (everyone loads data in that process);
- time to the first step: from the process's launch to the end of its first optimizer step;
- final loss: the mean training loss of the last 3 steps, and the answer-token loss of the trained model on
  the 40 held-out records, computed by the same code for everyone.

Each contender runs `--repeats` times (default 3), the contenders alternating, and the table reports medians
with the range of the runs.

    python bench/peers.py [--models tiny,smollm2] [--repeats 3] [--data ../shared/data/alpaca_en_demo.json]

Needs `trl` (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELD_OUT = 40
# infinitune: the defaults (deepspeed.zero_stage auto: 0 on one worker that fits; the output layer and loss in
# fused pieces of 256 positions); infinitune_zero3: the same with ZeRO-3 partitioning (whose default is the loss
# whole); infinitune_whole: the defaults with the loss whole (model.loss_chunk_tokens 0). A contender named
# NAME@S runs with sample-order seed S (infinitune's data.seed, the peers' seed): how much the held-out loss
# moves with the order alone.
CONTENDERS = (
    "infinitune",
    "infinitune_zero3",
    "infinitune_whole",
    "trl_packed",
    "trl_unpacked",
    "hf_trainer_zero3",
)
MODELS = {
    # name: (micro batch in packed sequences, infinitune's steps, learning rate)
    "tiny": (4, 30, 1e-3),
    "smollm2": (2, 12, 5e-5),
}


# ----------------------------------------------------------------------------------------------- the parent


def prepare_model(name: str, root: Path, seq_len: int) -> Path:
    """An HF model directory every contender loads the same way."""
    from infinitune.data_pipeline.tokenizer import load_tokenizer

    out = root / name
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    if name == "tiny":
        from infinitune.testing.tiny import save_tiny_llama

        tok.save_pretrained(root / "tokenizer")
        return save_tiny_llama(
            out, root / "tokenizer", layers=4, hidden=256, heads=4, kv_heads=2, max_positions=seq_len
        )
    import torch

    from infinitune.trainer.config import ModelConfig
    from infinitune.trainer.model import load_causal_lm

    model = load_causal_lm(ModelConfig(path="HuggingFaceTB/SmolLM2-135M-Instruct"), torch.float32)  # the GGUF
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prepare_shards(model_dir: Path, train_file: Path, out: Path, seq_len: int) -> dict:
    from infinitune.data_pipeline.config import DataConfig
    from infinitune.data_pipeline.prepare import prepare
    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.typed_config import from_dict

    if not (out / "manifest.json").is_file():
        cfg = {"sources": [{"path": str(train_file)}], "seq_len": seq_len, "val_fraction": 0.0, "shards_dir": str(out)}
        prepare(from_dict(DataConfig, cfg), load_tokenizer(str(model_dir)), num_proc=1, progress=False)
    return json.loads((out / "manifest.json").read_text())


def run_child(contender: str, spec: dict, root: Path) -> dict:
    spec_file = root / f"{spec['model_name']}-{contender}.spec.json"
    result_file = spec_file.with_suffix(".result.json")
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
    env = {**os.environ, "PEERS_LAUNCH": repr(time.time()), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    log = root / f"{spec['model_name']}-{contender}.log"
    with open(log, "w") as out:
        code = subprocess.call(
            [sys.executable, __file__, "--child", contender, "--spec", str(spec_file)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        raise SystemExit(f"{contender} on {spec['model_name']} failed (exit {code}); see {log}")
    return json.loads(result_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca_en_demo.json"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="infinitune's steps (default: per model)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender, alternating (medians reported)")
    ap.add_argument("--profile", default=None, help="FIRST,LAST: torch.profiler over these steps; ops side by side")
    ap.add_argument("--workdir", default=None, help="keep models, shards and logs here (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "peers.json"))
    ap.add_argument("--merge", action="store_true", help="update the named contenders' rows in --out, keep the rest")
    args = ap.parse_args()
    for contender in args.contenders.split(","):
        if contender.split("@")[0] not in CONTENDERS:
            ap.error(f"--contenders: {contender!r} is not one of {', '.join(CONTENDERS)} (or NAME@SEED)")
    if args.child:
        child(args.child, json.loads(Path(args.spec).read_text()))
        return
    if not Path(args.data).is_file():
        raise SystemExit(f"--data {args.data}: not found (the race reads ../shared/data/alpaca_en_demo.json)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        records = json.loads(Path(args.data).read_text())
        train_file, held_out = root / "train.json", root / "held_out.json"
        train_file.write_text(json.dumps(records[:-HELD_OUT]))
        held_out.write_text(json.dumps(records[-HELD_OUT:]))
        results = {"machine": f"{os.cpu_count()} cores, CPU, fp32", "seq_len": args.seq_len, "models": {}}
        if args.merge:
            results = json.loads(Path(args.out).read_text())
        for name in args.models.split(","):
            batch, steps, lr = MODELS[name]
            model_dir = prepare_model(name, root, args.seq_len)
            manifest = prepare_shards(model_dir, train_file, root / f"shards-{name}", args.seq_len)
            totals = manifest["splits"]["train"]["totals"]
            per_sequence = totals["documents"] / totals["samples"]
            spec = {
                "model_name": name,
                "model": str(model_dir),
                "train_file": str(train_file),
                "held_out": str(held_out),
                "shards": str(root / f"shards-{name}"),
                "run_dir": str(root / f"run-{name}"),
                "seq_len": args.seq_len,
                "batch": batch,
                "unpacked_batch": max(1, round(batch * per_sequence)),
                "steps": args.steps or steps,
                "lr": lr,
                "profile": [int(s) for s in args.profile.split(",")] if args.profile else [],
            }
            rows = results["models"].get(name, {}).get("rows", {})
            if "infinitune" in rows:
                spec["budget"] = rows["infinitune"]["trained_tokens"]
            contenders = args.contenders.split(",")
            runs: dict[str, list[dict]] = {c: [] for c in contenders}
            for repeat in range(args.repeats):
                # Alternating: each repeat starts one contender later, so a slow spell of this shared machine
                # does not fall on the same contender every time. infinitune runs first once: its trained tokens
                # are the budget the peers stop at.
                order = contenders[repeat % len(contenders) :] + contenders[: repeat % len(contenders)]
                if "budget" not in spec and "infinitune" in order:
                    order.remove("infinitune")
                    order.insert(0, "infinitune")
                for contender in order:
                    runs[contender].append(run_child(contender, spec, root))
                    if contender == "infinitune":
                        spec["budget"] = runs[contender][0]["trained_tokens"]
                    print(name, contender, repeat, json.dumps(runs[contender][-1]), flush=True)
            for contender, done in runs.items():
                rows[contender] = median_row(done)
            results["models"][name] = {
                "records_per_packed_sequence": per_sequence,
                "packed_batch": batch,
                "unpacked_batch": spec["unpacked_batch"],
                "lr": lr,
                "rows": rows,
            }
    print(table(results))
    print(seeds_table(results))
    print(first_step_table(results))
    if args.profile:
        print(profile_table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


SPREAD = ("trained_tokens_per_s", "peak_rss_gb", "first_step_s", "held_out_loss")


def median_row(runs: list[dict]) -> dict:
    """The median of each figure over the runs, with the runs' range of those that noise moves."""
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    row["runs"] = len(runs)
    if runs[0].get("first_step_parts"):
        row["first_step_parts"] = {
            k: statistics.median(r["first_step_parts"][k] for r in runs) for k in runs[0]["first_step_parts"]
        }
    profiles = [r["profile"] for r in runs if r.get("profile")]
    if profiles:  # per op, the median over the runs that profiled
        ops = {op for rows in profiles for op, _, _ in rows}
        per_run = [{op: (t, n) for op, t, n in rows} for rows in profiles]
        row["profile"] = [
            [
                op,
                statistics.median(p.get(op, (0, 0))[0] for p in per_run),
                statistics.median(p.get(op, (0, 0))[1] for p in per_run),
            ]
            for op in ops
        ]
    row["range"] = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in SPREAD}
    return row


def profile_table(results: dict, top: int = 25) -> str:
    """The ops by self CPU time per step (medians over the runs), every profiled contender side by side."""
    lines = []
    for name, m in results["models"].items():
        profiled = {c: r["profile"] for c, r in m["rows"].items() if r.get("profile")}
        ms = {c: {op: t for op, t, _ in rows} for c, rows in profiled.items()}
        ops = sorted({op for t in ms.values() for op in t}, key=lambda op: -max(t.get(op, 0) for t in ms.values()))
        lines += [f"\n{name}: self CPU ms per step", "| op | " + " | ".join(ms) + " |", "|---" * (len(ms) + 1) + "|"]
        lines += [f"| `{op}` | " + " | ".join(f"{t.get(op, 0):.1f}" for t in ms.values()) + " |" for op in ops[:top]]
        lines.append("| all ops | " + " | ".join(f"{sum(t.values()):.1f}" for t in ms.values()) + " |")
    return "\n".join(lines)


def first_step_table(results: dict) -> str:
    """Where each contender's time to the first step went: its parts in order, medians over the runs."""
    lines = []
    for name, m in results["models"].items():
        for contender, r in m["rows"].items():
            if r.get("first_step_parts"):
                parts = ", ".join(f"{k} {v:.1f}" for k, v in r["first_step_parts"].items())
                lines.append(f"{name} {contender}: {parts} (s)")
    return "\n".join(lines)


def seeds_table(results: dict) -> str:
    """Each contender's held-out loss over its sample orders (NAME and NAME@S rows): mean and range."""
    lines = []
    for name, m in results["models"].items():
        by: dict[str, list[float]] = {}
        for contender, r in m["rows"].items():
            by.setdefault(contender.split("@")[0], []).append(r["held_out_loss"])
        several = {c: v for c, v in by.items() if len(v) > 1}
        if not several:
            continue
        lines += [f"\n{name}: held-out answer loss over sample orders", "| contender | orders | mean | range |"]
        lines.append("|---|---|---|---|")
        for c, v in several.items():
            lines.append(f"| {c} | {len(v)} | {statistics.mean(v):.3f} | {min(v):.3f}-{max(v):.3f} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = [
        "| model | contender | trained tokens/s | vs infinitune | peak memory (GB) | first step (s) | steps | "
        "trained tokens | final train loss | held-out answer loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str, fmt: str) -> str:
        low, high = r.get("range", {}).get(key, (None, None))
        return format(r[key], fmt) + (f" ({low:{fmt}}-{high:{fmt}})" if low is not None and low != high else "")

    for name, m in results["models"].items():
        ours = m["rows"].get("infinitune", {}).get("trained_tokens_per_s")
        for contender, r in m["rows"].items():
            ratio = f"{r['trained_tokens_per_s'] / ours:.2f}x" if ours else "-"
            lines.append(
                f"| {name} | {contender} | {cell(r, 'trained_tokens_per_s', '.0f')} | {ratio} | "
                f"{cell(r, 'peak_rss_gb', '.2f')} | {cell(r, 'first_step_s', '.1f')} | {r['steps']:.0f} | "
                f"{r['trained_tokens']:.0f} | {r['final_loss']:.3f} | {cell(r, 'held_out_loss', '.3f')} |"
            )
    return "\n".join(lines) + "\n\nMedians of each contender's runs (`runs`), the range in brackets."


# ------------------------------------------------------------------------------------------------ the children


def peak_rss_gb() -> tuple[float, float]:
    """This process's peak RSS and its largest helper process's (data workers), in GiB (Linux reports KiB)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 2**20, children_kb / 2**20


def held_out_loss(model, spec: dict) -> float:
    """Mean answer-token loss on the held-out records: the same examples and code for every contender."""
    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.trainer.evaluate import answer_losses, examples_from_records

    examples, _ = examples_from_records(spec["held_out"], load_tokenizer(spec["model"]))
    for e in examples:
        e.ids, e.labels = e.ids[: spec["seq_len"]], e.labels[: spec["seq_len"]]
    losses = answer_losses(model, examples, batch_size=4)
    return sum(s for s, _ in losses) / sum(n for _, n in losses)


def summarise(times: list[float], trained: list[int], losses: list[float], peak: tuple, spec: dict) -> dict:
    """The figures of a run from its per-step wall clock, cumulative trained tokens and losses."""
    launch = float(os.environ["PEERS_LAUNCH"])
    return {
        "steps": len(times),
        "trained_tokens": trained[-1],
        "trained_tokens_per_s": (trained[-1] - trained[0]) / (times[-1] - times[0]),
        "first_step_s": times[0] - launch,
        "peak_rss_gb": peak[0],
        # Largest child process. Not a data worker (data is loaded in-process): a short-lived child forked late,
        # whose high-water mark starts at its parent's RSS (ours under ZeRO-3 shows it); not in the table.
        "peak_rss_helper_gb": peak[1],
        "final_loss": statistics.mean(losses[-3:]),
        "loss_first_step": losses[0],
    }


def read_profile(path: Path) -> list:
    """[op, self ms per step, calls per step] from a StepProfiler's table."""
    rows = []
    for line in path.read_text().splitlines()[1:]:
        name, ms, calls = line[:60].rstrip(), *line[60:].split()
        rows.append([name, float(ms), float(calls)])
    return rows


def single_process_env() -> None:
    """What a launcher gives a world of one process (DeepSpeed initialises torch.distributed from it)."""
    from infinitune.launcher.local import free_port

    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(free_port())


def child(contender: str, spec: dict) -> None:
    import torch

    torch.manual_seed(0)
    name, _, seed = contender.partition("@")
    if name.startswith("infinitune"):
        result = run_infinitune(
            spec,
            zero_stage=3 if name == "infinitune_zero3" else "auto",
            seed=int(seed or 0),
            loss_chunk_tokens=0 if name == "infinitune_whole" else None,
        )
    else:
        result = run_hf(name, spec, int(seed or 0))
    Path(spec["result"]).write_text(json.dumps(result))


def run_infinitune(spec: dict, zero_stage: int | str, seed: int, loss_chunk_tokens: int | None = None) -> dict:
    """The real worker entry point (what `infinitune train --local` starts on each rank), world size 1."""
    import yaml

    from infinitune.launcher import worker
    from infinitune.launcher.job_config import choose_zero_stage, load_job_config
    from infinitune.trainer.loading import load_for_eval

    single_process_env()
    run_dir = Path(
        spec["run_dir"]
        + ("" if zero_stage == "auto" else f"-zero{zero_stage}")
        + (f"-seed{seed}" if seed else "")
        + (f"-pieces{loss_chunk_tokens}" if loss_chunk_tokens is not None else "")
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = {
        "name": run_dir.name,
        "model": {
            "path": spec["model"],
            "dtype": "float32",
            **({} if loss_chunk_tokens is None else {"loss_chunk_tokens": loss_chunk_tokens}),
        },
        "data": {
            "sources": [{"path": spec["train_file"]}],
            "seq_len": spec["seq_len"],
            "shards_dir": spec["shards"],
            "num_workers": 0,  # in the training process, as the peers' data loading (memory is compared)
            "seed": seed,
        },
        "train": {
            "global_batch_size": spec["batch"],
            "micro_batch_size": spec["batch"],
            "max_steps": spec["steps"],
            "lr": spec["lr"],
            "warmup_steps": 0,
            "schedule": "constant",
            "eval_every": 0,
        },
        "deepspeed": {"zero_stage": zero_stage, "precision": "fp32"},
        "checkpoint": {"every_steps": 0, "resume": "none", "keep_last": 1},
        "logging": {"tensorboard": True, "log_every": 1, "profile_steps": spec["profile"]},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    code = worker.main([str(run_dir / "config.yaml")])
    if code != 0:
        raise SystemExit(f"infinitune exited {code}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in rows if "setup/model_s" in r)
    rows = [r for r in rows if "train/loss" in r]
    parts = {k.split("/")[1][:-2]: v for k, v in setup.items() if k.startswith("setup/")}
    parts["first step"] = rows[0]["time"] - setup["time"]
    # Peak memory up to the end of the last step, as for the peers (the process's own peak, which the final
    # checkpoint save may raise, is kept beside it).
    peak = (rows[-1]["memory/host_peak_gb"], peak_rss_gb()[1])
    result = summarise(
        [r["time"] for r in rows],
        [int(r["train/trained_tokens"]) for r in rows],
        [r["train/loss"] for r in rows],
        peak,
        spec,
    )
    result["peak_rss_with_final_save_gb"] = peak_rss_gb()[0]
    result["first_step_parts"] = parts
    if spec["profile"]:
        result["profile"] = read_profile(run_dir / "profile" / "rank0.txt")[:40]
    chosen, _ = choose_zero_stage(load_job_config(run_dir / "config.yaml", ["cluster.num_workers=1"]))
    result["zero_stage"] = chosen.deepspeed.zero_stage  # what the worker ran (auto's choice)
    model, _ = load_for_eval(str(run_dir))
    result["held_out_loss"] = held_out_loss(model, spec)
    return result


def run_hf(contender: str, spec: dict, seed: int = 0) -> dict:
    """TRL's SFTTrainer or transformers' Trainer, stopped at the step closest to infinitune's trained tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback

    marks = {"imports": time.time()}
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    packed = contender == "trl_packed"
    common = {
        "output_dir": str(Path(spec["run_dir"]).with_name(f"{Path(spec['run_dir']).name}-{contender}-seed{seed}")),
        "per_device_train_batch_size": spec["batch"] if packed else spec["unpacked_batch"],
        "max_steps": 100_000,  # stopped by the token budget; the schedule is constant
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,  # the sample order (and nothing else: the model is loaded, dropout is off)
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "bf16": False,  # fp32, as everyone here (TRL's config defaults to bf16)
        "fp16": False,
    }

    class Budget(TrainerCallback):
        """Per-step wall clock, trained tokens and loss; stops once the budget is trained."""

        def __init__(self):
            self.times, self.trained, self.losses, self.peak = [], [], [], None
            self.count = 0

        def on_step_end(self, args, state, control, **kwargs):
            step_tokens = self.count - (self.trained[-1] if self.trained else 0)
            self.times.append(time.time())
            self.trained.append(self.count)
            if self.count >= spec["budget"] - step_tokens / 2:  # the step that comes closest to the budget
                control.should_training_stop = True
                self.peak = peak_rss_gb()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    budget = Budget()
    callbacks: list = [budget]
    if spec["profile"]:
        from infinitune.trainer.metrics import StepProfiler

        class Profile(TrainerCallback):
            """The same profiler over the same optimizer steps as infinitune's."""

            def __init__(self):
                self.steps = StepProfiler(spec["profile"], Path(common["output_dir"]) / "profile" / "rank0")
                self.rows = None

            def on_step_begin(self, args, state, control, **kwargs):
                self.steps.before(state.global_step + 1)

            def on_step_end(self, args, state, control, **kwargs):
                self.rows = self.steps.after(state.global_step) or self.rows

        profile = Profile()
        callbacks.append(profile)

    def counting(cls):
        class Counting(cls):
            def training_step(self, model, inputs, num_items_in_batch=None):
                budget.count += int((inputs["labels"][:, 1:] != -100).sum())
                return super().training_step(model, inputs, num_items_in_batch)

        return Counting

    if contender.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from infinitune.data_pipeline.formats import normalise

        records = json.loads(Path(spec["train_file"]).read_text())
        rows = []
        for record in records:
            messages = normalise(record, "alpaca").messages
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
        args = SFTConfig(
            **common,
            max_length=spec["seq_len"],
            packing=packed,
            packing_strategy="bfd",
            completion_only_loss=True,
            dataset_num_proc=1,
        )
        marks["data and tokenizer"] = time.time()
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        marks["model"] = time.time()
        trainer = counting(SFTTrainer)(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    else:
        from datasets import Dataset
        from transformers import DataCollatorForSeq2Seq, TrainingArguments

        from infinitune.trainer.evaluate import examples_from_records

        single_process_env()
        ds_config = {
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"},
            "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
        }
        # Created before the model, so that from_pretrained builds it partitioned (zero.Init).
        args = TrainingArguments(**common, deepspeed=ds_config)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        # The same answer-only labels infinitune trains on (its template code), one record per row, padded.
        examples, _ = examples_from_records(spec["train_file"], tokenizer)
        n = spec["seq_len"]
        rows = [
            {"input_ids": e.ids[:n], "labels": e.labels[:n], "attention_mask": [1] * len(e.ids[:n])} for e in examples
        ]
        trainer = counting(Trainer)(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=callbacks,
        )
    marks["trainer (dataset tokenised and packed)"] = time.time()
    trainer.train()
    result = summarise(budget.times, budget.trained, budget.losses, budget.peak or peak_rss_gb(), spec)
    before = float(os.environ["PEERS_LAUNCH"])
    result["first_step_parts"] = {}
    for name, t in {**marks, "first step": budget.times[0]}.items():
        result["first_step_parts"][name] = t - before
        before = t
    if spec["profile"]:
        result["profile"] = (profile.rows or [])[:40]
    model = trainer.model
    if contender == "hf_trainer_zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            result["held_out_loss"] = held_out_loss(model, spec)
    else:
        result["held_out_loss"] = held_out_loss(model, spec)
    return result


if __name__ == "__main__":
    main()
