"""The DeepSpeed JSON config, generated from our typed sections (users never write one)."""

from __future__ import annotations

from typing import Any

from infinitune.data_pipeline.stream import BatchLayout
from infinitune.trainer.config import DeepSpeedConfig, TrainConfig
from infinitune.trainer.plan import zero3_reduce_bucket


def loop_clips(ds: DeepSpeedConfig) -> bool:
    """Whether the loop clips the gradients itself: at stage 0 in fp32, where DeepSpeed clips them but keeps no
    norm to report (its other paths keep the norm they clip with)."""
    return ds.zero_stage == 0 and ds.precision == "fp32"


def deepspeed_config(
    ds: DeepSpeedConfig, train: TrainConfig, layout: BatchLayout, hidden_size: int | None = None
) -> dict[str, Any]:
    """The config for `deepspeed.initialize`. The optimizer is DeepSpeed's only when its state is offloaded
    (DeepSpeedCPUAdam); otherwise the loop hands it a torch AdamW, which needs no compiled op. ZeRO-3's reduce
    bucket is sized to the model's `hidden_size` (`plan.zero3_reduce_bucket`)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=ds.zero_stage >= 2, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=ds.param_persistence_threshold,
            # Export consolidates from the checkpoint shards (zero_to_fp32), never by gathering on one rank.
            stage3_gather_16bit_weights_on_model_save=False,
        )
        if hidden_size:
            zero["reduce_bucket_size"] = zero3_reduce_bucket(hidden_size)
    for key, where in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_params)):
        if where != "none":
            zero[key] = {"device": where, "pin_memory": where == "cpu"}
            if where == "nvme":
                zero[key]["nvme_path"] = ds.nvme_path
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": 0.0 if loop_clips(ds) else train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.offload_optimizer != "none":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "weight_decay": train.weight_decay,
                "eps": 1e-8,
            },
        }
    return config
