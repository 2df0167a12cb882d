"""Building the model: an HF causal LM (directory, hub id or GGUF), partitioned at creation under ZeRO-3,
optionally wrapped with LoRA, inside a module whose forward returns the summed loss of the trained tokens."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infinitune.data_pipeline.template import IGNORE
from infinitune.data_pipeline.tokenizer import resolve_model_source
from infinitune.trainer.config import DeepSpeedConfig, ModelConfig

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architectures whose logits are exactly lm_head(final hidden state): for these the output layer runs only at
# trained positions (with a 49k vocabulary it dominates a small model's step). Others take the full forward.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"})

# transformers consults this weakly-held object to build models partitioned (zero.Init); it must outlive
# from_pretrained and is kept for the life of the worker.
_HF_DEEPSPEED_CONFIG: Any = None


class TokenLossModel(nn.Module):
    """Wraps a causal LM; forward returns (sum of cross-entropy over trained tokens, their number).

    Summing (not averaging) lets the loop normalise by the trained tokens of the whole global batch, so every
    token weighs the same whatever micro-batch or rank it landed on. Position ids restart at every packed
    document, and with no attention mask transformers builds the block-diagonal mask from them, so documents
    never attend to each other.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        config = getattr(lm, "config", None)
        self.plain_head = getattr(config, "model_type", None) in PLAIN_HEAD_TYPES

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if self.plain_head:
            hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            logits = self.lm.get_output_embeddings()(hidden.last_hidden_state[:, :-1][keep])
        else:
            out = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            logits = out.logits[:, :-1][keep]
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype, ds_config: dict | None = None) -> nn.Module:
    """The HF model, built partitioned across ranks when `ds_config` is a ZeRO-3 config."""
    global _HF_DEEPSPEED_CONFIG
    # Model classes are imported before zero.Init patches tensor creation (importing them inside it fails).
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    source, gguf = resolve_model_source(cfg.path, cfg.gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    config = AutoConfig.from_pretrained(source, **kwargs)
    # With the KV cache on, transformers skips the packed-sequence detection and documents silently attend
    # across their boundaries.
    config.use_cache = False
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        _HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=dtype, attn_implementation=cfg.attn_implementation, **kwargs
    )
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF arrives flagged quantised though dequantised
        model.hf_quantizer.remove_quantization_config(model)
    return model


def build_model(cfg: ModelConfig, ds: DeepSpeedConfig, ds_config: dict, seed: int) -> TokenLossModel:
    """The model to train: loaded, gradient checkpointing and LoRA applied, wrapped for the token loss."""
    model = load_causal_lm(cfg, PRECISION_DTYPES[ds.precision], ds_config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile_layers:
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ValueError(f"model.compile_layers: {type(model).__name__} has no decoder `layers` to compile")
        for layer in layers:
            layer.compile()
    if cfg.lora is not None:
        model = apply_lora(model, cfg, seed)
    return TokenLossModel(model)


def lora_config(cfg: ModelConfig):
    from peft import LoraConfig

    assert cfg.lora is not None
    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
    from peft import get_peft_model

    # Every rank draws the same adapter initialisation.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(model, lora_config(cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters", trainable)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, from ZeRO-3's full shapes where parameters are partitioned."""
    trainable = frozen = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen
