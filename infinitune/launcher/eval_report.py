"""`infinitune eval`'s report: the scored rows and aggregates as JSON, and their view in the terminal."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from infinitune.trainer.evaluate import EvalSettings
from infinitune.trainer.scoring import GENERATION_METRICS, score_rows


def build_report(target: str, data: str, settings: EvalSettings, rows, dropped, total: int) -> dict[str, Any]:
    aggregates = score_rows(rows, settings.metrics)
    return {
        "model": target,
        "data": data,
        "examples": total,
        "metrics": aggregates,
        "dropped": dropped,
        "settings": asdict(settings),
        "rows": rows,
    }


def format_report(report: dict[str, Any], show: int = 5) -> str:
    """The terminal view of a report: a few rows, then one line per aggregate."""
    lines = []
    for r in report["rows"][:show]:
        scores = " ".join(f"{m}={r[m]:.3g}" for m in (*GENERATION_METRICS, "loss") if m in r)
        answer = r.get("answer", "")
        lines.append(f"  {r['where']}: {answer[:50]!r} (want {r['reference'][:50]!r}) {scores}")
    width = max(len(k) for k in report["metrics"]) if report["metrics"] else 0
    lines.append(f"{report['model']} on {report['examples']} examples of {report['data']}:")
    for name, value in report["metrics"].items():
        lines.append(f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")
    if report["dropped"]:
        lines.append("  records left out: " + ", ".join(f"{k} {v}" for k, v in sorted(report["dropped"].items())))
    return "\n".join(lines)
