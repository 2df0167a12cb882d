"""The time of one AdamW step over SmolLM2-135M's parameter shapes (30 layers, hidden 576, MLP 1536, its
49,152-token vocabulary), fp32, with torch's default implementation (a per-parameter loop on CPU) against
`fused=True` (what the trainer asks for, on CPU too), in one process, alternating, medians.

    .venv/bin/python bench/optimizer.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, MLP, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
LAYER = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
SHAPES = [(VOCAB, HIDDEN)] + (LAYER + [(HIDDEN,), (HIDDEN,)]) * LAYERS + [(HIDDEN,)]


def optimizer(fused: bool | None) -> torch.optim.AdamW:
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
    opt.step()  # the moments are allocated at the first step
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    opts = {"default": optimizer(None), "fused": optimizer(True)}
    print(f"{sum(p.numel() for p in opts['fused'].param_groups[0]['params']) / 1e6:.1f}M parameters")
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: {med[name]:.3f} s per step (range {min(t):.3f}-{max(t):.3f})")
    print(f"fused / default: {med['fused'] / med['default']:.3f}")


if __name__ == "__main__":
    main()
