"""The `infinitune` command line.

Each command imports what it runs inside its own function, on purpose: `infinitune --help`, `config` or `status`
must not pay for torch, Ray or transformers (seconds each) that only other commands need."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from infinitune.trainer.config import DTYPES
from infinitune.typed_config import ConfigError

EXIT_USAGE = 2  # bad config, bad input: nothing was started


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML job config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides such as train.lr=1e-4")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return n


def cmd_generate_data(args: argparse.Namespace) -> int:
    from infinitune.data_pipeline import constraints, synthetic

    tasks = args.tasks.split(",") if args.tasks else None
    if tasks:
        unknown = [t for t in tasks if t not in synthetic.TASKS]
        if unknown:
            raise ConfigError("--tasks", f"unknown task(s) {unknown}; known: {', '.join(synthetic.TASKS)}")
    if not 0 <= args.constraints <= 1:
        raise ConfigError(
            "--constraints", f"is the share of records with constraints, in [0, 1]; got {args.constraints}"
        )
    mix = None
    if args.constraints > 0:
        try:
            types = constraints.check_types(
                args.constraint_types.split(",") if args.constraint_types else constraints.GENERATED_TYPES,
                "--constraint-types",
            )
            held_out = constraints.check_types(
                args.hold_out_types.split(",") if args.hold_out_types else [], "--hold-out-types"
            )
        except ValueError as e:
            raise ConfigError(str(e).split(":")[0], str(e).split(": ", 1)[1]) from None
        types = [t for t in types if t not in held_out]
        if not types:
            raise ConfigError("--hold-out-types", "holds out every constraint type; leave some to generate")
        bases, left_out = synthetic.bases_from_records(args.source) if args.source else ([], {})
        for reason, n in sorted(left_out.items()):
            print(f"--from {args.source}: {n} records left out ({reason})")
        mix = synthetic.Mix(args.constraints, types, bases)
        if args.source and args.constraints != 1:
            raise ConfigError(
                "--constraints",
                "with --from every record gets constraints: give --constraints 1 (add your plain records to "
                "training as a source of their own)",
            )
    elif args.source or args.constraint_types or args.hold_out_types:
        raise ConfigError("--constraints", "--from, --constraint-types and --hold-out-types need --constraints > 0")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.perf_counter()
    counts = synthetic.write_jsonl(args.out, args.n, args.seed, tasks, args.format, mix)
    written = counts["plain"] + counts["constraints"]
    kinds = f" ({counts['plain']} plain, {counts['constraints']} with constraints)" if mix else ""
    print(
        f"wrote {written} {args.format} records{kinds} (seed {args.seed}) to {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    if counts["no_constraint_fits"]:
        print(f"left out {counts['no_constraint_fits']} --from records: no drawn constraints fit their answer")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from infinitune.data_pipeline.sample_index import index_dataset

    if "://" in args.shards_dir or args.shards_dir.startswith("pipe:"):
        raise ConfigError(
            "shards_dir", f"{args.shards_dir}: index a local copy, then upload it with its .idx.npy files"
        )
    t0 = time.perf_counter()
    done = index_dataset(args.shards_dir)
    print(
        f"indexed {done} shards in {args.shards_dir} ({time.perf_counter() - t0:.1f}s); ranks now read their own samples"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from infinitune.data_pipeline.prepare import REPAIRED_REPORT, SKIPPED_REPORT, prepare
    from infinitune.data_pipeline.tokenizer import load_tokenizer
    from infinitune.launcher.job_config import check_against_model, load_job_config

    cfg = load_job_config(args.config, args.overrides)
    check_against_model(cfg)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(
        cfg.model.tokenizer or cfg.model.path, None if cfg.model.tokenizer else cfg.model.gguf_file
    )
    manifest = prepare(cfg.data, tokenizer, skip_invalid=args.skip_invalid, num_proc=args.num_proc)
    took = time.perf_counter() - t0
    print(f"\nshards in {cfg.data.shards_dir} ({took:.1f}s)")
    for src in manifest.sources:
        dropped = ", ".join(f"{k} {v}" for k, v in src["dropped"].items()) or "none"
        repaired = "".join(f", repaired: {k} {v}" for k, v in src.get("repaired", {}).items())
        print(
            f"  {src['path']} [{src['format']}]: {src['records']} records = {src['kept']} kept "
            f"({src['validation']} validation, {src['truncated']} truncated{repaired}) + dropped: {dropped}"
        )
    for name, split in manifest.splits.items():
        t = split.totals(manifest.seq_len)
        print(
            f"  {name}: {t['samples']} samples x {manifest.seq_len} tokens in {len(split.shards)} shards, "
            f"{t['documents']} documents, {t['trained_tokens']} trained tokens, "
            f"packing efficiency {100 * t['packing_efficiency']:.2f}%"
        )
    if any(src["dropped"] for src in manifest.sources):
        print(f"  skipped records and their reasons: {os.path.join(cfg.data.shards_dir, SKIPPED_REPORT)}")
    if any(src.get("repaired") for src in manifest.sources):
        print(f"  repaired records and their repairs: {os.path.join(cfg.data.shards_dir, REPAIRED_REPORT)}")
    return 0


def _run(cfg, run_dir: Path, local: bool) -> int:
    """Run the job's workers on Ray (default) or as local processes; returns the exit code. One driver per
    run directory: a second one is refused before it writes anything there."""
    from infinitune.data_pipeline.shards import read_manifest, require_validation_split
    from infinitune.launcher.lock import RunLock

    # What the manifest can tell is checked before any worker (or Ray) starts: a restart would not fix it.
    manifest = read_manifest(cfg.data.shards_dir)
    require_validation_split(manifest, cfg.data.shards_dir, bool(cfg.train.eval_every or cfg.logging.save_logits_probe))
    with RunLock(run_dir):
        return _run_locked(cfg, run_dir, local)


def _run_locked(cfg, run_dir: Path, local: bool) -> int:
    from infinitune.launcher.job_config import run_location, save_job_config
    from infinitune.trainer.preemption import EXIT_PREEMPTED

    storage = run_location(cfg)[1]
    if storage is not None and local:
        raise ConfigError("cluster.storage_path", f"{storage} is a URI, which only Ray writes to; drop --local")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_job_config(cfg, config_path)
    print(f"run directory: {run_dir}\ntensorboard:   tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)
    if storage is not None:
        print(f"storage:       {storage} (checkpoints, and TensorBoard logs copied at each checkpoint)", flush=True)
    if local:
        from infinitune.launcher.local import run_local

        restarts = cfg.cluster.max_failures if cfg.cluster.max_failures >= 0 else 2**31 - 1
        code = run_local(config_path, cfg.cluster.worker_range[1], restarts, cfg.checkpoint.preemption_grace_s)
    else:
        from infinitune.cluster.ray_job import JobFailed, run_job

        try:
            code = run_job(cfg.trainer_spec(run_dir), cfg.cluster, storage)
        except JobFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if code == 0:
        where = f"{storage}/checkpoints" if storage else run_dir / "checkpoints"
        print(f"done: checkpoints in {where}; export with `infinitune export {run_dir} --out DIR`")
    elif code == EXIT_PREEMPTED:
        print(f"stopped with a complete checkpoint; continue with `infinitune resume {run_dir}`", file=sys.stderr)
    else:
        print(
            f"training failed (exit {code}); continue from the last checkpoint with `infinitune resume {run_dir}`",
            file=sys.stderr,
        )
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from infinitune.launcher.job_config import (
        absolute_paths,
        check_against_model,
        check_plan_fits,
        choose_zero_stage,
        load_job_config,
        run_location,
    )

    cfg = absolute_paths(load_job_config(args.config, args.overrides))
    check_against_model(cfg)
    cfg, stage = choose_zero_stage(cfg)
    print(f"ZeRO stage:    {stage}", flush=True)
    if not args.ignore_plan:
        check_plan_fits(cfg)
    return _run(cfg, run_location(cfg)[0], args.local)


def cmd_resume(args: argparse.Namespace) -> int:
    from infinitune.launcher.job_config import absolute_paths, load_job_config

    run_dir = Path(args.run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError("", f"{run_dir} is not a run directory (no config.yaml)")
    cfg = absolute_paths(load_job_config(config, [*args.overrides, "checkpoint.resume=auto"]))
    return _run(cfg, run_dir.resolve(), args.local)


def cmd_submit(args: argparse.Namespace) -> int:
    from infinitune.cluster import jobs
    from infinitune.launcher.job_config import (
        check_plan_fits,
        choose_zero_stage,
        dump_job_config,
        load_job_config,
        run_location,
        save_job_config,
    )

    cfg = load_job_config(args.config, args.overrides)  # refuse a bad config before anything reaches the cluster
    cfg, stage = choose_zero_stage(cfg)  # here, where cluster.gpu says what a device holds
    print(f"ZeRO stage: {stage}", file=sys.stderr)
    if not args.ignore_plan:
        check_plan_fits(cfg)
    job_id = jobs.submit(args.address, dump_job_config(cfg))  # the resolved config, overrides applied
    print(job_id)
    print(
        f"follow it: infinitune status {job_id} --address {args.address}; infinitune logs {job_id} --address ...",
        file=sys.stderr,
    )
    run_dir, storage = run_location(cfg)
    if storage is not None:  # the run's config here too: status, export and eval read its storage from this machine
        run_dir.mkdir(parents=True, exist_ok=True)
        save_job_config(cfg, run_dir / "config.yaml")
        print(
            f"checkpoints in {storage}; from here: infinitune status {run_dir}, infinitune export {run_dir}",
            file=sys.stderr,
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from infinitune.cluster import jobs

    if Path(args.target).is_dir():
        print(json.dumps(jobs.run_status(args.target), indent=1))
        return 0
    if not args.address:
        raise ConfigError("--address", f"{args.target} is not a run directory; a job id needs the cluster's --address")
    print(json.dumps(jobs.status(args.address, args.target), indent=1))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from infinitune.cluster import jobs

    print(jobs.logs(args.address, args.job_id), end="")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from infinitune.cluster import jobs

    print("stopping" if jobs.stop(args.address, args.job_id) else "not running")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from infinitune.launcher.eval_report import build_report, format_report
    from infinitune.trainer.evaluate import EvalSettings, eval_slice
    from infinitune.trainer.generation import Sampling
    from infinitune.trainer.scoring import parse_metrics

    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as e:
        raise ConfigError("--metrics", str(e).split(": ", 1)[1]) from None
    for data in args.data:
        if not Path(data).exists() and "://" not in data:
            raise ConfigError("--data", f"{data} does not exist; give a file of records or a shards directory")
    data = args.data[0] if len(args.data) == 1 else args.data
    sampling = Sampling(args.temperature, args.top_p, args.seed) if args.sample else None
    settings = EvalSettings(metrics, args.max_new_tokens, args.batch_size, args.limit, sampling, args.step)
    if args.workers > 1:
        from infinitune.cluster.eval_job import eval_on_workers

        rows, dropped, total = eval_on_workers(args.model, data, settings, args.workers, args.address)
    else:
        rows, dropped, total = eval_slice(args.model, data, settings)
    report = build_report(args.model, data, settings, rows, dropped, total)
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"report: {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from infinitune.launcher.compare import plot, read_run, table

    runs = [read_run(r) for r in args.runs]
    text = table(runs)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n", encoding="utf-8")
    print(f"loss curves: {plot(runs, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from infinitune.trainer.export import export

    out = export(args.run_dir, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"exported to {out}\n  transformers: AutoModelForCausalLM.from_pretrained('{out}')\n  vLLM: vllm serve {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from infinitune.trainer.generation import reply

    print(reply(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import json

    from infinitune.launcher.job_config import JobConfig, check_against_model, dump_job_config, load_job_config
    from infinitune.typed_config import describe, json_schema

    if args.schema:
        print(json.dumps(json_schema(JobConfig), indent=1))
        return 0
    if args.config is None:
        print(config_reference(JobConfig, describe))
        return 0
    cfg = load_job_config(args.config, args.overrides)
    if args.check_model:
        check_against_model(cfg)
    print(dump_job_config(cfg), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from infinitune.launcher.job_config import choose_zero_stage, job_plan, load_job_config
    from infinitune.trainer.plan import GPUS

    cfg = load_job_config(args.config, args.overrides)
    memory = args.device_memory_gb or (GPUS[args.gpu][0] if args.gpu in GPUS else None)
    cfg, stage = choose_zero_stage(cfg, memory)
    plan = job_plan(cfg, args.gpu, args.device_memory_gb, args.interconnect_gbps)
    print(f"ZeRO stage: {stage}", file=sys.stderr if args.json else sys.stdout)
    print(plan.to_json() if args.json else plan.table())
    return 0


def config_reference(root, describe) -> str:
    """Markdown reference of every config key, from the field docstrings."""
    lines = [
        "# Config reference",
        "",
        "Generated from the config field docstrings by `infinitune config > docs/config.md`; do not edit.",
        "Any key can be overridden on the command line as `section.key=value`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, tp, default, doc in describe(root):
        doc, tp = " ".join(doc.split()).replace("|", "\\|"), tp.replace("|", "\\|")
        lines.append(f"| `{key}` | {tp} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinitune",
        description="Fine-tune instruction-following LLMs: prepare shards, train with Ray + DeepSpeed, export.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate-data", help="write synthetic instruction tasks with checkable answers (JSONL)")
    p.add_argument("--n", type=_count, required=True, help="number of records")
    p.add_argument("--seed", type=int, default=0, help="stream seed (use another seed for held-out tasks)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--format", choices=["alpaca", "messages"], default="alpaca")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument(
        "--constraints",
        type=float,
        default=0.0,
        help="share of records (0-1) that get 1-3 verifiable IFEval constraints and a response that follows them",
    )
    p.add_argument("--constraint-types", default=None, help="comma-separated constraint types to draw (default: all)")
    p.add_argument(
        "--hold-out-types",
        default=None,
        help="comma-separated constraint types never drawn (to measure following a type never trained on)",
    )
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        help="add the constraints to these single-turn records (any format prepare reads) instead of synthetic tasks",
    )
    p.set_defaults(func=cmd_generate_data)

    p = sub.add_parser("prepare", help="sources -> chat-templated, masked, packed WebDataset shards")
    _add_overrides(p)
    p.add_argument("--skip-invalid", action="store_true", help="skip bad records (counted, in skipped.jsonl)")
    p.add_argument("--num-proc", type=int, default=None, help="processes (default: data.num_proc)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("index", help="write the sample indexes of shards prepared without them (older versions)")
    p.add_argument("shards_dir", help="a local shards directory (with manifest.json)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("train", help="fine-tune on Ray (embedded, or cluster.address) with DeepSpeed workers")
    _add_overrides(p)
    p.add_argument(
        "--local",
        action="store_true",
        help="run the workers on this machine under torchrun's agent (torch.distributed.run), without Ray",
    )
    p.add_argument("--ignore-plan", action="store_true", help="launch even if the plan says it will not fit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="submit the job to a Ray cluster as a Ray Job; prints its id")
    _add_overrides(p)
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    p.add_argument("--ignore-plan", action="store_true", help="submit even if the plan says it will not fit")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="where a run directory or a submitted job stands")
    p.add_argument("target", help="a run directory, or a job id (with --address)")
    p.add_argument("--address", default=None, help="the cluster's dashboard, for a job id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a submitted job's output")
    p.add_argument("job_id")
    p.add_argument("--address", required=True)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a submitted job (its workers save within three step boundaries)")
    p.add_argument("job_id")
    p.add_argument("--address", required=True)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("resume", help="continue a stopped or preempted run from its newest complete checkpoint")
    p.add_argument("run_dir", help="the run directory (cluster.storage_path/name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=2000 to extend a run")
    p.add_argument(
        "--local",
        action="store_true",
        help="run the workers on this machine under torchrun's agent (torch.distributed.run), without Ray",
    )
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("export", help="a run's checkpoint -> an HF directory (safetensors, tokenizer), LoRA merged")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights dtype (default: model.dtype)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval",
        help="score a model, an export or a run on held-out tasks: exact match, ROUGE-L, BLEU, loss, and "
        "instruction following on prompts with verifiable constraints (ifeval)",
    )
    p.add_argument("model", help="an HF directory, a hub id or .gguf (the base model), or a run directory")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="records (JSON, JSONL, parquet, ...; with constraints, or IFEval's input_data.jsonl) or a prepared "
        "shards directory; repeat it to score several sets with one model load (the report has each apart)",
    )
    p.add_argument(
        "--metrics",
        default="exact_match,rouge_l,bleu,loss",
        help="comma-separated, from the above; ifeval: prompt- and instruction-level accuracy, strict and loose",
    )
    p.add_argument("--limit", type=_count, default=None, help="use the first N examples")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="with a run directory: this step's checkpoint")
    p.add_argument("--workers", type=int, default=1, help="spread the examples over this many Ray workers")
    p.add_argument("--address", default=None, help="with --workers: the Ray cluster (default: an embedded one)")
    p.add_argument("--out", default=None, help="write the JSON report (aggregates and per-example rows) here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare", help="a table of eval metrics, tokens, time and memory of runs, and their loss curves"
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (their tensorboard/ is read)")
    p.add_argument("--out", default="compare.png", help="the loss-curve plot (PNG)")
    p.add_argument("--table", default=None, help="also write the table (markdown) here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="answer a prompt with a model directory (chat template applied)")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("config", help="print the config reference, or a config resolved and checked")
    p.add_argument("config", nargs="?", default=None, help="a YAML job config to check and print resolved")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--check-model", action="store_true", help="also check against the model's config")
    p.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of a job config instead (docs/config.schema.json; editors check YAML with it)",
    )
    p.set_defaults(func=cmd_config)

    from infinitune.trainer.plan import GPUS

    p = sub.add_parser("plan", help="what the job needs on each GPU and sends each step, before it is launched")
    _add_overrides(p)
    p.add_argument("--gpu", choices=sorted(GPUS), default=None, help="the GPU (default: cluster.gpu, else H100)")
    p.add_argument("--device-memory-gb", type=float, default=None, help="the GPU's memory, if not the table's")
    p.add_argument("--interconnect-gbps", type=float, default=None, help="default: cluster.interconnect_gbps")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow the options (`submit CONFIG --address URL key=value`), as the docs write it.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from infinitune.data_pipeline.errors import DataError
    from infinitune.data_pipeline.tokenizer import ModelSourceError

    known: tuple[type[Exception], ...] = (ConfigError, DataError, ModelSourceError, ConnectionError)
    if args.command in ("export", "generate", "eval", "compare"):
        from infinitune.trainer.loading import ExportError

        known = (*known, ExportError, OSError)
    try:
        return args.func(args)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
