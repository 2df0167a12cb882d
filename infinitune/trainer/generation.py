"""Generation: answers to token-id prompts in left-padded batches, stopping at the model's end of turn, greedy
or sampled (seeded per batch), every rank in step under ZeRO-3; prefix-tuned models decoded here, since peft's
generate() no longer feeds their prefix. Evaluation (during training and `infinitune eval`) and `infinitune
generate` use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinitune.trainer import distributed
from infinitune.trainer.loading import load_for_eval
from infinitune.trainer.model import cache_argument, prefix_length


def end_of_turn_ids(lm, tokenizer) -> list[int]:
    """Where an answer ends: the model's generation-config end ids (its end-of-turn token) and the tokenizer's."""
    ids: list[int] = []
    config_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    for tid in [*(config_eos if isinstance(config_eos, list) else [config_eos]), tokenizer.eos_token_id]:
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


@dataclass
class Sampling:
    """Sampled instead of greedy generation; seeded per batch, so answers do not depend on the worker count."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def generate(
    lm,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    synced: bool = False,
    sampling: Sampling | None = None,
    first_index: int = 0,
    progress=None,
) -> list[str]:
    """Answers to token-id prompts, in left-padded batches, stopping at the end of the turn.

    Under ZeRO-3 on several ranks every rank must join every forward pass (`synced`): all ranks then answer
    the same prompts. `first_index` is the global index of prompts[0], for seeding sampled batches.
    """
    device = distributed.device()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_ids(lm, tokenizer)[0]
    eos = end_of_turn_ids(lm, tokenizer)
    was_training = lm.training
    lm.eval()
    answers: list[str] = []
    # Compiled layers (model.compile_layers) run eagerly here: decoding changes shapes and the cache every token.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for lo in range(0, len(prompts), batch_size):
            batch = prompts[lo : lo + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            options: dict[str, Any] = {"do_sample": False}
            if sampling is not None:
                torch.manual_seed(sampling.seed + first_index + lo)
                options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if prefix_length(lm):
                new = _generate_with_prefix(lm, ids, mask, max_new_tokens, eos, pad, sampling, synced)
                answers += [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in new]
                if progress is not None:
                    progress.update(len(batch))
                continue
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                use_cache=True,  # the model was built with it off (training packs documents)
                synced_gpus=synced,
                pad_token_id=pad,
                eos_token_id=eos,
                **options,
            )
            for seq in out[:, width:]:
                answers.append(tokenizer.decode(seq, skip_special_tokens=True).strip())
            if progress is not None:
                progress.update(len(batch))
    lm.train(was_training)
    return answers


def _next_token(logits: torch.Tensor, sampling: Sampling | None) -> torch.Tensor:
    if sampling is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, -1)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(-1, descending=True)
        outside = ordered.cumsum(-1) - ordered > sampling.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1)[:, 0]


def _generate_with_prefix(lm, ids, mask, max_new_tokens, eos, pad, sampling, synced) -> torch.Tensor:
    """Decoding for a prefix-tuned model, which peft's generate() no longer feeds its prefix under transformers
    5: the trained prefix is the KV cache the prompt starts from; positions follow it (as in training)."""
    base = lm.get_base_model()
    n_prefix = prefix_length(lm)
    batch = ids.shape[0]
    attention = torch.cat([torch.ones(batch, n_prefix, dtype=mask.dtype, device=mask.device), mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + n_prefix
    cache_arg = cache_argument(type(base))
    out = base(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **{cache_arg: lm.get_prompt(batch)},
    )
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        nxt = _next_token(out.logits[:, -1], sampling)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
        finished = bool(done.all())
        if synced:  # every rank takes part in every forward pass, until all are done
            finished = bool(distributed.all_reduce(0 if finished else 1, op="max").item() == 0)
        if finished:
            break
        attention = torch.cat([attention, torch.ones_like(nxt)[:, None]], 1)
        positions = positions[:, -1:] + 1
        out = base(
            input_ids=nxt[:, None],
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: getattr(out, cache_arg)},
        )
    return torch.stack(tokens, 1)


def reply(model_dir: str | Path, prompt: str, max_new_tokens: int = 128, system: str | None = None) -> str:
    """One greedy answer from an exported (or any HF, or peft adapter) model directory, through its chat
    template."""
    model, tokenizer = load_for_eval(str(model_dir))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return generate(model, tokenizer, [ids], max_new_tokens)[0]
