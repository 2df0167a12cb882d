"""What a run reports: TensorBoard scalars and text (rank 0), a metrics.jsonl beside them, FLOPs and MFU."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

# Dense bf16/fp16 peak TFLOP/s of known accelerators (vendor datasheets, without sparsity).
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "H100": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "MI300X": 1307.4,
}


def device_peak_tflops(override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from) for this worker's device."""
    if override:
        return override, "logging.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key], name
        return 0.0, f"{name} (unknown: set logging.peak_tflops)"
    # A CPU: cores x clock x 32 fp32 FLOPs per cycle (two 8-wide FMA units), an estimate.
    ghz = 2.0
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        mhz = [float(line.split(":")[1]) for line in lines if line.startswith("cpu MHz")]
        ghz = max(mhz) / 1000 if mhz else ghz
    except OSError:
        pass
    threads = torch.get_num_threads()
    return threads * ghz * 32 / 1000, f"CPU estimate ({threads} threads x {ghz:.2f} GHz x 32)"


class FlopCounter:
    """Model FLOPs of a step: 6 per parameter per token (2 forward, 4 backward; 2 for frozen weights, which
    need no weight gradient), plus causal attention, 12 x layers x attention width x context per token, where
    the context of a token is its position in its own document (packed documents do not attend to each other)."""

    def __init__(self, config: Any, trainable: int, frozen: int):
        text = getattr(config, "text_config", config)
        self.per_token = 6 * trainable + 4 * frozen
        heads = getattr(text, "num_attention_heads", 0)
        head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
        self.attention = 12 * getattr(text, "num_hidden_layers", 0) * heads * head_dim

    def step_flops(self, position_ids: torch.Tensor) -> float:
        """Of a batch's positions, on the host (as the loader gives them)."""
        tokens = position_ids.numel()
        context = float((position_ids.numpy().astype(np.float64) + 1).sum())
        return self.per_token * tokens + self.attention * context


def host_rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def host_peak_rss_gb() -> float:
    """The most host memory this process has held so far (its RSS high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def process_counts() -> tuple[int, int]:
    """(open file descriptors, threads) of this process: what a leak would grow."""
    process = psutil.Process()
    return process.num_fds(), process.num_threads()


def device_memory_gb() -> tuple[float, float]:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
    return 0.0, 0.0


class MetricsWriter:
    """TensorBoard event files and metrics.jsonl in the run directory; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - open for the run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()

    def samples(self, step: int, ids: list[int]) -> None:
        """The sample ids of a step, in global order (RUN_DIR/samples.jsonl)."""
        if self.enabled:
            with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.enabled and self.writer is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


class StepProfiler:
    """torch.profiler over steps [first, last] of a run (`logging.profile_steps`; none when empty): call
    `before(step)` as a step begins and `after(step)` once it ends. Writes PREFIX.json (the trace) and PREFIX.txt
    (the ops by self time, per step) and returns the ops as [name, self ms per step, calls per step]."""

    def __init__(self, steps: list[int], prefix: Path):
        self.first, self.last = steps if steps else (0, -1)
        self.prefix, self.profile = Path(prefix), None

    def before(self, step: int) -> None:
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()

    def after(self, step: int) -> list | None:
        if step != self.last or self.profile is None:
            return None
        self.profile.__exit__(None, None, None)
        steps = self.last - self.first + 1
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.profile.export_chrome_trace(str(self.prefix.with_suffix(".json")))
        ops = sorted(self.profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        rows = [[e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps] for e in ops]
        lines = [f"{'op':60} {'self ms/step':>12} {'calls/step':>10}"]
        lines += [f"{name[:60]:60} {ms:12.2f} {calls:10.1f}" for name, ms, calls in rows]
        self.prefix.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        self.profile = None
        return rows
