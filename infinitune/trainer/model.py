"""Building the model: an HF causal LM (directory, hub id or GGUF), partitioned at creation under ZeRO-3,
optionally wrapped with LoRA, inside a module whose forward returns the summed loss of the trained tokens.

transformers, peft and DeepSpeed are imported in the functions that use them, on purpose: DeepSpeed must not be
imported before `distributed.prepare_environment` has chosen its accelerator, and the three take seconds to
import, which the launcher and tools that need only this module's helpers do not pay."""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from infinitune.data_pipeline.template import IGNORE
from infinitune.data_pipeline.tokenizer import resolve_model_source
from infinitune.trainer.config import DTYPES, AdapterConfig, ModelConfig

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXPORT_DTYPES = {name: getattr(torch, name) for name in DTYPES}

# Architectures whose logits are exactly lm_head(final hidden state): for these the output layer runs only at
# trained positions (with a 49k vocabulary it dominates a small model's step). Others take the full forward.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"})

# sdpa run on each packed document by itself (`packed_sdpa_attention`), registered with transformers under this name
# and used in place of "sdpa" where the model's layers call attention through transformers' interface.
PACKED_SDPA = "infinitune_packed_sdpa"

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

    def __init__(self, lm: nn.Module, loss_chunk_tokens: int = 0, compile_loss: bool = False, zero3: bool = False):
        super().__init__()
        self.lm = lm
        # The decoder attends within each document by itself: the micro-batch's rows go in as one row, with the
        # documents' bounds (flash attention's varlen arguments), which `packed_sdpa_attention` reads.
        self.packed = getattr(getattr(lm, "config", None), "_attn_implementation", None) == PACKED_SDPA
        self.zero3 = zero3  # the head's weight exists only inside its own forward: pieces go through the module
        # Compiled, the upcast, log-softmax and gather fuse: the loss keeps the logits as they are and one
        # log-sum-exp per position for the backward pass, instead of a float32 log-softmax as large as the logits.
        self.cross_entropy = torch.compile(cross_entropy_sum, dynamic=True) if compile_loss else cross_entropy_sum
        config = getattr(lm, "config", None)
        self.plain_head = getattr(config, "model_type", None) in PLAIN_HEAD_TYPES
        self.prefix = prefix_length(lm)
        self.orth_reg_weight = _adalora_orth_reg_weight(lm)
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        documents: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`documents`: the lengths of the packed documents, rows end to end (`document_lengths` of the position
        ids while they are on the host: read from a device, they would make the step wait on it)."""
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if self.prefix or self.plain_head:
            if self.prefix:
                hidden = prefix_decoder_forward(self.lm, input_ids, position_ids)
            elif self.packed:
                rows, length = input_ids.shape
                out = self.lm.get_decoder()(
                    input_ids=input_ids.reshape(1, -1),
                    position_ids=position_ids.reshape(1, -1),
                    use_cache=False,
                    **document_bounds(documents if documents is not None else document_lengths(position_ids.cpu())),
                )
                hidden = out.last_hidden_state.view(rows, length, -1)
            else:
                out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False)
                hidden = out.last_hidden_state
            head = self.lm.get_output_embeddings()
            if self.loss_chunk_tokens and not self.zero3 and type(head) is nn.Linear and head.bias is None:
                loss = FusedHeadLoss.apply(hidden[:, :-1][keep], head.weight, targets[keep], self.loss_chunk_tokens)
            else:
                # As many pieces as the micro-batch's positions need, whatever this rank's number of trained ones.
                chunks = math.ceil(keep.numel() / self.loss_chunk_tokens) if self.loss_chunk_tokens else 1
                loss = chunked_head_loss(head, hidden[:, :-1][keep], targets[keep], chunks, self.cross_entropy)
        else:
            out = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            loss = self.cross_entropy(out.logits[:, :-1][keep], targets[keep])
        n = keep.sum()
        if self.orth_reg_weight and self.training:
            # AdaLoRA's orthogonality regulariser, which peft adds only when the model computes the loss from
            # labels. Added once per trained token, so that after the loop's division by the global batch's
            # trained tokens it weighs orth_reg_weight, as in peft (ZeRO-0: every rank holds the same adapters).
            loss = loss + self.orth_reg_weight * adalora_orth_reg(self.lm) * n
        return loss, n


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of the documents of the micro-batch's rows laid end to end, from the host's copy of their
    position ids (read with `.numpy()`, which a device tensor refuses): a document starts at each row's start
    and wherever the position ids do not go on by one (packing restarts them at 0 for every document and for
    the padding)."""
    positions = position_ids.numpy()
    starts = np.ones(positions.shape, dtype=bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return np.diff([*np.flatnonzero(starts), positions.size]).tolist()


def document_bounds(lengths: list[int]) -> dict[str, Any]:
    """Flash attention's varlen arguments for documents of these lengths, which the decoder hands to each
    layer's attention. The offsets stay on the host (only `packed_sdpa_attention` reads them): nothing waits on
    a device."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, run on each document of one row of packed documents by itself (causal,
    no mask): the work is the sum of the documents' squared lengths, not the row's (with the block-diagonal
    mask sdpa computes every pair of positions in the row, and a mask stops the CPU's flash kernel skipping
    any). Without the documents' bounds (generation, padded batches, a prefix adapter's mask) it is sdpa as is,
    with the mask transformers built from the position ids."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    lengths = np.diff(cu_seq_lens_q.numpy()).tolist()  # host offsets (`document_bounds`)
    # Split, not sliced: the backward pass joins the pieces' gradients once, where each slice's would fill a
    # tensor of zeros as large as the row.
    outs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outs, dim=1), None


def register_packed_sdpa() -> None:
    """Make PACKED_SDPA an attention implementation transformers knows, its masks built as for sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def attention_implementation(cfg: ModelConfig, config) -> str:
    """The implementation to load with: the packed sdpa for "sdpa" where the architecture calls attention through
    transformers' interface (PLAIN_HEAD_TYPES do), without a sliding window (whose mask it would not apply), and
    its layers are not compiled (a loop over documents would recompile the graph at every micro-batch);
    otherwise the configured one."""
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if (
        cfg.attn_implementation == "sdpa"
        and not cfg.compile_layers
        and not windowed
        and config.model_type in PLAIN_HEAD_TYPES
    ):
        register_packed_sdpa()
        return PACKED_SDPA
    return cfg.attn_implementation


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class FusedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, `rows` positions at a time, each piece's
    gradients computed in the forward pass while its logits exist (the fused linear cross-entropy of Liger and
    TRL): only one piece's logits are ever held, and the output layer runs once each way, not recomputed."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for lo in range(0, hidden.shape[0], rows):
            h, t = hidden[lo : lo + rows], targets[lo : lo + rows]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            softmax = logits.sub_(lse[:, None]).exp_()  # d loss / d logits = softmax - one-hot(target)
            softmax[torch.arange(len(t), device=t.device), t] -= 1
            g = softmax.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[lo : lo + rows] = g @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # Scaled in place: the forward's gradients are used once (no double backward), and a copy of the output
        # layer's gradient would add its size to the peak.
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)) if grad_hidden is not None else None,
            grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, cross_entropy) -> torch.Tensor:
    return cross_entropy(head(hidden), targets)


