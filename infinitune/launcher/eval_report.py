"""`infinitune eval`'s report: the scored rows and aggregates as JSON, and their view in the terminal."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from infinitune.data_pipeline.constraints import sentence_splitter
from infinitune.trainer.evaluate import EvalSettings
from infinitune.trainer.scoring import REFERENCE_METRICS, aggregate, ifeval_by_type, score_each


def build_report(target: str, data: str | list[str], settings: EvalSettings, rows, dropped, total: int) -> dict:
    """The aggregates over all rows; with several data sets, also per set (`by_data`); with ifeval, the
    instruction-level accuracy per constraint type (`ifeval_by_type`)."""
    score_each(rows, settings.metrics)  # once: the sets below only aggregate
    report: dict[str, Any] = {
        "model": target,
        "data": data,
        "examples": total,
        "metrics": aggregate(rows, settings.metrics),
        "dropped": dropped,
        "settings": asdict(settings),
    }
    if not isinstance(data, str) and len(data) > 1:
        report["by_data"] = {d: aggregate([r for r in rows if r.get("data") == d], settings.metrics) for d in data}
    if "ifeval" in settings.metrics:
        report["ifeval_sentence_splitter"] = sentence_splitter()  # NLTK's trained model, or the stand-in
        report["ifeval_by_type"] = ifeval_by_type(rows)
        if not isinstance(data, str) and len(data) > 1:
            report["ifeval_by_type_by_data"] = {
                d: ifeval_by_type([r for r in rows if r.get("data") == d]) for d in data
            }
    report["rows"] = rows
    return report


def format_report(report: dict[str, Any], show: int = 5) -> str:
    """The terminal view of a report: a few rows, then one line per aggregate."""
    lines = []
    for r in report["rows"][:show]:
        scores = " ".join(f"{m}={r[m]:.3g}" for m in (*REFERENCE_METRICS, "ifeval_prompt_strict", "loss") if m in r)
        answer = r.get("answer", "")
        want = f" (want {r['reference'][:50]!r})" if r.get("reference") is not None else ""
        lines.append(f"  {r['where']}: {answer[:50]!r}{want} {scores}")

    def block(title: str, metrics: dict[str, Any]) -> None:
        width = max((len(k) for k in metrics), default=0)
        lines.append(title)
        for name, value in metrics.items():
            lines.append(
                f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}"
            )

    data = report["data"] if isinstance(report["data"], str) else ", ".join(report["data"])
    block(f"{report['model']} on {report['examples']} examples of {data}:", report["metrics"])
    for name, metrics in report.get("by_data", {}).items():
        block(f" {name}:", metrics)
    if report.get("ifeval_by_type"):
        lines.append("  instruction-level accuracy by type (strict / loose, instructions):")
        for name, e in report["ifeval_by_type"].items():
            lines.append(f"    {name:<46} {e['strict']:.3f} / {e['loose']:.3f}  ({e['n']})")
    if report["dropped"]:
        lines.append("  records left out: " + ", ".join(f"{k} {v}" for k, v in sorted(report["dropped"].items())))
    return "\n".join(lines)


def before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Two reports on the same data side by side: per data set, exact match where its records have plain
    answers, IFEval's prompt- and instruction-level strict accuracy where they carry constraints."""
    sets = before.get("by_data") or {before["data"]: before["metrics"]}
    later = after.get("by_data") or {after["data"]: after["metrics"]}
    lines = [f"{'held-out set':<44} {'metric':<26} {'before':>7} {'after':>7}"]
    for name, metrics in sets.items():
        shown = (
            ("ifeval_prompt_strict", "ifeval_instruction_strict") if "ifeval_prompts" in metrics else ("exact_match",)
        )
        for metric in shown:
            if metric in metrics and metric in later.get(name, {}):
                lines.append(f"{name:<44} {metric:<26} {metrics[metric]:>7.1%} {later[name][metric]:>7.1%}")
    return "\n".join(lines)


if __name__ == "__main__":  # the quickstart's closing table: python -m infinitune.launcher.eval_report BEFORE AFTER
    import json
    import sys
    from pathlib import Path

    print(before_after(*(json.loads(Path(p).read_text(encoding="utf-8")) for p in sys.argv[1:3])))
