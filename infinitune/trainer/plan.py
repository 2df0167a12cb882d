"""What a job needs on each GPU, and sends each step, before anything is allocated: from the model's config.json
(no weights), the ZeRO stage, precision, offload, micro-batch, sequence length and world size.

Model states follow DeepSpeed's own accounting (`estimate_zero2/3_model_states_mem_needs`): per trained
parameter 2 bytes of 16-bit weights, 4 of fp32 gradients (ZeRO-2 also keeps the 16-bit ones), 4 of fp32 master
weights and 8 of Adam's moments, divided by the world size where the stage partitions them. Activations are
counted tensor by tensor for a Llama-style decoder layer, the method of Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), with fused attention (no score matrix kept). The
formulas and their sources are in docs/scaling.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

GB = 1e9
# Device memory (GB) and dense 16-bit peak TFLOP/s of the GPUs a plan can be made for.
GPUS: dict[str, tuple[float, float]] = {
    "H100": (80.0, 989.4),
    "H200": (141.0, 989.4),
    "B200": (180.0, 2250.0),
    "A100-80GB": (80.0, 312.0),
    "A100-40GB": (40.0, 312.0),
    "L40S": (48.0, 362.1),
    "L4": (24.0, 121.0),
    "A10G": (24.0, 70.0),
    "MI300X": (192.0, 1307.4),
}
DEEPSPEED_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size's default, in elements
DEEPSPEED_STAGE12_BUCKET = 500_000_000  # reduce_bucket_size / allgather_bucket_size defaults at stages 1-2, and
# the elements stage 0 flattens into one buffer per all-reduce
CHECKPOINT_SHARD_BYTES = 5e9  # transformers' default max_shard_size
# What a process holds besides the model: the CUDA context, kernels, the allocator's fragmentation.
RUNTIME_RESERVE_GB = 2.0


def zero3_reduce_bucket(hidden: int) -> int:
    """ZeRO-3's gradient reduce bucket sized to the model, as the trainer sets it: hidden² elements
    (transformers' "auto"), at least 16M, at most DeepSpeed's default 5e8. Every rank allocates the bucket whole
    (2 GB at DeepSpeed's default in fp32), which for a small model is more than its gradients."""
    return min(DEEPSPEED_STAGE12_BUCKET, max(hidden * hidden, 1 << 24))


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, as its config.json gives them."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        config = config.get("text_config", config)
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return cls(
            hidden=hidden,
            intermediate=int(config.get("intermediate_size") or 4 * hidden),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        attention = self.hidden * q * 2 + self.hidden * self.kv_dim * 2
        bias = q + 2 * self.kv_dim if self.qkv_bias else 0
        return attention + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    @property
    def largest_layer(self) -> int:
        """The most parameters one module gathers at once under ZeRO-3 (a decoder layer or the embedding)."""
        return max(self.layer_params, self.vocab * self.hidden)

    def lora_params(self, r: int) -> int:
        """Trainable parameters of LoRA rank r on every linear layer of the decoder."""
        q_out = self.heads * self.head_dim
        pairs = [
            (self.hidden, q_out),
            (self.hidden, self.kv_dim),
            (self.hidden, self.kv_dim),
            (q_out, self.hidden),
            (self.hidden, self.intermediate),
            (self.hidden, self.intermediate),
            (self.intermediate, self.hidden),
        ]
        return self.layers * sum(r * (a + b) for a, b in pairs)


# config.json values of common models (public architecture numbers, no weights), for planning without the hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    name: dict(
        zip(
            ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "head_dim", "tie_word_embeddings", "model_type", "max_position_embeddings"),
            values,
        )
    )
    for name, values in {
        "meta-llama/Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256, 64, True, "llama", 131072),
        "meta-llama/Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128256, 128, True, "llama", 131072),
        "meta-llama/Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256, 128, False, "llama", 131072),
        "meta-llama/Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256, 128, False, "llama", 131072),
        "Qwen/Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, 128, False, "qwen2", 32768),
        "mistralai/Mistral-7B-v0.3": (4096, 14336, 32, 32, 8, 32768, 128, False, "mistral", 32768),
    }.items()
}  # fmt: skip


def known_config(name: str) -> dict[str, Any] | None:
    """The architecture of a common hub model (its -Instruct variant shares it), or None."""
    base = name.removesuffix("-Instruct")
    return KNOWN_CONFIGS.get(base)


@dataclass
class Item:
    name: str
    bytes: float
    where: str  # "device" or "host"
    how: str  # the formula, in words


