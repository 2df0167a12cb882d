"""What the loop receives from whoever launched it: its sections of the job config, checked (the launcher's
`JobConfig.trainer_spec` builds it), the run directory and the whole resolved config. Kept apart from the loop so
that the launcher's config commands need not import torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infinitune.data_pipeline.config import DataConfig
from infinitune.trainer.config import CheckpointConfig, DeepSpeedConfig, LoggingConfig, ModelConfig, TrainConfig


@dataclass
class TrainerSpec:
    """The sections of the job config the worker uses, the run directory, and the whole resolved config
    (saved into checkpoints and TensorBoard)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    run_dir: str
    resolved_config: dict[str, Any] = field(default_factory=dict)