def chunked_head_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunks: int, cross_entropy=cross_entropy_sum
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, in `chunks` pieces of rows: each piece's logits
    are dropped after its loss and recomputed in the backward pass, so only one piece's logits exist at a time.
    Under ZeRO-3 the head gathers its weight at each call, so every rank must call it equally often: `chunks`
    comes from the micro-batch's shape, which all ranks share, and a piece may be empty."""
    if chunks <= 1:
        return _head_loss(head, hidden, targets, cross_entropy)

    parts = [
        checkpoint(_head_loss, head, h, t, cross_entropy, use_reentrant=False)
        for h, t in zip(torch.tensor_split(hidden, chunks), torch.tensor_split(targets, chunks))
    ]
    return torch.stack(parts).sum()


def _adalora_orth_reg_weight(lm: nn.Module) -> float:
    config = getattr(lm, "active_peft_config", None)
    return float(getattr(config, "orth_reg_weight", 0.0)) if type(config).__name__ == "AdaLoraConfig" else 0.0


def adalora_orth_reg(lm: nn.Module) -> torch.Tensor:
    """Mean over AdaLoRA's A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F (peft's regulariser)."""
    name = lm.base_model.trainable_adapter_name
    norms = []
    for n, p in lm.base_model.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return torch.stack(norms).mean() if norms else torch.zeros(())


