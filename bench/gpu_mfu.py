"""GPU throughput of the training step: tokens/s, MFU and peak memory of a ~1B Llama-shaped model.

The model has Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocabulary
128,256, tied embeddings; 1.24B parameters), built from a config with random weights, bf16, sdpa attention.
Batches are packed sequences of 2048 tokens (documents of 64-1024 tokens, positions restarting at each, the
first fifth of each document a prompt without loss). Each ZeRO stage runs in its own process through the
trainer's own pieces: TokenLossModel, the generated DeepSpeed config, `loop.train_step`, FlopCounter, and
for one save the Checkpointer (DeepSpeed's save plus the per-rank sha256 listing), timed as the loop is
blocked by it.

    python bench/gpu_mfu.py                     # one GPU: ZeRO 0 and 3, ~3 minutes
    python bench/gpu_mfu.py --tiny              # the same code on a CPU with a tiny model (a smoke test)
    python bench/gpu_mfu.py --save-dir /tmp/ck --async-save   # also the loop's block by a background save
    bash bench/gpu_session.sh                   # the settings not yet measured on a GPU, ~8 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)


def packed_batch(micro: int, seq_len: int, vocab: int, generator):
    import torch

    ids = torch.randint(3, vocab, (micro, seq_len), generator=generator)
    labels = ids.clone()
    positions = torch.empty_like(ids)
    for row in range(micro):
        at = 0
        while at < seq_len:
            n = min(int(torch.randint(64, 1025, (1,), generator=generator)), seq_len - at)
            positions[row, at : at + n] = torch.arange(n)
            labels[row, at : at + max(1, n // 5)] = -100  # the prompt, and the first token, carry no loss
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def one_stage(args) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    import torch

    from infinitune.data_pipeline.stream import BatchLayout
    from infinitune.trainer import distributed
    from infinitune.trainer.checkpoint import Checkpointer
    from infinitune.trainer.config import CheckpointConfig, DeepSpeedConfig, TrainConfig
    from infinitune.trainer.ds_config import deepspeed_config
    from infinitune.trainer.loop import StepSums, train_step
    from infinitune.trainer.metrics import FlopCounter, device_peak_tflops
    from infinitune.trainer.model import TokenLossModel, compile_layers

    distributed.init_distributed()
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = distributed.use_gpu()
    shape = TINY if args.tiny else LLAMA_1B
    config = LlamaConfig(**shape, use_cache=False, attn_implementation=args.attn)
    precision = "bf16" if gpu else "fp32"
    layout = BatchLayout(args.micro * args.accumulation, 1, args.micro)
    ds_config = deepspeed_config(
        DeepSpeedConfig(zero_stage=args.stage, precision=precision),
        TrainConfig(global_batch_size=layout.global_batch_size, micro_batch_size=args.micro),
        layout,
        config.hidden_size,  # the reduce bucket sized to the model, as the trainer does
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    t0 = time.perf_counter()
    if args.stage == 3:  # built partitioned, as the trainer's from_pretrained does, and initialised gathered
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers holds it weakly while building
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        with torch.device(distributed.device()):
            lm = LlamaForCausalLM(config).to(dtype)
    if args.compile:  # each decoder layer compiled on its own (fuses norms, rotary, SwiGLU), as the trainer does
        compile_layers(lm, zero3=args.stage == 3)
    model = TokenLossModel(lm, args.loss_chunk, compile_loss=args.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=gpu)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    build_s = time.perf_counter() - t0
    flops = FlopCounter(config, n_params, 0)
    peak_tflops, peak_source = device_peak_tflops(None)
    g = torch.Generator().manual_seed(0)
    batches = [
        [packed_batch(args.micro, args.seq_len, config.vocab_size, g) for _ in range(args.accumulation)]
        for _ in range(4)
    ]
    device = distributed.device()

    def step(micro):
        sums = StepSums(micro)
        if args.host_sync:  # as the loop did before: the trained-token count through the device, read back
            distributed.all_reduce(sums.trained).item()
        loss_sum, _ = train_step(engine, micro, sums, 1, device)
        if args.host_sync:
            loss_sum.item()
        return loss_sum / sums.trained

    for i in range(args.warmup):
        step(batches[i % 4])
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    total_flops = tokens = 0.0
    losses = []
    for i in range(args.steps):
        micro = batches[i % 4]
        losses.append(step(micro))  # on the device: read after the timed steps
        total_flops += sum(flops.step_flops(mb["position_ids"]) for mb in micro)
        tokens += sum(mb["input_ids"].numel() for mb in micro)
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    if args.profile and gpu:  # where a step's GPU time goes, by operator
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batches[0])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    result = {
        "zero_stage": args.stage,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "parameters": n_params,
        "seq_len": args.seq_len,
        "micro_batch": args.micro,
        "accumulation": args.accumulation,
        "attention": args.attn,
        "compiled_layers": args.compile,
        "host_sync": args.host_sync,
        "loss_chunk_tokens": args.loss_chunk,
        "steps_timed": args.steps,
        "step_s": elapsed / args.steps,
        "tokens_per_s": tokens / elapsed,
        "tflops": total_flops / elapsed / 1e12,
        "mfu": total_flops / elapsed / (peak_tflops * 1e12) if peak_tflops else 0.0,
        "peak_tflops": peak_tflops,
        "peak_source": peak_source,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0,
        "build_s": build_s,
        "loss_first_last": [losses[0], losses[-1]],
    }
    if args.save_dir:
        from infinitune.trainer.checkpoint_format import checkpoint_problem

        root = Path(args.save_dir) / f"zero{args.stage}"
        checkpointer = Checkpointer(root, 0, 1, CheckpointConfig(keep_last=1))
        checkpointer.register(engine=engine)
        t0 = time.perf_counter()
        directory = checkpointer.save(args.steps, background=args.async_save)
        result["checkpoint_blocked_s"] = time.perf_counter() - t0
        if args.async_save:  # the loop would step on meanwhile; here it only waits for the writer
            directory = checkpointer.wait().directory
            result["checkpoint_complete_s"] = time.perf_counter() - t0
        result["checkpoint_gb"] = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**30
        result["checkpoint_complete"] = checkpoint_problem(directory, "size") is None
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29511, help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test on a CPU)")
    ap.add_argument("--profile", action="store_true", help="print a GPU profile of one step")
    ap.add_argument("--host-sync", action="store_true", help="read the step's numbers back each step, as before #14")
    ap.add_argument("--compile", action="store_true", help="model.compile_layers: each decoder layer, and the loss")
    ap.add_argument("--save-dir", default=None, help="also time one checkpoint save per stage into this directory")
    ap.add_argument("--loss-chunk", type=int, default=0, help="model.loss_chunk_tokens (0: logits at once)")
    ap.add_argument("--async-save", action="store_true", help="time a background save (checkpoint.async_save)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.stage is not None:
        print("RESULT " + json.dumps(one_stage(args)), flush=True)
        return
    results = []
    for i, stage in enumerate(args.stages):
        # Each stage in its own process: DeepSpeed and transformers keep ZeRO-3 state in globals.
        cmd = [sys.executable, __file__, "--stage", str(stage), "--port", str(29511 + i), *sys.argv[1:]]
        # Beside --out when given, so that a run stopped from outside (a time limit) leaves the child's output.
        log_path = Path(args.out).with_suffix(f".stage{stage}.log") if args.out else None
        with open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            log.seek(0)
            text = log.read()
        line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
        if args.profile:
            print(text[-12000:])
        if code or line is None:
            print(text[-4000:])
            raise SystemExit(f"stage {stage} failed (exit {code})")
        results.append(json.loads(line[len("RESULT ") :]))
        r = results[-1]
        print(
            f"ZeRO-{stage}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}% "
            f"of {r['peak_tflops']:.0f} ({r['peak_source']}), peak memory {r['peak_memory_gb']:.1f} GiB"
            + (
                f", checkpoint {r['checkpoint_gb']:.1f} GiB blocked {r['checkpoint_blocked_s']:.1f} s"
                if "checkpoint_blocked_s" in r
                else ""
            ),
            flush=True,
        )
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
