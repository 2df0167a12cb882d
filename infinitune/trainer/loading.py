"""What a run produced, loaded for use outside training: a run directory's checkpoint (found, fetched from
its storage, checked), its ZeRO shards consolidated into an HF model (an adapter rebuilt on its base model and
merged), and any model that `eval`, `generate` and `export` are pointed at: an HF directory, a hub id or .gguf,
a peft adapter directory, a run directory.

transformers, peft, accelerate and DeepSpeed are imported where they are used, on purpose: the CLI imports
this module and stays fast for the commands that need none of them.
"""

from __future__ import annotations

import json
import logging
import pickle  # for its error type only: nothing is unpickled beyond torch's weights_only
from pathlib import Path
from typing import Any

import torch

from infinitune.data_pipeline.tokenizer import load_tokenizer
from infinitune.trainer.checkpoint_format import checkpoint_problem, read_trainer_state, step_dir, step_dirs
from infinitune.trainer.config import MERGEABLE, AdapterConfig, ModelConfig
from infinitune.trainer.model import load_causal_lm, load_whole, peft_config
from infinitune.trainer.storage import fetch_checkpoint, remote_run

log = logging.getLogger(__name__)
WRAPPER_PREFIX = "lm."  # TokenLossModel holds the HF model as `lm`


class ExportError(RuntimeError):
    pass


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the newest complete one, of a run directory (fetched into
    RUN_DIR/fetched/ when the run's storage is a URI)."""
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
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    load_whole()  # a whole model, even in a process that trained with ZeRO-3
    trainer_state = read_trainer_state(directory)
    hf = directory / "hf"
    if (hf / "adapter.json").exists():
        return _build_adapter_model(directory, trainer_state), AutoTokenizer.from_pretrained(hf)
    config = AutoConfig.from_pretrained(hf)
    state = consolidated_state_dict(directory, trainer_state["zero_stage"])
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

    spec = json.loads((directory / "hf" / "adapter.json").read_text())
    base = spec.pop("base")
    # AdaLoRA's schedule spans the run (checkpoints written before it was stored in adapter.json: the config)
    total_steps = spec.pop("total_steps", None) or trainer_state["config"]["train"]["max_steps"]
    adapter = AdapterConfig(**spec)
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
    tied = tied_names(model)
    missing = [n for n in expected if n not in state and n not in tied]
    problems += [f"{n}: missing from the checkpoint" for n in missing]
    if problems:
        raise ExportError(f"{directory}: refusing to export: " + "; ".join(problems[:10]))
    model.load_state_dict(state, strict=False, assign=True)


def tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another (an output layer tied to the embedding)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules() if module is head}


def is_run_dir(target: str) -> bool:
    return (Path(target) / "config.yaml").is_file() and not (Path(target) / "config.json").is_file()


def load_for_eval(target: str, step: int | None = None):
    """(model, tokenizer) from an HF directory, a hub id / .gguf, or a run directory (its newest complete
    checkpoint, or `step`, consolidated in memory: the same weights `export` writes)."""
    if is_run_dir(target):
        return build_from_checkpoint(find_checkpoint(target, step))
    adapter_config = Path(target) / "adapter_config.json"
    if adapter_config.is_file():  # a peft adapter export: its base model, then the adapter
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_causal_lm(ModelConfig(path=base), torch.float32), target)
        return model, load_tokenizer(target)
    return load_causal_lm(ModelConfig(path=target), torch.float32), load_tokenizer(target)


def load_eval_tokenizer(target: str, step: int | None = None):
    """The tokenizer `load_for_eval` would return, without loading or consolidating any weights."""
    if is_run_dir(target):
        return load_tokenizer(str(find_checkpoint(target, step) / "hf"))
    return load_tokenizer(target)
