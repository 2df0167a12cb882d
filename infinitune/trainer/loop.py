"""The training loop, one function read top to bottom: batch, forward, backward, step, metrics, eval,
checkpoint, preemption. Everything it needs is built in `setup`; everything it saves goes through the
Checkpointer. Runs in each worker process, under torchrun, Ray Train or Slurm alike."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml

from infinitune.data_pipeline.errors import DataError
from infinitune.data_pipeline.shards import check_tokenizer, read_manifest, require_validation_split
from infinitune.data_pipeline.stream import BatchLayout, StatefulLoader, verify_shards
from infinitune.data_pipeline.template import IGNORE
from infinitune.data_pipeline.tokenizer import load_tokenizer, resolve_chat_template, tokenizer_fingerprint
from infinitune.trainer import distributed, faults
from infinitune.trainer.checkpoint import Checkpointer, Completed
from infinitune.trainer.config import (
    ModelConfig,
)
from infinitune.trainer.context import RunContext
from infinitune.trainer.ds_config import deepspeed_config, loop_clips
from infinitune.trainer.evaluate import (
    as_markdown,
    evaluate_examples,
    examples_from_records,
    examples_from_shards,
    validation_loss,
)
from infinitune.trainer.metrics import (
    FlopCounter,
    MetricsWriter,
    StepProfiler,
    device_memory_gb,
    device_peak_tflops,
    host_peak_rss_gb,
    host_rss_gb,
    process_counts,
)
from infinitune.trainer.model import (
    PRECISION_DTYPES,
    AdaLoraBudget,
    build_model,
    document_lengths,
    hf_config,
    parameter_counts,
)
from infinitune.trainer.preemption import EXIT_PREEMPTED, Preemption
from infinitune.trainer.random_state import RandomState, seed_everything
from infinitune.trainer.schedule import make_scheduler
from infinitune.trainer.scoring import HIGHER_IS_BETTER, perplexity, score_rows
from infinitune.trainer.spec import TrainerSpec

log = logging.getLogger(__name__)
EXIT_OK = 0


@dataclass
class TrainState:
    """Loop state that survives a restart (the engine, data stream and RNG are saved beside it)."""

    step: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    best_eval_loss: float = math.inf
    best_eval: float = math.nan  # of train.early_stopping_metric
    evals: int = 0
    evals_without_improvement: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in asdict(self):
            setattr(self, k, state.get(k, getattr(self, k)))  # fields added later keep their defaults


def train(spec: TrainerSpec, ctx: RunContext) -> int:
    """Run (or continue) the job; returns EXIT_OK, or EXIT_PREEMPTED after a save on SIGTERM/SIGUSR1."""
    trainer = setup(spec, ctx)
    try:
        return _loop(trainer, spec, ctx)
    finally:
        trainer.checkpointer.close()


def _loop(trainer: Trainer, spec: TrainerSpec, ctx: RunContext) -> int:
    engine, state, cfg = trainer.engine, trainer.state, spec.train
    batches = iter(trainer.train_loader)
    step_loss = math.nan
    window = PerfWindow()
    profiler = StepProfiler(spec.logging.profile_steps, Path(spec.run_dir) / "profile" / f"rank{trainer.rank}")
    log.info(
        "training from step %d to %d on %d workers at ZeRO stage %d",
        state.step,
        cfg.max_steps,
        trainer.world,
        engine.zero_optimization_stage(),
    )
    while state.step < cfg.max_steps:
        profiler.before(state.step + 1)
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(trainer.layout.accumulation)]
        data_wait = time.perf_counter() - t0
        lr = engine.get_lr()[0]
        sums = StepSums(
            micro,
            trainer.flops,
            preempt=trainer.preemption.known(ctx.preemption_requested()),
            writing=trainer.checkpointer.writing(),
        )
        loss_sum, clipped_norm = train_step(
            trainer.engine,
            micro,
            sums,
            trainer.world,
            trainer.device,
            trainer.adalora,
            state.step + 1,
            clip=spec.train.max_grad_norm if loop_clips(spec.deepspeed) else 0.0,
        )
        state.step += 1
        state.tokens_seen += sums.tokens
        state.trained_tokens_seen += sums.trained
        # What each rank knew when the step began: a signal that arrives during a step stops the next one.
        preempted = trainer.preemption.agree(sums.preempt)
        last = state.step == cfg.max_steps
        log_due = state.step % spec.logging.log_every == 0 or last
        eval_due = bool(cfg.eval_every) and (state.step % cfg.eval_every == 0 or last)
        every = spec.checkpoint.every_steps
        save_due = preempted or last or bool(every and state.step % every == 0)
        # A background save counts once every rank has written its files (they all said so this step).
        completing = not save_due and trainer.checkpointer.pending() and not sums.writing
        if log_due or eval_due or save_due or completing:  # the only steps that wait on the device
            step_loss = float(distributed.all_reduce(loss_sum).item()) / max(sums.trained, 1)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"step {state.step}: loss is {step_loss}; lower train.lr or check the data")
        window.add(data_wait, sums)
        profiler.after(state.step)

        if log_due:
            allocated, peak = device_memory_gb()
            fds, threads = process_counts()
            metrics = {
                "train/loss": step_loss,
                "train/lr": lr,
                "train/grad_norm": float(
                    clipped_norm if clipped_norm is not None else engine.get_global_grad_norm() or 0.0
                ),
                "train/epoch": trainer.train_loader.epoch,
                "train/trained_tokens": state.trained_tokens_seen,
                **window.metrics(trainer.peak_tflops * 1e12 * trainer.world),
                "memory/host_rss_gb": host_rss_gb(),
                "memory/host_peak_gb": host_peak_rss_gb(),
                "memory/device_allocated_gb": allocated,
                "memory/device_peak_gb": peak,
                "proc/open_fds": fds,
                "proc/threads": threads,
            }
            trainer.metrics.scalars(state.step, metrics)
            ctx.report(state.step, metrics, None)
            window = PerfWindow()
        if spec.logging.log_samples:
            ids = distributed.all_gather_object([int(i) for mb in micro for i in mb["sample_index"]])
            trainer.metrics.samples(state.step, [i for rank_ids in ids for i in rank_ids])
        faults.maybe_fail("after_step", state.step, trainer.rank)

        stop = False
        t_other = time.perf_counter()
        # A preempted run saves first: the scheduler's grace period is not spent on evaluation.
        if eval_due and not preempted:
            stop = evaluate(trainer, spec, state, ctx)
        if stop or save_due:
            save(trainer, state.step, ctx, background=spec.checkpoint.async_save and not (preempted or stop or last))
        elif completing:
            completed(trainer, ctx, trainer.checkpointer.wait())
        window.exclude(time.perf_counter() - t_other)
        if preempted:
            log.warning(
                "stopped at step %d on %s with a complete checkpoint", state.step, trainer.preemption.signal_name
            )
            if trainer.preemption.seconds_left() < 0:
                log.warning("the save ended %.0f s after the grace period", -trainer.preemption.seconds_left())
            trainer.metrics.close()
            return EXIT_PREEMPTED
        if stop:
            log.info("early stop at step %d: validation loss has not improved", state.step)
            break
    if spec.logging.save_logits_probe:
        save_logits_probe(trainer, spec)
    trainer.metrics.hparams(
        {k: v for k, v in flat(spec.resolved_config).items()},
        {
            "hparam/final_loss": step_loss,
            "hparam/best_eval_loss": state.best_eval_loss,
        },
    )
    trainer.metrics.close()
    return EXIT_OK


class StepSums:
    """What the ranks must agree on about a step, from what each knows on the host before it runs: the
    trained tokens (the loss normalisation), tokens and FLOPs (the metrics), preemption requests and
    background checkpoint writers still busy, each summed over ranks in one collective over the host's
    process group. It starts here, before the forward, and is first awaited before the first backward, so
    the step never waits on the device for it."""

    def __init__(self, micro: list[dict], flops: FlopCounter | None = None, preempt: bool = False, writing=False):
        self._sums = distributed.HostSum(
            [
                sum(trained_tokens(mb) for mb in micro),
                sum(mb["input_ids"].numel() for mb in micro),
                sum(flops.step_flops(mb["position_ids"]) for mb in micro) if flops else 0.0,
                float(preempt),
                float(writing),
            ]
        )
        self._values: list[float] | None = None

    def _value(self, i: int) -> float:
        if self._values is None:
            self._values = self._sums.result()
        return self._values[i]

    @property
    def trained(self) -> int:
        return int(self._value(0))

    @property
    def tokens(self) -> int:
        return int(self._value(1))

    @property
    def flops(self) -> float:
        return self._value(2)

    @property
    def preempt(self) -> bool:
        """Whether any rank knew of a preemption request."""
        return self._value(3) > 0

    @property
    def writing(self) -> bool:
        """Whether any rank was still writing a background checkpoint."""
        return self._value(4) > 0


def trained_tokens(mb: dict) -> int:
    """Positions of a micro-batch whose next token is trained on, counted on the host."""
    return int(np.count_nonzero(mb["labels"].numpy()[:, 1:] != IGNORE))


class PerfWindow:
    """Throughput since the last log: the wall-clock time from the end of the last log to the end of this one,
    less the time spent evaluating and saving. A step that logs, evaluates or saves first reads its loss back
    from the device, so the device's work of every step in between falls inside the window (a single step timed
    without a sync would time only its launch)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.excluded = self.data_wait = 0.0
        self.steps = self.tokens = self.trained = 0
        self.flops = 0.0

    def add(self, data_wait: float, sums: StepSums) -> None:
        self.steps += 1
        self.data_wait += data_wait
        self.tokens += sums.tokens
        self.trained += sums.trained
        self.flops += sums.flops

    def exclude(self, seconds: float) -> None:
        """Time that is not training (an evaluation, a save)."""
        self.excluded += seconds

    def metrics(self, peak_flops: float) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started - self.excluded, 1e-9)
        return {
            "perf/tokens_per_s": self.tokens / seconds,
            "perf/trained_tokens_per_s": self.trained / seconds,
            "perf/mfu": self.flops / seconds / peak_flops if peak_flops else 0.0,
            "perf/step_time_s": seconds / max(self.steps, 1),
            "perf/data_wait_fraction": self.data_wait / seconds,
        }