@dataclass
class Plan:
    """Per GPU: memory items; per step: traffic, its time, and the bounds on speed."""

    items: list[Item]
    settings: dict[str, Any]
    step: dict[str, float] = field(default_factory=dict)
    device_memory_gb: float = 0.0

    def total(self, where: str = "device") -> float:
        return sum(i.bytes for i in self.items if i.where == where)

    @property
    def fits(self) -> bool:
        return self.total() / GB <= self.device_memory_gb

    @property
    def largest(self) -> Item:
        return max((i for i in self.items if i.where == "device"), key=lambda i: i.bytes)

    def to_json(self) -> str:
        data = {
            **asdict(self),
            "device_total_gb": self.total() / GB,
            "host_total_gb": self.total("host") / GB,
            "fits": self.fits,
        }
        return json.dumps(data, indent=1)

    def table(self) -> str:
        s = self.settings
        lines = [
            f"{s['model']}: {s['params'] / 1e9:.3f} B parameters ({s['trainable'] / 1e9:.3f} B trained), "
            f"ZeRO-{s['zero_stage']}, "
            f"{s['precision']}, {s['world']} GPUs ({s['gpu']}, {self.device_memory_gb:.0f} GB), micro-batch "
            f"{s['micro_batch']} x {s['seq_len']} tokens, {s['accumulation']} micro-batches per step",
            "",
            f"{'per GPU':<34} {'GB':>9}  where   how",
        ]
        for item in self.items:
            lines.append(f"{item.name:<34} {item.bytes / GB:>9.2f}  {item.where:<6}  {item.how}")
        verdict = "fits" if self.fits else f"DOES NOT FIT (largest: {self.largest.name})"
        lines += [
            f"{'total on the device':<34} {self.total() / GB:>9.2f}  of {self.device_memory_gb:.0f} GB: {verdict}",
            f"{'total on the host':<34} {self.total('host') / GB:>9.2f}",
            "",
            "per step and rank:",
            f"  sent (ZeRO collectives)          {self.step['bytes_sent'] / GB:9.2f} GB, "
            f"{self.step['comm_s']:.3f} s at {s['interconnect_gbps']:g} Gb/s",
            f"  compute at the device's peak     {self.step['compute_s']:9.3f} s ({self.step['flops'] / 1e12:.1f} TFLOP)",
            f"  upper bound                      {self.step['tokens_per_s']:9,.0f} tokens/s per GPU, "
            f"MFU {100 * self.step['mfu_bound']:.0f}% (traffic overlapped with compute)",
        ]
        return "\n".join(lines)