def prefix_length(lm: nn.Module) -> int:
    """The number of virtual tokens of a prefix-tuning peft model, else 0."""
    config = getattr(lm, "active_peft_config", None)
    return int(config.num_virtual_tokens) if config is not None and config.is_prompt_learning else 0


@functools.cache  # once per class: the prefix path asks at every training step
def cache_argument(cls: type) -> str:
    """What this transformers calls the KV cache argument (`cache` since 5.x, `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def prefix_decoder_forward(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states of a prefix-tuned model on packed sequences: every document sees the trained prefix
    and itself, never the documents packed beside it.

    peft's own forward hands the prefix to the model as a KV cache, and with a cache transformers does not
    derive the block-diagonal mask from restarting position ids: packed documents would attend to each other
    without any error. So the mask is built here (prefix columns open, then causal within each document), and
    positions follow the prefix as in generation."""
    n_prefix = prefix_length(lm)
    batch, length = input_ids.shape
    doc = (position_ids == 0).cumsum(-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    same_doc = (doc[:, :, None] == doc[:, None, :]) & causal
    prefix_cols = torch.ones(batch, length, n_prefix, dtype=torch.bool, device=input_ids.device)
    mask = torch.cat([prefix_cols, same_doc], -1)[:, None]
    decoder = lm.get_decoder()
    cache = lm.get_prompt(batch, max_cache_len=length + n_prefix)
    out = decoder(
        input_ids=input_ids,
        position_ids=position_ids + n_prefix,
        attention_mask=mask,
        use_cache=False,
        **{cache_argument(type(decoder)): cache},
    )
    return out.last_hidden_state


def hf_config(cfg: ModelConfig):
    """The HF config object (transformers') of the model to load, read once in setup: its sizes also shape the
    DeepSpeed config. (`launcher.job_config.model_config` is the plan's: a dict, read without transformers.)"""
    from transformers import AutoConfig

    source, gguf = resolve_model_source(cfg.path, cfg.gguf_file)
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, gguf_file=gguf)
    # With the KV cache on, transformers skips the packed-sequence detection and documents silently attend
    # across their boundaries.
    config.use_cache = False
    return config


def load_causal_lm(
    cfg: ModelConfig, dtype: torch.dtype, config=None, zero3: dict | None = None, attention: str | None = None
) -> nn.Module:
    """The HF model (with `config` from `hf_config`, or read here), built partitioned across ranks when
    `zero3` is the DeepSpeed config of a ZeRO-3 run, with `attention` (default: the configured one)."""
    global _HF_DEEPSPEED_CONFIG
    # Model classes are imported before zero.Init patches tensor creation (importing them inside it fails).
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    source, gguf = resolve_model_source(cfg.path, cfg.gguf_file)
    config = config if config is not None else hf_config(cfg)
    if zero3 is not None:
        _HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(zero3)
    else:
        load_whole()
    model = AutoModelForCausalLM.from_pretrained(
        source,
        config=config,
        dtype=dtype,
        attn_implementation=attention or cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        gguf_file=gguf,
    )
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF arrives flagged quantised though dequantised
        model.hf_quantizer.remove_quantization_config(model)
    return model


def load_whole() -> None:
    """Models built from here on are whole, not ZeRO-3 partitioned: a process that trained with ZeRO-3 and then
    loads a model (a checkpoint to consolidate, a base to evaluate) must not get placeholders."""
    global _HF_DEEPSPEED_CONFIG
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _HF_DEEPSPEED_CONFIG = None
    unset_hf_deepspeed_config()


