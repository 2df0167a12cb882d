"""The root job config: one typed section per component, loaded from YAML plus `section.key=value` overrides.

Everything that can be checked without touching the cluster is checked here, before any work starts:
unknown keys, types, values, how sections fit together, and (when asked) the model's context length.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import psutil
import yaml
from pydantic import Field

from infinitune.cluster.config import ClusterConfig
from infinitune.data_pipeline.config import DataConfig
from infinitune.data_pipeline.tokenizer import resolve_model_source
from infinitune.trainer.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
)
from infinitune.trainer.plan import GB, GPUS, ModelShape, known_config, make_plan
from infinitune.trainer.spec import TrainerSpec
from infinitune.typed_config import ConfigError, Section, apply_overrides, from_dict, require


def check_batch_fits(global_batch: int, micro_batch: int, workers: int) -> None:
    """The global batch must split evenly into micro-batches on every worker (it is kept as it is when a run
    continues on another number of workers; gradient accumulation makes up the rest). Refused naming the
    numbers, the worker counts that would hold it, and the nearest global batches for these workers."""
    per_pass = micro_batch * workers
    if global_batch % per_pass == 0:
        return
    holding = [w for w in range(1, global_batch // micro_batch + 1) if global_batch % (micro_batch * w) == 0]
    below, above = global_batch // per_pass * per_pass, (global_batch // per_pass + 1) * per_pass
    nearest = " or ".join(str(b) for b in (below, above) if b > 0)
    raise ConfigError(
        "train.global_batch_size",
        f"{global_batch} does not split into micro-batches of {micro_batch} on {workers} workers (it must be a "
        f"multiple of train.micro_batch_size x cluster.num_workers = {per_pass}). Worker counts that hold it: "
        f"{', '.join(map(str, holding)) or 'none'}; global batches that fit {workers} workers: {nearest}",
    )


class JobConfig(Section):
    """A fine-tuning job. Each component receives only its own section."""

    name: str
    """The run's name: its directory is cluster.storage_path/name (cluster.local_dir/name for a URI storage)."""

    model: ModelConfig
    """The model to fine-tune."""

    data: DataConfig
    """Instruction data, shards and the stream."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation."""

    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO settings."""

    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Ray cluster and workers."""

    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """TensorBoard and console reporting."""

    def check(self) -> None:
        require(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain directory name; got {self.name!r}",
        )
        low, high = self.cluster.worker_range
        for workers in range(low, high + 1):  # an elastic job may run at any size in its range
            check_batch_fits(self.train.global_batch_size, self.train.micro_batch_size, workers)

        adapter = self.model.adapter
        if adapter is not None and adapter.method == "adalora" and self.deepspeed.zero_stage not in (0, "auto"):
            raise ConfigError(
                "model.adapter.method",
                f"adalora with deepspeed.zero_stage {self.deepspeed.zero_stage} is not supported: AdaLoRA ranks "
                "its adapters by their whole gradients, which ZeRO 1-3 partition across ranks; use "
                "deepspeed.zero_stage=0 (the adapters are small), or method lora",
            )
        if (
            adapter is not None
            and adapter.method == "prefix"
            and self.model.attn_implementation not in ("sdpa", "eager")
        ):
            raise ConfigError(
                "model.attn_implementation",
                f"prefix tuning keeps packed documents apart with an explicit mask, which "
                f"{self.model.attn_implementation} does not take; use sdpa or eager",
            )
        if adapter is not None and adapter.method == "prefix" and self.model.compile_layers:
            raise ConfigError(
                "model.compile_layers",
                "not with prefix tuning: each layer reads its own entry of the prefix's cache, so torch compiles "
                "every layer anew and falls back to eager past its recompile limit (8); set it to false",
            )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def trainer_spec(self, run_dir: str | os.PathLike) -> TrainerSpec:
        """What each worker's loop receives: the sections it uses, the run directory, the whole resolved config
        (saved into checkpoints and TensorBoard)."""
        _chosen(self.deepspeed.zero_stage)
        return TrainerSpec(
            model=self.model,
            data=self.data,
            train=self.train,
            deepspeed=self.deepspeed,
            checkpoint=self.checkpoint,
            logging=self.logging,
            run_dir=str(run_dir),
            resolved_config=self.to_dict(),
        )