def make_plan(
    shape: ModelShape,
    *,
    world: int,
    zero_stage: int,
    precision: str,
    micro_batch: int,
    seq_len: int,
    accumulation: int = 1,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    gradient_checkpointing: bool = False,
    loss_chunk_tokens: int = 0,
    lora_r: int | None = None,
    persistence_threshold: int = 100_000,
    gpu: str = "H100",
    device_memory_gb: float | None = None,
    interconnect_gbps: float = 400.0,
    model_name: str = "model",
) -> Plan:
    """The plan of one job (see the module's docstring)."""
    memory, peak = GPUS.get(gpu, (0.0, 0.0))
    memory = device_memory_gb or memory
    trained = shape.lora_params(lora_r) if lora_r else shape.params
    total = shape.params + trained if lora_r else shape.params  # an adapter's weights come on top of the base's
    w = world
    half = precision in ("bf16", "fp16")
    p = 2 if half else 4  # bytes of a weight, a gradient in flight, an activation
    split_weights = w if zero_stage == 3 else 1
    split_states = w if zero_stage >= 1 else 1
    opt_where = "host" if offload_optimizer != "none" else "device"

    items = [
        Item(
            "parameters",
            p * total / split_weights,
            "host" if offload_params != "none" else "device",
            f"{p} B x {total / 1e9:.2f} B params" + (f" / {w} GPUs" if split_weights > 1 else ""),
        )
    ]
    if zero_stage == 3:
        grads, how = 4 * trained / w, f"fp32, 4 B x trained / {w}"
    elif zero_stage == 2:
        grads, how = (p + 4) * trained / w if half else 4 * trained / w, f"{'16-bit + fp32' if half else 'fp32'} / {w}"
    elif zero_stage == 1:
        grads, how = p * trained + (4 * trained / w if half else 0), "whole, + an fp32 partition"
    else:
        grads, how = p * trained + (4 * trained if half else 0), "whole" + (", + fp32 copies" if half else "")
    items.append(Item("gradients", grads, "device", how))
    if half or zero_stage >= 1:  # ZeRO 1-3 keep an fp32 copy of their partition even when training in fp32
        items.append(
            Item("master weights (fp32)", 4 * trained / split_states, opt_where, f"4 B x trained / {split_states}")
        )
    items.append(
        Item("optimizer state (Adam)", 8 * trained / split_states, opt_where, f"8 B x trained / {split_states}")
    )

    per_layer = p * seq_len * micro_batch * (6 * shape.hidden + 2 * shape.kv_dim + 3 * shape.intermediate)
    if gradient_checkpointing:
        acts = shape.layers * p * seq_len * micro_batch * shape.hidden + per_layer
        how = "each layer's input, + one layer recomputed"
    else:
        acts = shape.layers * per_layer
        how = f"{shape.layers} layers x b s (6h + 2kv + 3i) x {p} B"
    items.append(Item("activations", acts, "device", how))
    # transformers reads the weights a checkpoint file at a time on every rank (shards of at most 5 GB).
    loading = min(p * shape.params, CHECKPOINT_SHARD_BYTES)
    items.append(Item("loading the weights", loading, "host", "one checkpoint file at a time, on every rank"))
    positions = loss_chunk_tokens or micro_batch * seq_len
    items.append(
        Item(
            "logits and loss",
            positions * shape.vocab * (p + 8),
            "device",
            f"{positions} positions x {shape.vocab} x ({p} + 4 fp32 + 4 gradient) B"
            + (" (in pieces)" if loss_chunk_tokens else " (at most: trained positions only)"),
        )
    )
    if zero_stage == 3:
        bucket = zero3_reduce_bucket(shape.hidden)
        largest = 2 * p * shape.largest_layer  # gathered whole, with its whole gradient before the reduce-scatter
        prefetch = p * min(DEEPSPEED_PREFETCH_BUCKET, total)
        persistent = p * (2 * shape.layers + 1) * shape.hidden if shape.hidden < persistence_threshold else 0
        items.append(Item("ZeRO-3 reduce bucket", p * bucket, "device", f"{bucket:,} elements"))
        items.append(Item("ZeRO-3 largest layer, gathered", largest, "device", "its weights and gradient, whole"))
        items.append(Item("ZeRO-3 prefetch bucket", prefetch, "device", "the next layers' weights, gathered early"))
        items.append(Item("ZeRO-3 persistent parameters", persistent, "device", "norms, kept whole on every GPU"))
    elif zero_stage in (1, 2) and w > 1:
        items.append(
            Item("ZeRO reduce/all-gather buckets", 2 * p * DEEPSPEED_STAGE12_BUCKET, "device", "2 x 5e8 elements")
        )
    elif zero_stage == 0 and w > 1:  # one worker reduces nothing (the trainer turns the all-reduce off)
        bucket = min(trained, DEEPSPEED_STAGE12_BUCKET)
        items.append(
            Item("all-reduce buffer", p * bucket, "device", f"the gradients flattened, {bucket:,.0f} elements at most")
        )
    items.append(Item("runtime (CUDA context, allocator)", RUNTIME_RESERVE_GB * GB, "device", "a reserve"))

    ring = (w - 1) / w
    if zero_stage == 3:
        sent = accumulation * (2 * p * total + p * trained) * ring  # gather forward and backward, reduce-scatter
    elif zero_stage == 2:
        sent = (accumulation + 1) * p * trained * ring  # reduce-scatter every micro-batch, gather once
    else:
        sent = 2 * p * trained * ring  # an all-reduce (stage 1: a reduce-scatter and an all-gather, the same)
    tokens = accumulation * micro_batch * seq_len
    attention = 12 * shape.layers * shape.heads * shape.head_dim * seq_len / 2  # causal: half the context
    flops = tokens * (6 * trained + 4 * (total - trained) + attention)
    compute_s = flops / (peak * 1e12) if peak else math.inf
    comm_s = sent * 8 / (interconnect_gbps * 1e9) if sent else 0.0
    busy = max(compute_s, comm_s)
    step = {
        "bytes_sent": sent,
        "comm_s": comm_s,
        "flops": flops,
        "compute_s": compute_s,
        "tokens": tokens,
        "tokens_per_s": tokens / busy if busy and math.isfinite(busy) else 0.0,
        "mfu_bound": compute_s / busy if busy and math.isfinite(busy) else 0.0,
    }
    settings = {
        "model": model_name,
        "params": total,
        "trainable": trained,
        "zero_stage": zero_stage,
        "precision": precision,
        "world": w,
        "gpu": gpu,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "accumulation": accumulation,
        "gradient_checkpointing": gradient_checkpointing,
        "offload_optimizer": offload_optimizer,
        "offload_params": offload_params,
        "interconnect_gbps": interconnect_gbps,
        "peak_tflops": peak,
    }
    return Plan(items, settings, step, memory)
