"""Export: a checkpoint's ZeRO shards consolidated into an HF model directory that transformers and vLLM load
as it is (sharded safetensors, config, generation config, tokenizer and chat template), LoRA merged.

Nothing empty or mis-shaped is written: every tensor the architecture expects must come out of the
checkpoint with its shape, or the export stops and says which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from infinitune.trainer.checkpoint_format import COMPLETE
from infinitune.trainer.loading import ExportError, build_from_checkpoint, find_checkpoint, tied_names
from infinitune.trainer.model import EXPORT_DTYPES

log = logging.getLogger(__name__)


def export(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the HF directory `out` from a run's checkpoint (newest complete, or `step`)."""
    directory = find_checkpoint(run_dir, step)
    model, tokenizer = build_from_checkpoint(directory)
    settings = json.loads((directory / "hf" / "export.json").read_text())
    dtype = dtype or settings["dtype"]
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype}")
    model = model.to(EXPORT_DTYPES[dtype])
    adapter_only = hasattr(model, "peft_config")  # not mergeable (prefix): a peft adapter directory
    getattr(model, "get_base_model", lambda: model)().config.use_cache = True  # training had it off for packing
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ExportError(f"--out {out} exists, is not empty and is not a model directory; choose another")
    # Written beside and swapped in whole: stale weights of an earlier export must not survive next to it.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if adapter_only:
            base = model.peft_config["default"].base_model_name_or_path
            (tmp / "BASE_MODEL.txt").write_text(
                f"{base}\n\nA peft adapter (prefix tuning is not mergeable). Load it with\n"
                f"  peft.AutoPeftModelForCausalLM.from_pretrained('{out}')\nor `infinitune eval`/`generate` on "
                "this directory.\n"
            )
        tokenizer.save_pretrained(tmp)
        _generation_config(directory / "hf", tokenizer).save_pretrained(tmp)
        for f in tmp.iterdir():  # safetensors writes 0600; a serving process often runs as another user
            f.chmod(0o644)
        if not adapter_only:
            _check_written(tmp, model)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "exported %s (step %s) to %s as %s",
        directory,
        json.loads((directory / COMPLETE).read_text())["step"],
        out,
        dtype,
    )
    return out


def _generation_config(hf: Path, tokenizer: Any):
    """The base model's generation config (its end-of-turn ids, its defaults), completed from the tokenizer."""
    from transformers import GenerationConfig

    if (hf / "generation_config.json").exists():
        generation = GenerationConfig.from_pretrained(hf)
    else:
        generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, do_sample=False)
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return generation


def _check_written(out: Path, model: torch.nn.Module) -> None:
    """Read back what was written: every tensor present, non-empty, with the model's shape."""
    from safetensors import safe_open

    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    seen: dict[str, tuple[int, ...]] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                seen[name] = tuple(st.get_slice(name).get_shape())
    tied = tied_names(model)
    missing = [n for n in expected if n not in seen and n not in tied]
    wrong = [n for n, shape in seen.items() if expected.get(n) != shape or 0 in shape]
    if missing or wrong:
        raise ExportError(f"{out}: the written weights are incomplete (missing {missing[:5]}, wrong {wrong[:5]})")