def train_step(
    engine,
    micro: list[dict],
    sums: StepSums,
    world: int,
    device: torch.device,
    adalora=None,
    step: int = 0,
    clip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches; returns this rank's summed loss and, where the loop
    clips (`clip`, the max norm, when DeepSpeed does not), the gradients' norm before clipping, both on the device
    (the loop reduces the loss over ranks only at the steps that report it: nothing here waits on the device).

    Every trained token of the global batch weighs the same: each micro-batch's summed loss is divided by
    the trained tokens of all ranks together, `sums.trained`, first read once the first forward is issued
    (DeepSpeed then averages gradients over ranks, hence x world).
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm = None
    for mb in micro:
        loss, _ = engine(
            *(mb[k].to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids")),
            documents=document_lengths(mb["position_ids"]),  # from the host's copy
        )
        engine.backward(loss * (world / max(sums.trained, 1)), scale_wrt_gas=False)
        last = mb is micro[-1]
        if clip and last:  # the gradients are whole and (the last backward all-reduced them) the same on every rank
            norm = torch.nn.utils.clip_grad_norm_([p for p in engine.module.parameters() if p.grad is not None], clip)
        if adalora is not None and last:
            adalora.before_step(step)  # reads the gradients, which the optimizer step clears
        engine.step()
        if adalora is not None and last:
            adalora.after_step(step)
        loss_sum += loss.detach().double()
    return loss_sum, norm


def evaluate(trainer: Trainer, spec: TrainerSpec, state: TrainState, ctx: RunContext) -> bool:
    """Validation loss and perplexity over the whole split, and the held-out tasks answered and scored (the
    code of `infinitune eval`); returns whether early stopping says stop."""
    loss, _ = validation_loss(trainer.engine, trainer.val_loader)
    metrics = {"eval/loss": loss, "eval/ppl": perplexity(loss)}
    if trainer.examples:
        rows = evaluate_examples(
            trainer.lm,
            trainer.tokenizer,
            trainer.examples,
            spec.train.eval_metrics,
            spec.train.max_new_tokens,
            batch_size=8,
            synced=trainer.zero3 and trainer.world > 1,
        )
        scores = score_rows(rows, spec.train.eval_metrics)
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
        trainer.metrics.text(state.step, "eval/generations", as_markdown(rows[:8]))
    trainer.metrics.scalars(state.step, metrics)
    ctx.report(state.step, metrics, None)
    watched = spec.train.early_stopping_metric
    value = metrics.get(f"eval/{watched}")
    patience = spec.train.early_stopping_patience
    if value is None:  # e.g. exact_match on eval_tasks that are prompts alone: nothing to compare with
        if patience:
            raise DataError(
                f"train.early_stopping_metric: {watched} was not computed at step {state.step} "
                f"(computed: {', '.join(sorted(metrics))}); watch one of those"
            )
        value = state.best_eval  # nothing to watch this time: the watch stays where it was
    better = value > state.best_eval if HIGHER_IS_BETTER[watched] else value < state.best_eval
    if better or state.evals == 0:
        state.best_eval, state.evals_without_improvement = value, 0
    else:
        state.evals_without_improvement += 1
    state.best_eval_loss = min(state.best_eval_loss, loss)
    state.evals += 1
    return bool(patience and state.evals_without_improvement >= patience)


def eval_tasks(spec: TrainerSpec, base: str, manifest, tokenizer) -> list:
    """The tasks answered at each evaluation: the first eval_generations of train.eval_tasks, or else of the
    validation split's documents."""
    n = spec.train.eval_generations
    if not n:
        return []
    if spec.train.eval_tasks is None:
        return examples_from_shards(base, manifest, tokenizer, n)
    examples, dropped = examples_from_records(spec.train.eval_tasks, tokenizer, n, "train.eval_tasks")
    if dropped:
        log.warning("train.eval_tasks %s: records left out: %s", spec.train.eval_tasks, dropped)
    if "ifeval" in spec.train.eval_metrics and not any(e.constraints for e in examples):
        raise DataError(f"train.eval_tasks {spec.train.eval_tasks}: no record carries constraints for ifeval")
    return examples


def save(trainer: Trainer, step: int, ctx: RunContext, background: bool = False) -> None:
    t0 = time.perf_counter()
    completed(trainer, ctx, trainer.checkpointer.wait())  # one background save at a time
    directory = trainer.checkpointer.save(step, background=background)
    blocked = time.perf_counter() - t0
    trainer.metrics.scalars(step, {"perf/checkpoint_s": blocked})
    if directory is not None:
        trainer.metrics.flush()  # a launcher that copies the logs at each checkpoint copies them whole
        ctx.report(step, {"perf/checkpoint_s": blocked}, directory)


def completed(trainer: Trainer, ctx: RunContext, done: Completed | None) -> None:
    """A background save just completed: reported like any checkpoint, with how long it took to write."""
    if done is None:
        return
    trainer.metrics.scalars(done.step, {"perf/checkpoint_write_s": done.seconds})
    trainer.metrics.flush()
    ctx.report(done.step, {"perf/checkpoint_write_s": done.seconds}, done.directory)


@dataclass
class Trainer:
    """Everything the loop works with on this rank, built once by `setup`."""

    rank: int
    world: int
    device: torch.device
    layout: BatchLayout
    engine: Any
    lm: Any  # the HF (or peft) model inside the engine, for generation
    tokenizer: Any
    train_loader: StatefulLoader
    val_loader: StatefulLoader
    examples: list  # held-out tasks answered at each evaluation
    adalora: AdaLoraBudget | None  # AdaLoRA's rank budget, updated around each optimizer step
    checkpointer: Checkpointer
    metrics: MetricsWriter
    preemption: Preemption
    flops: FlopCounter
    peak_tflops: float
    zero3: bool
    state: TrainState


def setup(spec: TrainerSpec, ctx: RunContext) -> Trainer:
    # Where the time to the first step goes: the process's start (interpreter, imports) and each part of the
    # setup, as setup/*_s in the metrics.
    phases = [("start", psutil.Process().create_time()), ("process", time.time())]
    rank, world = distributed.init_distributed()
    log.info("worker rank %d of %d: pid %d on %s", rank, world, os.getpid(), socket.gethostname())
    seed_everything(spec.train.seed + rank)  # dropout differs per rank; what must agree is seeded apart
    import deepspeed

    phases.append(("distributed", time.time()))

    tokenizer = load_tokenizer(
        spec.model.tokenizer or spec.model.path, None if spec.model.tokenizer else spec.model.gguf_file
    )
    base = spec.data.shards_dir
    manifest = read_manifest(base)
    # The template the data was rendered with is the one the model learns, generates with and is exported with.
    tokenizer.chat_template = resolve_chat_template(tokenizer, spec.data.chat_template)
    check_tokenizer(manifest, tokenizer_fingerprint(tokenizer), tokenizer.chat_template, base)
    val_samples = require_validation_split(
        manifest, base, bool(spec.train.eval_every or spec.logging.save_logits_probe)
    )
    check_shards(base, manifest, spec.data.verify, rank, world)
    layout = BatchLayout(spec.train.global_batch_size, world, spec.train.micro_batch_size)

    phases.append(("data", time.time()))

    config = hf_config(spec.model)
    ds_config = deepspeed_config(spec.deepspeed, spec.train, layout, getattr(config, "hidden_size", None))
    zero3 = spec.deepspeed.zero_stage == 3
    dtype = PRECISION_DTYPES[spec.deepspeed.precision]
    model = build_model(spec.model, config, dtype, ds_config if zero3 else None, spec.train.seed, spec.train.max_steps)
    trainable, frozen = parameter_counts(model)
    phases.append(("model", time.time()))
    optimizer = None
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.deepspeed.offload_optimizer == "none":
        optimizer = torch.optim.AdamW(
            params,
            lr=spec.train.lr,
            betas=tuple(spec.train.betas),
            weight_decay=spec.train.weight_decay,
            fused=True,  # one kernel for all parameters, on CPU too (0.12x the default's time: bench/optimizer.py)
        )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params if optimizer is None else None,
        lr_scheduler=(lambda opt: make_scheduler(opt, spec.train)),
        config=ds_config,
    )
    if world == 1 and spec.deepspeed.zero_stage == 0:
        # Stage 0 all-reduces the gradients through a flat copy of all of them (up to 5e8 elements): one worker
        # has nothing to reduce, and the copy would add the gradients' size to its peak memory.
        engine.enable_backward_allreduce = False
    phases.append(("engine", time.time()))

    data = spec.data
    train_loader = StatefulLoader(
        base,
        "train",
        layout=layout,
        rank=rank,
        manifest=manifest,
        seed=data.seed,
        shuffle=data.shuffle,
        shuffle_window=data.shuffle_window,
        num_workers=data.num_workers,
    )
    val_layout = BatchLayout(world * spec.train.micro_batch_size, world, spec.train.micro_batch_size)
    val_loader = (
        StatefulLoader(
            base,
            "val",
            layout=val_layout,
            rank=rank,
            manifest=manifest,
            shuffle=False,
            num_workers=0,
            end=val_samples,
        )
        if val_samples
        else None
    )

    run_dir = Path(spec.run_dir)
    root, shared = ctx.checkpoint_root(run_dir, rank)
    lm = engine.module.lm
    adapter = spec.model.adapter
    checkpointer = Checkpointer(
        root,
        rank,
        world,
        spec.checkpoint,
        shared=shared,
        # An adapter run's checkpoints hold what trains (adapter weights, their optimizer state), not the base.
        trainable_only=adapter is not None,
        files=hf_files(lm, tokenizer, spec.model, spec.train.max_steps),
        about={"zero_stage": spec.deepspeed.zero_stage, "config": spec.resolved_config},
    )
    budget = AdaLoraBudget(lm) if adapter is not None and adapter.method == "adalora" else None
    state = TrainState()
    checkpointer.register(
        engine=engine, train=state, data=train_loader, rng=RandomState(spec.train.seed, rank), adapter=budget
    )
    restored = checkpointer.load(directory=ctx.restore_from())
    ctx.restore_done()  # load() ends with a barrier: every rank has read the checkpoint

    phases.append(("loaders_and_resume", time.time()))
    peak, peak_source = device_peak_tflops(spec.logging.peak_tflops)
    metrics = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=spec.logging.tensorboard)
    took = {f"setup/{name}_s": t - before for (_, before), (name, t) in zip(phases, phases[1:])}
    log.info("setup: %s", ", ".join(f"{k[6:-2]} {v:.1f} s" for k, v in took.items()))
    metrics.scalars(state.step, {"cluster/workers": world, **took})
    written_by = checkpointer.restored.world_size if restored else world
    if written_by != world:
        # The launcher restarted the workers with another size: a node lost with no replacement, nodes back
        # (an elastic job's resize), or a resume with another cluster.num_workers.
        message = f"continuing on {world} workers from step {state.step}, which {written_by} workers wrote"
        log.warning("%s (same global batch, schedule and sample order)", message)
        ctx.report(state.step, {"cluster/workers": world, "message": message}, None)
    if not restored and rank == 0:
        metrics.text(0, "config", "```yaml\n" + yaml.safe_dump(spec.resolved_config, sort_keys=False) + "```")
        metrics.text(
            0,
            "run",
            f"{world} workers, {trainable:,} trainable and {frozen:,} frozen parameters, "
            f"MFU against {peak:.1f} TFLOP/s per device ({peak_source})",
        )
    return Trainer(
        rank=rank,
        world=world,
        device=distributed.device(),
        layout=layout,
        engine=engine,
        lm=lm,
        tokenizer=tokenizer,
        train_loader=train_loader,
        val_loader=val_loader,
        examples=eval_tasks(spec, base, manifest, tokenizer) if val_loader else [],
        checkpointer=checkpointer,
        metrics=metrics,
        preemption=Preemption(spec.checkpoint.preemption_grace_s),
        flops=FlopCounter(getattr(lm, "config", None), trainable, frozen),
        peak_tflops=peak,
        zero3=zero3,
        adalora=budget,
        state=state,
    )


