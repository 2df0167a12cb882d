"""Peak host memory and time of one training forward and backward with the loss in pieces
(`model.loss_chunk_tokens`) against all logits at once, each also with the cross-entropy compiled (what
`model.compile_layers` does to the loss), on a large vocabulary; each setting in its own process.

A Llama of 2 layers, hidden 256, with Llama 3's vocabulary of 128,256; a micro-batch of 2 x 2048 tokens, all
trained: the logits alone are 4096 x 128,256 x 4 bytes = 2.1 GB in fp32, and their softmax and gradient as much
again each. Each process runs forward and backward twice (the first compiles) and times the second.

    .venv/bin/python bench/loss_chunks.py [--settings 0 1024 0c 1024c]    # N: pieces of N (0: none); c: compiled
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one(setting: str, seq: int, vocab: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from infinitune.trainer.model import TokenLossModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=True,
        use_cache=False,
    )
    chunk, compiled = int(setting.rstrip("c")), setting.endswith("c")
    model = TokenLossModel(LlamaForCausalLM(config), chunk, compile_loss=compiled)
    ids = torch.randint(3, vocab, (2, seq))
    pos = torch.arange(seq).repeat(2, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, n = model(ids, ids.clone(), pos)
        (loss / n).backward()
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "loss_chunk_tokens": chunk,
        "compiled_loss": compiled,
        "peak_gb": peak,
        "before_gb": before,
        "seconds": seconds,
        "loss": float(loss / n),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=["0", "1024", "0c", "1024c"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one(args.one, args.seq, args.vocab)), flush=True)
        return
    rows = []
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--one", setting, "--seq", str(args.seq), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT ") :]))
    base = rows[0]
    print(
        "| loss_chunk_tokens | compiled loss | peak host memory (GB) | vs first | forward + backward (s) | vs first "
        "| loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['loss_chunk_tokens']} | {'yes' if r['compiled_loss'] else 'no'} | {r['peak_gb']:.2f} "
            f"| {r['peak_gb'] / base['peak_gb']:.2f}x | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f}x "
            f"| {r['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