def build_model(
    cfg: ModelConfig, config, dtype: torch.dtype, zero3: dict | None, seed: int, total_steps: int
) -> TokenLossModel:
    """The model to train: loaded (partitioned when `zero3` is the ZeRO-3 DeepSpeed config), gradient
    checkpointing and the adapter applied, wrapped for the token loss. The seed draws the adapter's
    initialisation; total_steps is AdaLoRA's budget schedule."""
    config = config if config is not None else hf_config(cfg)
    model = load_causal_lm(cfg, dtype, config, zero3, attention_implementation(cfg, config))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if zero3 is None and cfg.adapter is None and not cfg.compile_layers:
        log.info("%d MLPs keep only their gate and up projections for the backward pass", fuse_swiglu(model))
    if cfg.compile_layers:
        compile_layers(model, zero3=zero3 is not None)
    if cfg.adapter is not None:
        model = apply_adapter(model, cfg.adapter, seed, total_steps)
    # A model that computes its own logits takes the full forward, which never reads the pieces' size.
    pieces = cfg.loss_pieces(zero3 is not None)
    wrapped = TokenLossModel(model, pieces, compile_loss=cfg.compile_layers, zero3=zero3 is not None)
    if cfg.loss_chunk_tokens and not (wrapped.plain_head or wrapped.prefix):
        raise ValueError(
            f"model.loss_chunk_tokens: {type(model).__name__} computes its logits in its own forward, which "
            f"cannot be cut into pieces (supported: {', '.join(sorted(PLAIN_HEAD_TYPES))}); set it to 0"
        )
    return wrapped


class SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up), keeping only gate and up for the backward pass: autograd would also keep silu(gate)
    and the product, two more tensors of the MLP's width per layer (SmolLM2 at 1024 tokens: 2 x 30 layers x
    1024 x 1536 x 4 B = 0.38 GB), which the backward pass recomputes here with two elementwise ops."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        act = gate * sig
        grad_weight = None
        if ctx.needs_input_grad[2]:
            prod = act * up
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ prod.reshape(-1, prod.shape[-1])
            del prod
        grad_prod = grad_out @ weight
        grad_up = grad_prod * act if ctx.needs_input_grad[1] else None
        del act
        grad_gate = None
        if ctx.needs_input_grad[0]:  # silu'(g) = sig(g) (1 + g (1 - sig(g)))
            grad_gate = grad_prod.mul_(up).mul_(sig * (1 + gate * (1 - sig)))
        return grad_gate, grad_up, grad_weight


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


def fuse_swiglu(model: nn.Module) -> int:
    """Give each SwiGLU MLP (gate, up and down projections, plain Linear layers without bias, silu) the forward of
    `SwiGLUDown`; returns how many. For whole models only: under ZeRO-3 the down projection's weight exists only
    inside its own forward, and an adapter wraps the projections (both keep transformers' forward)."""
    fused = 0
    if getattr(model.config, "hidden_act", None) not in ("silu", "swish"):
        return 0
    for module in model.modules():
        projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(type(p) is nn.Linear and p.bias is None for p in projections):
            module.forward = _swiglu_forward.__get__(module)
            fused += 1
    return fused


def compile_layers(model, zero3: bool) -> None:
    """torch.compile each decoder layer's forward, one graph per layer.

    The forward is compiled rather than the module call, so module hooks run eagerly around it. Under ZeRO-3 each
    layer is also made a DeepSpeed leaf module: its parameters are gathered and released together by hooks on
    the layer alone, instead of hooks on every linear and norm inside it, each of which would break the graph
    (and fall back to eager after torch's recompile limit)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"model.compile_layers: {type(model).__name__} has no decoder `layers` to compile")
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    if zero3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list({type(layer) for layer in layers}))
        # DeepSpeed reduces a leaf module's gradients from a full backward hook on it, which torch fires before
        # the module's parameter gradients exist when none of its inputs needs a gradient: the first layer's,
        # once an adapter freezes the embeddings (the backward pass then fails).
        model.enable_input_require_grads()


# IA3 rescales the input of these (an MLP's output projection) rather than their output.
IA3_FEEDFORWARD = ["down_proj", "fc2", "w2"]


def peft_config(adapter: AdapterConfig, total_steps: int):
    """The peft config of an adapter section (total_steps: AdaLoRA's rank-budget schedule)."""
    import peft

    targets: Any = "all-linear" if adapter.target_modules == ["all-linear"] else list(adapter.target_modules)
    common = {"task_type": "CAUSAL_LM"}
    if adapter.method == "lora":
        return peft.LoraConfig(
            r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=targets, **common
        )
    if adapter.method == "adalora":
        # Ranks are pruned from init_r towards r between the first tenth and the last fifth of training.
        return peft.AdaLoraConfig(
            init_r=adapter.init_r,
            target_r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=targets,
            total_step=total_steps,
            tinit=total_steps // 10,
            tfinal=total_steps // 5,
            deltaT=1,
            **common,
        )
    if adapter.method == "ia3":
        feedforward = adapter.feedforward_modules or [
            m for m in IA3_FEEDFORWARD if targets == "all-linear" or m in targets
        ]
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    return peft.PrefixTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, **common)  # "prefix"


