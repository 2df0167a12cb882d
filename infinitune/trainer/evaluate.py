"""Evaluation during training: validation loss and perplexity, and greedy answers to held-out prompts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from infinitune.data_pipeline.shards import Manifest, iter_shard, join_url
from infinitune.data_pipeline.stream import StatefulLoader
from infinitune.data_pipeline.template import IGNORE
from infinitune.trainer import distributed


def validation_loss(engine, loader: StatefulLoader) -> tuple[float, int]:
    """(mean loss per trained token over the whole split, trained tokens), the same on every rank."""
    engine.eval()
    total, tokens = 0.0, 0
    device = distributed.device()
    with torch.no_grad():
        for mb in loader:
            loss, n = engine(mb["input_ids"].to(device), mb["labels"].to(device), mb["position_ids"].to(device))
            total += float(loss)
            tokens += int(n)
    engine.train()
    total_t, tokens_t = distributed.all_reduce(total), distributed.all_reduce(tokens)
    return float(total_t / max(tokens_t.item(), 1)), int(tokens_t.item())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@dataclass
class Prompt:
    prompt_ids: list[int]  # the document up to its first answer (template's generation prompt included)
    reference_ids: list[int]  # the first answer's trained tokens (end-of-turn included)


def held_out_prompts(base: str, manifest: Manifest, n: int) -> list[Prompt]:
    """The first `n` validation documents, cut at their first answer."""
    prompts: list[Prompt] = []
    for shard in manifest.splits.get("val").shards if "val" in manifest.splits else []:
        for _, sample in iter_shard(join_url(base, shard.name), count=shard.samples):
            ids, labels, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
            starts = [*np.flatnonzero(pos == 0).tolist(), len(ids)]
            for a, b in zip(starts, starts[1:]):
                trained = np.flatnonzero(labels[a:b] != IGNORE)
                if len(trained) == 0:
                    continue  # padding
                first = int(trained[0])
                end = first
                while end < b - a and labels[a + end] != IGNORE:
                    end += 1
                prompts.append(Prompt(ids[a : a + first].tolist(), ids[a + first : a + end].tolist()))
                if len(prompts) >= n:
                    return prompts
    return prompts


def generate_answers(lm, tokenizer, prompts: list[Prompt], max_new_tokens: int, synced: bool) -> list[dict]:
    """Greedy answers. Under ZeRO-3 every rank must join every forward pass (`synced`), so all ranks answer
    the same prompts, one at a time (no padding to get wrong)."""
    rows = []
    device = distributed.device()
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.prompt_ids], device=device)
            out = lm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                synced_gpus=synced,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answer = tokenizer.decode(out[0, len(p.prompt_ids) :], skip_special_tokens=True).strip()
            reference = tokenizer.decode(p.reference_ids, skip_special_tokens=True).strip()
            rows.append(
                {
                    "prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=False),
                    "answer": answer,
                    "reference": reference,
                    "exact_match": answer == reference,
                }
            )
    lm.train(was_training)
    return rows


def as_markdown(rows: list[dict]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | answer | reference | exact |", "|---|---|---|---|"]
    for r in rows:
        prompt = r["prompt"][-300:]
        lines.append(f"| {cell(prompt)} | {cell(r['answer'])} | {cell(r['reference'])} | {r['exact_match']} |")
    return "\n".join(lines)


def load_for_eval(target: str):
    """(model, tokenizer) from an HF directory, a hub id / .gguf, or a run directory (its newest checkpoint,
    consolidated in memory)."""
    from pathlib import Path

    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.trainer.config import ModelConfig
    from infinitune.trainer.model import load_causal_lm

    if (Path(target) / "checkpoints").is_dir() or (Path(target) / "config.yaml").is_file():
        from infinitune.trainer.export import build_from_checkpoint, find_checkpoint

        return build_from_checkpoint(find_checkpoint(target))
    return load_causal_lm(ModelConfig(path=target), torch.float32), load_tokenizer(target)


def exact_match_on_records(model, tokenizer, records: list[dict], max_new_tokens: int = 32, batch_size: int = 8):
    """Greedy answers to records' conversations (without their last answer) through the chat template, in
    left-padded batches; returns (fraction exactly matching the reference answer, rows)."""
    from infinitune.data_pipeline.formats import detect_format, normalise

    fmt = detect_format(records)
    if fmt is None:
        raise ValueError("cannot tell the records' format (alpaca, sharegpt or messages)")
    convs = [normalise(r, fmt).messages for r in records]
    prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False) for c in convs]
    tokenizer.padding_side = "left"
    model.eval()
    rows = []
    with torch.no_grad():
        for lo in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[lo : lo + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,  # the model is loaded with it off (training packs documents)
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for conv, seq in zip(convs[lo : lo + batch_size], out[:, enc["input_ids"].shape[1] :]):
                answer = tokenizer.decode(seq, skip_special_tokens=True).strip()
                reference = conv[-1]["content"].strip()
                rows.append(
                    {
                        "prompt": conv[-2]["content"],
                        "answer": answer,
                        "reference": reference,
                        "exact_match": answer == reference,
                    }
                )
    return sum(r["exact_match"] for r in rows) / max(len(rows), 1), rows