def load_job_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job config, apply overrides and check everything; errors name the key path. `path` is a
    file, or `env:NAME` for the YAML held by environment variable NAME (how `submit` sends the resolved
    config with the job)."""
    try:
        data = yaml.safe_load(_config_text(str(path)))
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a job config must be a mapping of sections (name, model, data, ...)")
    try:
        return from_dict(JobConfig, apply_overrides(data, list(overrides)))
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} (in {path})") from None


def _config_text(path: str) -> str:
    if path.startswith("env:"):
        text = os.environ.get(path[4:])
        if text is None:
            raise ConfigError("", f"{path}: the environment variable {path[4:]} is not set")
        return text
    if not Path(path).is_file():
        raise ConfigError("", f"{path}: no such config file")
    return Path(path).read_text(encoding="utf-8")


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """The config with its local paths made absolute: workers (Ray's, in their own directories) and a later
    `resume` from elsewhere must find the same files. Hub ids and URLs are left as they are."""

    def resolve(path: str | None, must_exist: bool) -> str | None:
        if path is None or not _is_local(path):
            return path
        try:
            p = Path(path).expanduser()
            return str(p.resolve()) if p.exists() or not must_exist else path
        except OSError:  # not a path at all (an inline chat template, say)
            return path

    data = cfg.data.model_copy(
        update={
            "sources": [s.model_copy(update={"path": resolve(s.path, True)}) for s in cfg.data.sources],
            "shards_dir": resolve(cfg.data.shards_dir, False),
            "chat_template": resolve(cfg.data.chat_template, True) if cfg.data.chat_template else None,
        }
    )
    model = cfg.model.model_copy(
        update={"path": resolve(cfg.model.path, True), "tokenizer": resolve(cfg.model.tokenizer, True)}
    )
    cluster = cfg.cluster.model_copy(
        update={
            "storage_path": resolve(cfg.cluster.storage_path, False),
            "local_dir": resolve(cfg.cluster.local_dir, False),
        }
    )
    train = cfg.train.model_copy(update={"eval_tasks": resolve(cfg.train.eval_tasks, True)})
    return cfg.model_copy(update={"data": data, "model": model, "cluster": cluster, "train": train})


def run_location(cfg: JobConfig) -> tuple[Path, str | None]:
    """(the run's local directory, its storage URI or None): `storage_path/name` when storage is a directory;
    `local_dir/name` and `storage_path/name` when it is a URI."""
    from infinitune.trainer.storage import is_uri  # here: storage imports torch, which `config` and `plan` need not

    storage = cfg.cluster.storage_path
    if is_uri(storage):
        return Path(cfg.cluster.local_dir) / cfg.name, f"{storage.rstrip('/')}/{cfg.name}"
    return Path(storage) / cfg.name, None


def dump_job_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_job_config(cfg: JobConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(dump_job_config(cfg), encoding="utf-8")


def model_max_positions(model: ModelConfig) -> int | None:
    """The model's context length from its config.json or GGUF header, without loading weights."""
    if model.max_position_embeddings:
        return model.max_position_embeddings
    try:
        return _read_max_positions(model)
    except ConfigError:
        raise
    except Exception as e:  # a damaged config.json or GGUF header, an unreachable hub
        known = known_config(model.path)
        if known is not None:  # a common model, whose architecture is shipped
            return known["max_position_embeddings"]
        raise ConfigError(
            "model.path",
            f"cannot read the model's context length from {model.path} ({type(e).__name__}: {e}); fix the path, or "
            "set model.max_position_embeddings",
        ) from None


def _read_max_positions(model: ModelConfig) -> int | None:
    source, gguf = resolve_model_source(model.path, model.gguf_file)
    if gguf:
        return _gguf_config(os.path.join(source, gguf))["max_position_embeddings"]
    if Path(source).is_dir():
        config_file = Path(source) / "config.json"
        if not config_file.is_file():
            return None  # a tokenizer-only directory: nothing to check against
        cfg = json.loads(config_file.read_text())
        cfg = cfg.get("text_config", cfg)
        return cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("max_sequence_length")
    from transformers import AutoConfig  # a hub id: only its config is fetched

    cfg = AutoConfig.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    return getattr(cfg, "max_position_embeddings", None)


def model_config(model: ModelConfig) -> dict[str, Any]:
    """The model's config (config.json, a GGUF header, or a hub id's config): no weights are read. Read once
    per process and model: `train` chooses the ZeRO stage and checks the plan from it (a GGUF header takes
    seconds)."""
    return dict(_model_config(model.path, model.gguf_file, model.trust_remote_code))


@functools.lru_cache(maxsize=8)
def _model_config(path: str, gguf_file: str | None, trust_remote_code: bool) -> dict[str, Any]:
    try:
        source, gguf = resolve_model_source(path, gguf_file)
        if gguf:
            return _gguf_config(os.path.join(source, gguf))
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).to_dict()
    except Exception as e:  # a missing or damaged config.json, an unreachable hub
        known = known_config(path)
        if known is not None:  # a common model's architecture, shipped: planning needs no hub
            return known
        raise ConfigError(
            "model.path", f"cannot read the model's config from {path} ({type(e).__name__}: {e})"
        ) from None


def _gguf_config(path: str) -> dict[str, Any]:
    """The config.json keys a plan needs, from a GGUF file's header (transformers' own GGUF loading reads the
    tensors too)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def value(key: str):
        field_ = reader.fields.get(f"{arch}.{key}")
        return int(field_.parts[-1][0]) if field_ is not None else None

    return {
        "model_type": arch,
        "hidden_size": value("embedding_length"),
        "intermediate_size": value("feed_forward_length"),
        "num_hidden_layers": value("block_count"),
        "num_attention_heads": value("attention.head_count"),
        "num_key_value_heads": value("attention.head_count_kv"),
        "head_dim": value("attention.key_length"),  # where it is not hidden / heads (Qwen3, Gemma)
        "vocab_size": value("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        "max_position_embeddings": value("context_length"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": any(t.name.endswith("attn_q.bias") for t in reader.tensors),
    }


def job_plan(
    cfg: JobConfig,
    gpu: str | None = None,
    device_memory_gb: float | None = None,
    interconnect_gbps: float | None = None,
    shape=None,
):
    """What the job needs per GPU and sends per step (trainer/plan.py), on the fewest workers it may run on (the
    most per GPU), for `gpu` (default: cluster.gpu, else H100); `shape` saves reading the model's config again."""
    world = cfg.cluster.worker_range[0]
    adapter = cfg.model.adapter
    return make_plan(
        shape or ModelShape.from_config(model_config(cfg.model)),
        world=world,
        zero_stage=_chosen(cfg.deepspeed.zero_stage),
        precision=cfg.deepspeed.precision,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.data.seq_len,
        accumulation=cfg.train.global_batch_size // (cfg.train.micro_batch_size * world),
        offload_optimizer=cfg.deepspeed.offload_optimizer,
        offload_params=cfg.deepspeed.offload_params,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        loss_chunk_tokens=cfg.model.loss_pieces(_chosen(cfg.deepspeed.zero_stage) == 3),
        lora_r=adapter.r if adapter is not None and adapter.method == "lora" else None,
        persistence_threshold=cfg.deepspeed.param_persistence_threshold,
        gpu=gpu or cfg.cluster.gpu or "H100",
        device_memory_gb=device_memory_gb,
        interconnect_gbps=interconnect_gbps or cfg.cluster.interconnect_gbps,
        model_name=cfg.model.path,
    )


def _chosen(stage: int | str) -> int:
    if stage == "auto":
        raise ConfigError("deepspeed.zero_stage", "auto is chosen before the job is planned (choose_zero_stage)")
    return int(stage)


def choose_zero_stage(cfg: JobConfig, memory_gb: float | None = None) -> tuple[JobConfig, str]:
    """The config with `deepspeed.zero_stage: auto` made a stage, and why (a configured stage is kept): 0 when
    the model, its gradients, optimizer state and activations fit on one device of the job at stage 0 (the
    plan's count), else 3. A device's memory: `memory_gb`, else cluster.gpu's, else on CPUs this machine's
    memory shared by its workers (a job on this machine); unknown, 3 (it fits where 0 may not)."""
    ds = cfg.deepspeed
    if ds.zero_stage != "auto":
        return cfg, f"{ds.zero_stage} (configured)"

    def at(stage: int) -> JobConfig:
        return cfg.model_copy(update={"deepspeed": ds.model_copy(update={"zero_stage": stage})})

    def chosen(stage: int, why: str) -> tuple[JobConfig, str]:
        return at(stage), f"{stage} (auto: {why})"

    if ds.offload_optimizer != "none" or ds.offload_params != "none":
        return chosen(3, "offloading needs ZeRO's partitions")
    adapter = cfg.model.adapter
    if adapter is not None and adapter.method == "adalora":
        return chosen(0, "AdaLoRA reads whole gradients")
    device = cfg.cluster.gpu if cfg.cluster.use_gpu else "CPU host"
    if memory_gb is None and cfg.cluster.use_gpu and cfg.cluster.gpu is not None:
        memory_gb = GPUS[cfg.cluster.gpu][0]
    elif memory_gb is None and not cfg.cluster.use_gpu and cfg.cluster.address is None:
        memory_gb = psutil.virtual_memory().total / GB / cfg.cluster.worker_range[1]
    if memory_gb is None:
        where = "set cluster.gpu" if cfg.cluster.use_gpu else "the cluster's hosts are not this machine"
        return chosen(3, f"the memory of a device is unknown ({where})")
    try:
        plan = job_plan(at(0), device_memory_gb=memory_gb)
    except ConfigError as e:
        return chosen(3, f"the model's size is unknown ({e.message})")
    need = (plan.total() + (0 if cfg.cluster.use_gpu else plan.total("host"))) / GB
    if need <= memory_gb:
        return chosen(0, f"at stage 0 a worker holds {need:.1f} GB, within the {memory_gb:.1f} GB of its {device}")
    return chosen(3, f"at stage 0 a worker would hold {need:.1f} GB, more than the {memory_gb:.1f} GB of its {device}")


# Settings that lower what a GPU holds, tried one at a time when a job does not fit: (override, why).
_REMEDIES = [
    ("deepspeed.zero_stage=3", "partitions the weights too"),
    ("model.gradient_checkpointing=true", "keeps only each layer's input"),
    ("model.loss_chunk_tokens=2048", "the output layer and loss in pieces"),
    ("deepspeed.offload_optimizer=cpu", "Adam's state and master weights in host memory"),
]


def check_plan_fits(cfg: JobConfig) -> None:
    """Refuse a job predicted not to fit on cluster.gpu, naming its largest item and what would fit (GPU jobs
    that name their GPU only)."""
    if cfg.cluster.gpu is None or not cfg.cluster.use_gpu:
        return

    shape = ModelShape.from_config(model_config(cfg.model))
    plan = job_plan(cfg, shape=shape)
    if plan.fits:
        return
    candidates = list(_REMEDIES)
    if cfg.train.micro_batch_size > 1:
        candidates.append((f"train.micro_batch_size={cfg.train.micro_batch_size // 2}", "half the activations"))
    low, high = cfg.cluster.worker_range
    for more in (2 * low, 4 * low):
        if cfg.train.global_batch_size % (more * cfg.train.micro_batch_size) == 0:
            workers = f"[{more},{max(more, high)}]" if cfg.cluster.elastic else str(more)
            candidates.append((f"cluster.num_workers={workers}", "more GPUs to partition over"))
    fixes = []
    for override, why in candidates:
        try:
            tried = job_plan(from_dict(JobConfig, apply_overrides(cfg.to_dict(), [override])), shape=shape)
        except ConfigError:  # not a valid combination with the rest of the config
            continue
        if tried.fits:
            fixes.append(f"{override} ({why}: {tried.total() / 1e9:.1f} GB)")
    largest = plan.largest
    raise ConfigError(
        "cluster.gpu",
        f"the job is predicted to need {plan.total() / 1e9:.1f} GB per GPU and a {cfg.cluster.gpu} has "
        f"{plan.device_memory_gb:.0f} GB; the largest item is {largest.name} ({largest.bytes / 1e9:.1f} GB). "
        + ("It would fit with any one of: " + "; ".join(fixes) + ". " if fixes else "")
        + "See `infinitune plan CONFIG`; --ignore-plan launches it anyway.",
    )


def check_against_model(cfg: JobConfig) -> None:
    """Checks that need the model's config (not its weights): data.seq_len within its context."""
    limit = model_max_positions(cfg.model)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(
            "data.seq_len",
            f"{cfg.data.seq_len} is beyond the model's {limit} positions ({cfg.model.path}); lower it to at most "
            f"{limit}",
        )