def apply_adapter(model: nn.Module, adapter: AdapterConfig, seed: int, total_steps: int) -> nn.Module:
    from peft import get_peft_model

    # Every rank draws the same adapter initialisation.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(model, peft_config(adapter, total_steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s adapter: %d trainable parameters", adapter.method, trainable)
    return model


class AdaLoraBudget:
    """AdaLoRA's rank budget under DeepSpeed (ZeRO stage 0): importance from the gradients before the
    optimizer step (which clears them), the pruning mask applied after it (which would otherwise undo it).
    Its importance averages and rank pattern are checkpointed with the engine (`state_dict`), by each rank."""

    per_rank = True  # tensors, saved in a file of each rank's own

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.model = lm.base_model  # peft's AdaLoraModel
        self.allocator = self.model.rankallocator
        self.config = self.model.peft_config[self.model.trainable_adapter_name]
        self.grads: dict[str, torch.Tensor] = {}

    def before_step(self, step: int) -> None:
        """Keep the step's adapter gradients: the optimizer step clears them, and peft's importance is
        |weight after the step x gradient of the step|."""
        self.grads = {
            n: p.grad.detach().clone()
            for n, p in self.model.model.named_parameters()
            if "lora_" in n and p.grad is not None
        }

    def after_step(self, step: int) -> None:
        """peft's AdaLoraModel.update_and_allocate, in its order (after the optimizer step)."""
        last = self.config.total_step - self.config.tfinal
        model = self.model.model
        if step < last:
            params = dict(model.named_parameters())
            for n, g in self.grads.items():
                params[n].grad = g
            self.allocator.update_ipt(model)
            for n in self.grads:
                params[n].grad = None
            budget, mask_now = self.allocator.budget_schedule(step)
            if mask_now:
                self.config.rank_pattern = self.allocator.mask_to_budget(model, budget)
        elif step == last:  # the final allocation
            budget, _ = self.allocator.budget_schedule(step)
            self.config.rank_pattern = self.allocator.mask_to_budget(model, budget)
            self.allocator.reset_ipt()
        elif self.config.rank_pattern:
            self.allocator.mask_using_rank_pattern(model, self.config.rank_pattern)
        self.grads = {}
        self._sync_master_weights()

    def _sync_master_weights(self) -> None:
        """Where the optimizer keeps fp32 master copies (bf16/fp16 training), mask those too, or its next step
        would restore the pruned values."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for name, p in self.model.model.named_parameters():
            if "lora_E" in name:
                master = safe_get_full_fp32_param(p)
                if master is not None:
                    safe_set_full_fp32_param(p, p.detach().float())

    def state_dict(self) -> dict[str, Any]:
        a = self.allocator
        return {
            "ipt": dict(a.ipt),
            "exp_avg_ipt": dict(a.exp_avg_ipt),
            "exp_avg_unc": dict(a.exp_avg_unc),
            "rank_pattern": {k: torch.tensor(v) for k, v in (self.config.rank_pattern or {}).items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a = self.allocator
        a.ipt, a.exp_avg_ipt, a.exp_avg_unc = dict(state["ipt"]), dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        pattern = {k: [bool(x) for x in v.tolist()] for k, v in state["rank_pattern"].items()}
        self.config.rank_pattern = pattern or None


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
