"""Exact match before and after a short LoRA fine-tune of SmolLM2-135M-Instruct on the synthetic tasks, on CPU,
measured with `infinitune eval` on 40 held-out tasks (the quickstart's data; the LoRA run reuses its shards).

    .venv/bin/python bench/lora_before_after.py            # ~10 minutes on 2 cores

Prints the command lines it runs and the figures; docs/benchmarks.md records them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
QS = Path("runs/quickstart")
RUN = Path("runs/quickstart-lora")
LORA = "model.adapter={method: lora, r: 16, alpha: 32, dropout: 0.0, target_modules: [all-linear]}"


def sh(*args: str) -> None:
    print("$", " ".join(a if " " not in a else repr(a) for a in args), flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True)


def main() -> None:
    t0 = time.perf_counter()
    if not (QS / "data" / "heldout.jsonl").exists():
        sh("infinitune", "generate-data", "--n", "2000", "--seed", "0", "--out", str(QS / "data" / "synth.jsonl"))
        sh("infinitune", "generate-data", "--n", "40", "--seed", "1", "--out", str(QS / "data" / "heldout.jsonl"))
    if not (QS / "shards" / "manifest.json").exists():
        sh("infinitune", "prepare", "configs/quickstart.yaml")
    heldout = str(QS / "data" / "heldout.jsonl")
    common = ["--data", heldout, "--max-new-tokens", "16"]
    sh("infinitune", "eval", "HuggingFaceTB/SmolLM2-135M-Instruct", *common, "--out", str(RUN) + "-before.json")
    t1 = time.perf_counter()
    sh("infinitune", "train", "configs/quickstart.yaml", "name=quickstart-lora", LORA, "train.lr=2e-3")
    train_s = time.perf_counter() - t1
    sh("infinitune", "eval", str(RUN), *common, "--out", str(RUN) + "-after.json")
    before = json.loads(Path(str(RUN) + "-before.json").read_text())["metrics"]
    after = json.loads(Path(str(RUN) + "-after.json").read_text())["metrics"]
    print(f"\n{'metric':<12} {'before':>8} {'after':>8}")
    for name in ("exact_match", "rouge_l", "bleu", "loss"):
        print(f"{name:<12} {before[name]:>8.3f} {after[name]:>8.3f}")
    print(f"LoRA training {train_s:.0f} s, everything {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
