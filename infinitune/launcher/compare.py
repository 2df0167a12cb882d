"""`infinitune compare RUN_A RUN_B ...`: one table of what runs achieved and cost, and their loss curves overlaid,
read from the runs' TensorBoard event files (with tensorboard's own EventAccumulator)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from infinitune.typed_config import ConfigError

EVAL_COLUMNS = ("eval/loss", "eval/exact_match", "eval/rouge_l", "eval/bleu")


@dataclass
class RunSummary:
    name: str
    steps: int
    final_loss: float
    trained_tokens: int | None  # None: a run from before train/trained_tokens was logged
    wall_s: float
    peak_memory_gb: float
    evals: dict[str, float]  # the last value of each eval/* scalar
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)


def read_run(run_dir: str | Path) -> RunSummary:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it logs each file it reads at INFO

    logdir = Path(run_dir) / "tensorboard"
    if not logdir.is_dir():
        raise ConfigError("RUN", f"{run_dir} has no tensorboard/ directory; is it a run directory?")
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    if "train/loss" not in tags:
        raise ConfigError("RUN", f"{logdir} holds no train/loss yet; has the run taken a step?")

    def series(tag: str):
        # A step logged again after a restart keeps its last value.
        return sorted({e.step: e for e in events.Scalars(tag)}.values(), key=lambda e: e.step) if tag in tags else []

    loss = series("train/loss")
    peaks = [
        e.value for tag in ("memory/device_peak_gb", "memory/host_peak_gb", "memory/host_rss_gb") for e in series(tag)
    ]
    trained = series("train/trained_tokens")
    return RunSummary(
        name=Path(run_dir).name,
        steps=loss[-1].step,
        final_loss=loss[-1].value,
        trained_tokens=int(trained[-1].value) if trained else None,
        # First to last logged step; a restarted run's repeated steps keep their last time (series above).
        wall_s=max(e.wall_time for e in loss) - min(e.wall_time for e in loss),
        peak_memory_gb=max(peaks, default=0.0),
        evals={tag: series(tag)[-1].value for tag in EVAL_COLUMNS if tag in tags},
        loss_curve=[(e.step, e.value) for e in loss],
        eval_curve=[(e.step, e.value) for e in series("eval/loss")],
    )


def table(runs: list[RunSummary]) -> str:
    """A markdown table, one row per run."""
    evals = [c for c in EVAL_COLUMNS if any(c in r.evals for r in runs)]
    head = ["run", "steps", "final train loss", *evals, "trained tokens", "wall s", "peak memory GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r.name, str(r.steps), f"{r.final_loss:.4f}"]
        cells += [f"{r.evals[c]:.4f}" if c in r.evals else "-" for c in evals]
        cells += [f"{r.trained_tokens:,}" if r.trained_tokens is not None else "-", f"{r.wall_s:.1f}"]
        cells.append(f"{r.peak_memory_gb:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[RunSummary], out: str | Path) -> Path:
    """Training loss (solid) and validation loss (dashed, dots at each evaluation) of every run, by step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for i, r in enumerate(runs):
        color = f"C{i}"
        ax.plot(*zip(*r.loss_curve), color=color, linewidth=1.2, label=f"{r.name} train")
        if r.eval_curve:
            ax.plot(*zip(*r.eval_curve), color=color, linestyle="--", marker="o", markersize=3, label=f"{r.name} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title("infinitune compare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