def check_shards(base: str, manifest, mode: str, rank: int, world: int) -> None:
    """Each rank checks its share of the shards; all ranks stop if any share is damaged."""
    problem = None
    try:
        verify_shards(base, manifest, mode, rank, world)
    except DataError as e:
        problem = e
    if distributed.all_reduce(0 if problem is None else 1, op="max").item():
        raise problem or DataError(f"{base}: another worker found a damaged shard (its log names it)")


def hf_files(lm, tokenizer, model_cfg: ModelConfig, total_steps: int) -> dict[str, bytes]:
    """The model's config and tokenizer files, stored in every checkpoint so export needs nothing else."""
    files: dict[str, bytes] = {}
    base = getattr(lm, "get_base_model", lambda: lm)()
    with tempfile.TemporaryDirectory() as tmp:
        base.config.save_pretrained(tmp)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(tmp)  # the model's own end-of-turn ids and defaults
        tokenizer.save_pretrained(tmp)
        for p in Path(tmp).iterdir():
            files[p.name] = p.read_bytes()
    if model_cfg.adapter is not None:  # export rebuilds the adapter from this and the base model's source
        files["adapter.json"] = json.dumps(
            {
                **model_cfg.adapter.model_dump(),
                "base": {"path": model_cfg.path, "gguf_file": model_cfg.gguf_file},
                "total_steps": total_steps,
            }
        ).encode()
    files["export.json"] = json.dumps({"dtype": model_cfg.dtype}).encode()
    return files


def save_logits_probe(trainer: Trainer, spec: TrainerSpec) -> None:
    """Logits of the model on the first validation micro-batch, for checking an export against the engine."""
    mb = next(iter(trainer.val_loader))
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.lm(
            input_ids=mb["input_ids"].to(trainer.device),
            position_ids=mb["position_ids"].to(trainer.device),
            use_cache=False,
        ).logits
    trainer.engine.train()
    if trainer.rank == 0:
        torch.save(
            {"batch": {k: mb[k] for k in ("input_ids", "position_ids")}, "logits": logits.float().cpu()},
            Path(spec.run_dir) / "logits_probe.pt",
        )


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
