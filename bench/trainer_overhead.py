"""Trained tokens/s of infinitune's training loop against a plain PyTorch loop, same model, data, batch and
optimizer, one process, on this CPU; a ratio measured in one run.

The plain loop: HF model, `model(input_ids, position_ids=..., labels=...).loss`, backward, torch AdamW step,
batches prepared in memory beforehand. Ours: the real worker (`python -m infinitune.launcher.worker`, world size
1) with its data stream, DeepSpeed engine (ZeRO stage 0, then 3), metrics and all; its per-step
perf/trained_tokens_per_s from metrics.jsonl. Steps after the first few are compared by their median.

    python bench/trainer_overhead.py [--steps 30] [--data ../shared/data/alpaca_en_demo.json] [--compile]

--compile adds both stages with model.compile_layers (each decoder layer torch.compile'd).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN, MICRO, WARMUP = 512, 4, 3


def plain_loop(model_dir: str, shards: str, steps: int, threads: int) -> list[float]:
    """Trained tokens/s of each step of a plain loop."""
    import torch
    from transformers import AutoModelForCausalLM

    from infinitune.data_pipeline.stream import BatchLayout, StatefulLoader

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    loader = iter(StatefulLoader(shards, layout=BatchLayout(MICRO, 1, MICRO)))
    batches = [next(loader) for _ in range(steps)]
    rates = []
    for b in batches:
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(int((b["labels"][:, 1:] != -100).sum()) / (time.perf_counter() - t0))
    return rates


def our_loop(setup: dict, root: Path, stage: int, steps: int, compiled: bool = False) -> list[float]:
    import yaml

    from infinitune.launcher.local import run_local

    name = f"zero{stage}" + ("_compiled" if compiled else "")
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "name": name,
        "model": {"path": setup["model"], "dtype": "float32", "compile_layers": compiled},
        "data": {
            "sources": [{"path": "unused"}],
            "seq_len": SEQ_LEN,
            "shards_dir": setup["shards"],
            "num_workers": 1,
            "shuffle": True,
        },
        "train": {
            "global_batch_size": MICRO,
            "micro_batch_size": MICRO,
            "max_steps": steps,
            "lr": 1e-4,
            "warmup_steps": 0,
            "schedule": "constant",
            "eval_every": 0,
        },
        "deepspeed": {"zero_stage": stage, "precision": "fp32", "param_persistence_threshold": 0},
        "checkpoint": {"every_steps": 0, "resume": "none"},
        "logging": {"tensorboard": True},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    code = run_local(run_dir / "config.yaml", 1)
    if code:
        raise SystemExit(f"our loop failed (exit {code}); see {run_dir / 'logs'}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/trained_tokens_per_s"] for r in rows if "perf/trained_tokens_per_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca_en_demo.json"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also each stage with model.compile_layers")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "trainer_overhead.json"))
    args = ap.parse_args()

    from infinitune.data_pipeline.config import DataConfig
    from infinitune.data_pipeline.prepare import prepare
    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.testing.tiny import save_tiny_llama
    from infinitune.typed_config import from_dict

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")  # its 49,152-token vocabulary
        tok.save_pretrained(root / "tokenizer")
        model = save_tiny_llama(
            root / "model",
            root / "tokenizer",
            layers=args.layers,
            hidden=args.hidden,
            heads=4,
            kv_heads=2,
            max_positions=SEQ_LEN,
        )
        shards = str(root / "shards")
        prepare(
            from_dict(
                DataConfig,
                {
                    "sources": [{"path": args.data}],
                    "seq_len": SEQ_LEN,
                    "val_fraction": 0.0,
                    "shards_dir": shards,
                },
            ),
            tok,
            num_proc=1,
            progress=False,
        )
        setup = {"model": str(model), "shards": shards}
        plain_a = plain_loop(str(model), shards, args.steps, threads)[WARMUP:]
        ours = {f"zero{stage}": our_loop(setup, root, stage, args.steps)[WARMUP:] for stage in (0, 3)}
        if args.compile:  # the first steps compile (WARMUP skips them)
            for stage in (0, 3):
                ours[f"zero{stage}_compiled"] = our_loop(setup, root, stage, args.steps, compiled=True)[WARMUP:]
        plain_b = plain_loop(str(model), shards, args.steps, threads)[WARMUP:]  # again: the machine drifts
    plain = statistics.median(plain_a + plain_b)
    results = {
        "machine": f"{os.cpu_count()} cores",
        "model": f"Llama {args.layers} layers, hidden {args.hidden}, vocabulary {len(tok)}",
        "seq_len": SEQ_LEN,
        "micro_batch": MICRO,
        "plain_trained_tokens_per_s": plain,
        **{f"{s}_trained_tokens_per_s": statistics.median(r) for s, r in ours.items()},
        **{f"{s}_ratio": statistics.median(r) / plain for s, r in ours.items()},
    }
    print(json.dumps(results, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
