"""Checkpoint save and load speed (GB/s) against torch.save / torch.load of the same state, and the seconds
the training loop is blocked per save; one process, on this machine, ratios from one run.

Ours is the Checkpointer the loop uses: DeepSpeed's save_checkpoint (model + optimizer state), each rank's
random state, the trainer state, then a sha256 of every file into the completeness marker; load verifies
the marker (sha256) and restores the engine. The baseline writes one torch.save file of the model's and the
optimizer's state_dict, and reads it back with torch.load(weights_only=True).

Then a background save (`checkpoint.async_save`): the seconds the loop is blocked (copying the state), the
seconds until the checkpoint is complete while the loop keeps stepping, and the step time meanwhile against
the step time with nothing being written.

    python bench/checkpoint.py [--layers 8 --hidden 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "checkpoint.json"))
    args = ap.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")

    import torch

    from infinitune.data_pipeline.stream import BatchLayout
    from infinitune.trainer import distributed
    from infinitune.trainer.checkpoint import Checkpointer
    from infinitune.trainer.config import CheckpointConfig, DeepSpeedConfig, TrainConfig
    from infinitune.trainer.ds_config import deepspeed_config
    from infinitune.trainer.model import TokenLossModel

    distributed.init_distributed()
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=args.vocab,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = TokenLossModel(LlamaForCausalLM(config))
    n_params = sum(p.numel() for p in model.parameters())
    layout = BatchLayout(2, 1, 2)
    ds_config = deepspeed_config(
        DeepSpeedConfig(zero_stage=0, precision="fp32"),
        TrainConfig(global_batch_size=2, micro_batch_size=2),
        layout,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(3, args.vocab, (2, 64))

    def step() -> float:
        t0 = time.perf_counter()
        loss, _ = engine(ids, ids.clone(), torch.arange(64).repeat(2, 1))
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0

    step()  # the optimizer now holds its state

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckbench-"))
    results: dict[str, list[float]] = {k: [] for k in ("ours_save_s", "ours_load_s", "torch_save_s", "torch_load_s")}
    sizes = {}
    try:
        for i in range(args.repeat):
            checkpointer = Checkpointer(root / "ours", 0, 1, CheckpointConfig(keep_last=1), verify="sha256")
            checkpointer.register(engine=engine)
            os.sync()  # each timed save starts with nothing else waiting to be written
            t0 = time.perf_counter()
            directory = checkpointer.save(i + 1)
            results["ours_save_s"].append(time.perf_counter() - t0)
            sizes["ours_gb"] = size_gb(directory)
            t0 = time.perf_counter()
            assert checkpointer.load(step=i + 1)  # every file's sha256 verified first
            results["ours_load_s"].append(time.perf_counter() - t0)

            path = root / "torch.pt"
            os.sync()
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
            os.sync()  # on disk, as the Checkpointer's files are (it fsyncs them)
            results["torch_save_s"].append(time.perf_counter() - t0)
            sizes["torch_gb"] = size_gb(path)
            t0 = time.perf_counter()
            state = torch.load(path, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            results["torch_load_s"].append(time.perf_counter() - t0)
            path.unlink()

        alone = [step() for _ in range(8)]
        background = Checkpointer(root / "background", 0, 1, CheckpointConfig(keep_last=1), verify="sha256")
        background.register(engine=engine)
        during: list[float] = []
        for i in range(args.repeat):
            os.sync()
            t0 = time.perf_counter()
            background.save(i + 1, background=True)
            results.setdefault("background_blocked_s", []).append(time.perf_counter() - t0)
            done = None
            while done is None:  # the loop goes on; each step boundary asks whether the save is complete
                during.append(step())
                done = background.wait(block=False)
            results.setdefault("background_complete_s", []).append(time.perf_counter() - t0)
            assert (done.directory / "COMPLETE.json").exists()
        results["step_s_alone"] = alone
        results["step_s_while_writing"] = during
        # What a background save costs the loop on top of its block: the steps it slowed, per save.
        sizes["steps_while_writing_per_save"] = len(during) / args.repeat
        sizes["slower_steps_s_per_save"] = (sum(during) - len(during) * statistics.median(alone)) / args.repeat
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    out = {
        "parameters": n_params,
        **sizes,
        **med,
        "ours_save_gb_s": sizes["ours_gb"] / med["ours_save_s"],
        "ours_load_gb_s": sizes["ours_gb"] / med["ours_load_s"],
        "torch_save_gb_s": sizes["torch_gb"] / med["torch_save_s"],
        "torch_load_gb_s": sizes["torch_gb"] / med["torch_load_s"],
        "save_ratio": (sizes["ours_gb"] / med["ours_save_s"]) / (sizes["torch_gb"] / med["torch_save_s"]),
        "load_ratio": (sizes["ours_gb"] / med["ours_load_s"]) / (sizes["torch_gb"] / med["torch_load_s"]),
        "loop_blocked_per_save_s": med["ours_save_s"],
        "background_blocked_ratio": med["background_blocked_s"] / med["ours_save_s"],
        "step_slowdown_while_writing": med["step_s_while_writing"] / med["step_s_alone"],
    }
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
