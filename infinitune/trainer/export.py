"""Export: a checkpoint's ZeRO shards consolidated into an HF model directory that transformers and vLLM load
as it is (sharded safetensors, config, generation config, tokenizer and chat template), LoRA merged.

Nothing empty or mis-shaped is written: every tensor the architecture expects must come out of the
checkpoint with its shape, or the export stops and says which.
"""

from __future__ import annotations

import json
import logging
import os
import pickle  # for its error type only: nothing is unpickled beyond torch's weights_only
import shutil
from pathlib import Path
from typing import Any

import torch

from infinitune.trainer.checkpoint_format import COMPLETE, checkpoint_problem, read_trainer_state, step_dir, step_dirs

log = logging.getLogger(__name__)
WRAPPER_PREFIX = "lm."  # TokenLossModel holds the HF model as `lm`


class ExportError(RuntimeError):
    pass


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the newest complete one, of a run directory (fetched into
    RUN_DIR/fetched/ when the run's storage is a URI)."""
    from infinitune.trainer.storage import fetch_checkpoint, remote_run

    remote = remote_run(run_dir)
    if remote is not None:
        try:
            return fetch_checkpoint(remote, Path(run_dir) / "fetched", step)
        except FileNotFoundError as e:
            raise ExportError(str(e)) from None
    root = Path(run_dir) / "checkpoints"
    if step is not None:
        directory = step_dir(root, step)
        problem = checkpoint_problem(directory, "sha256")
        if problem:
            raise ExportError(f"{directory}: not a usable checkpoint: {problem}")
        return directory
    for _, directory in reversed(step_dirs(root)):
        problem = checkpoint_problem(directory, "sha256")
        if problem is None:
            return directory
        log.warning("skipping %s: %s", directory, problem)
    raise ExportError(f"{run_dir}: no complete checkpoint under {root}")


def consolidated_state_dict(directory: Path, zero_stage: int, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 weights from DeepSpeed's shards (every rank's), keyed as in the HF (or peft) model; with
    `trainable_only`, the checkpoint holds (and this returns) only what trained: an adapter's weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    has_zero_shards = any(directory.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_stage >= 1 or has_zero_shards:
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(directory.parent), tag=directory.name, exclude_frozen_parameters=trainable_only
        )
    else:  # ZeRO stage 0 keeps the whole module in rank 0's model-states file (DeepSpeed's own format)
        path = directory / "mp_rank_00_model_states.pt"
        try:  # plain tensors and containers only: a checkpoint from elsewhere cannot run code here
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ExportError(
                f"{path}: holds objects other than tensors and plain data; refusing to load it ({e})"
            ) from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    if not all(k.startswith(WRAPPER_PREFIX) for k in state):
        raise ExportError(f"{directory}: unexpected parameter names {list(state)[:3]}; not an infinitune checkpoint")
    return {k[len(WRAPPER_PREFIX) :]: v for k, v in state.items()}


def build_from_checkpoint(directory: Path) -> tuple[torch.nn.Module, Any]:
    """(HF model with the checkpoint's weights, an adapter merged, in fp32; tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from infinitune.trainer.model import load_whole

    load_whole()  # a whole model, even in a process that trained with ZeRO-3
    trainer_state = read_trainer_state(directory)
    hf = directory / "hf"
    if (hf / "adapter.json").exists():
        return _build_adapter_model(directory, trainer_state), AutoTokenizer.from_pretrained(hf)
    config = AutoConfig.from_pretrained(hf)
    state = consolidated_state_dict(directory, trainer_state["zero_stage"])
    from accelerate import init_empty_weights

    # Parameters on the meta device (the checkpoint's tensors are assigned in), buffers such as the rotary
    # frequencies computed for real: the model must also run, for eval.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _load_checked(model, state, directory)
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ExportError(f"{directory}: no weights for {meta[:5]}")
    return model, AutoTokenizer.from_pretrained(hf)


def _build_adapter_model(directory: Path, trainer_state: dict[str, Any]) -> torch.nn.Module:
    """The base model from its source, the checkpoint's adapter weights put in, merged into the base."""
    from peft import get_peft_model

    from infinitune.trainer.config import MERGEABLE, AdapterConfig, ModelConfig
    from infinitune.trainer.model import load_causal_lm, peft_config

    spec = json.loads((directory / "hf" / "adapter.json").read_text())
    base = spec.pop("base")
    adapter = AdapterConfig(**spec)
    total_steps = trainer_state["config"]["train"]["max_steps"]
    model = load_causal_lm(ModelConfig(path=base["path"], gguf_file=base["gguf_file"]), torch.float32)
    model = get_peft_model(model, peft_config(adapter, total_steps))
    state = consolidated_state_dict(directory, trainer_state["zero_stage"], trainable_only=True)
    expected = dict(model.named_parameters())
    wanted = {n for n, p in expected.items() if p.requires_grad}
    problems = [f"{n}: not in the model" for n in state if n not in expected]
    problems += [f"{n}: missing from the checkpoint" for n in sorted(wanted - set(state))]
    problems += [
        f"{n}: shape {tuple(t.shape)}, the model needs {tuple(expected[n].shape)}"
        for n, t in state.items()
        if n in expected and tuple(t.shape) != tuple(expected[n].shape)
    ]
    if problems:
        raise ExportError(f"{directory}: refusing to export the {adapter.method} adapter: " + "; ".join(problems[:10]))
    model.load_state_dict(state, strict=False)
    if adapter.method in MERGEABLE:
        return model.merge_and_unload()
    model.peft_config["default"].base_model_name_or_path = base["path"]  # the pointer an adapter export keeps
    model.peft_config["default"].inference_mode = True
    return model


def _load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.state_dict()
    problems = []
    for name, tensor in state.items():
        if name not in expected:
            problems.append(f"{name}: not in the model")
        elif tensor.numel() == 0:
            problems.append(f"{name}: empty tensor")
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)}")
    tied = _tied_names(model)
    missing = [n for n in expected if n not in state and n not in tied]
    problems += [f"{n}: missing from the checkpoint" for n in missing]
    if problems:
        raise ExportError(f"{directory}: refusing to export: " + "; ".join(problems[:10]))
    model.load_state_dict(state, strict=False, assign=True)


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another (an output layer tied to the embedding)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is head}


def export(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the HF directory `out` from a run's checkpoint (newest complete, or `step`)."""
    from infinitune.trainer.model import EXPORT_DTYPES

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
    tied = _tied_names(model)
    missing = [n for n in expected if n not in seen and n not in tied]
    wrong = [n for n, shape in seen.items() if expected.get(n) != shape or 0 in shape]
    if missing or wrong:
        raise ExportError(f"{out}: the written weights are incomplete (missing {missing[:5]}, wrong {wrong[:5]})")


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 128, system: str | None = None) -> str:
    """One greedy answer from an exported (or any HF, or peft adapter) model directory, through its chat
    template."""
    from infinitune.trainer.evaluate import generate as generate_answers
    from infinitune.trainer.evaluate import load_for_eval

    model, tokenizer = load_for_eval(str(model_dir))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return generate_answers(model, tokenizer, [ids], max_new_tokens)[0]
