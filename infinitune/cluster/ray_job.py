"""Running a job on Ray: connect (embedded or an existing cluster), start the workers with Ray Train's
TorchTrainer, persist every complete checkpoint through Ray, restart failed workers from the last one.

Checkpoints: each worker writes its own files into a local directory (the trainer's Checkpointer), then
every worker reports it with `ray.train.report(..., checkpoint_dir_name="step_NNNNNN")`: Ray merges all
ranks' files into RUN_DIR/checkpoints/step_NNNNNN and registers it once every rank's part is uploaded. A
restarted worker group continues from `ray.train.get_checkpoint()`, read in place where the storage is a
file system all nodes share (no copy), downloaded otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend  # Ray's own backend, extended by one step before it
from ray.train.v2._internal.execution.callback import WorkerCallback
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from infinitune.cluster.config import ClusterConfig
from infinitune.data_pipeline.errors import DataError
from infinitune.trainer import distributed
from infinitune.trainer.checkpoint_errors import CheckpointError
from infinitune.trainer.checkpoint_format import COMPLETE, checkpoint_problem
from infinitune.trainer.context import RunContext
from infinitune.trainer.distributed import interface_of
from infinitune.trainer.loop import train
from infinitune.trainer.preemption import EXIT_PREEMPTED, install_process_handlers, restore_process_handlers
from infinitune.trainer.process import configure_logging
from infinitune.trainer.spec import TrainerSpec
from infinitune.trainer.storage import upload
from infinitune.typed_config import ConfigError

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The job failed and Ray's retries are used up; the message says what failed and how to go on."""


class FatalError(RuntimeError):
    """An error in a worker that a restart cannot fix: the job ends at its first failure with this message."""


# Bad data, a bad config or a refused checkpoint fail the same way at every restart; so does a loss that turned
# non-finite, since a restart repeats the same steps exactly from the same checkpoint. Storage that could not be
# read or written (`transient`) may work again: that is restarted like a crash.
DETERMINISTIC = (DataError, ConfigError, CheckpointError, FloatingPointError)


def restart_cannot_fix(error: BaseException) -> bool:
    return isinstance(error, DETERMINISTIC) and not getattr(error, "transient", False)


def ray_environment(embedded: bool, worker_start_timeout_s: float = 60.0) -> dict[str, str]:
    env = {
        # Ray Train's controller polls its workers this often; report() waits for it (2 s by default).
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
        # How long the controller waits for a worker group to start before it decides again (an elastic job on
        # fewer workers, once a lost node's resources are still counted).
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(worker_start_timeout_s),
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if embedded:
        # A cluster of this process alone, on 127.0.0.1: no token file written into the user's home.
        env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    for name in (
        "INFINITUNE_FAULT",
        "INFINITUNE_FAULT_ONCE",
        "INFINITUNE_FAULT_SLOW_S",
        "INFINITUNE_CACHE",
        "HF_HUB_OFFLINE",
    ):
        if name in os.environ:  # what the driver's environment says about the run, the workers see too
            env[name] = os.environ[name]
    return env


def connect(cfg: ClusterConfig) -> bool:
    """Join the configured cluster, or start an embedded one; returns whether this call started Ray."""
    if ray.is_initialized():
        return False
    embedded = cfg.address is None
    env = ray_environment(embedded, cfg.worker_start_timeout_s)
    os.environ.update(env)
    if embedded:
        # A cluster of its own: `address="local"` never joins a Ray already running on this machine, nor one that
        # ended leaving its address file behind (RAY_ADDRESS too would be joined; the cluster's processes inherit
        # it, and Ray's own state queries follow it).
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(
            address="local",
            object_store_memory=cfg.object_store_memory_mb * 2**20,
            # On 127.0.0.1 only: Ray Train's state queries need it (without, its controller logs a failure
            # every few seconds), and the user gets a view of the run.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )
    else:
        ray.init(address=cfg.address, runtime_env={"env_vars": env}, log_to_driver=True)
    return True


def bind_to_node_interface() -> None:
    """gloo binds to the interface that carries this worker's Ray node address, unless the user set
    GLOO_SOCKET_IFNAME. Left to itself it takes the address the host name resolves to, which on many images
    (Ubuntu's default /etc/hosts: 127.0.1.1) is loopback: the other hosts then fail to connect ("Gloo
    connectFullMesh failed ... Connection refused"). NCCL chooses its own interfaces (not by the host name; its
    data goes over InfiniBand or the fastest NIC), so NCCL_SOCKET_IFNAME is left to the user."""
    name = interface_of(ray.util.get_node_ip_address())
    if name is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)


def torch_config(use_gpu: bool):
    """Ray Train's TorchConfig, whose workers bind their collectives to their node's interface before the
    process group is made."""

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(bind_to_node_interface)
            super().on_start(worker_group, backend_config)

    class BoundTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return BoundTorchConfig(backend="nccl" if use_gpu else "gloo")


def _worker_callbacks() -> list:
    class PreemptionSignals(WorkerCallback):
        """SIGTERM/SIGUSR1 to a worker process make the loop save within two step boundaries; signals reach a
        process's main thread only, which is where Ray runs this hook."""

        def after_init_train_context(self):
            if threading.current_thread() is threading.main_thread():
                install_process_handlers()

        def before_worker_shutdown(self):
            if threading.current_thread() is threading.main_thread():
                restore_process_handlers()  # Ray's own SIGTERM (exit) again, now that training is over

    class FailFast(UserCallback):
        """On Ray Train's controller: a worker's FatalError ends the run at once instead of being retried
        (an error raised here is a controller failure, which Ray does not retry)."""

        def after_exception(self, run_context, worker_exceptions):
            for _, error in sorted(worker_exceptions.items()):
                if isinstance(error, FatalError):
                    raise error

    return [PreemptionSignals(), FailFast()]


class RayContext(RunContext):
    """The trainer's view of Ray: where to write checkpoints, how to persist and restore them, progress."""

    def __init__(self, progress=None, run_dir: Path | None = None, storage: str | None = None, stop=None):
        self.progress = progress
        self.run_dir = run_dir
        self.storage = storage  # a URI: rank 0 copies TensorBoard logs and metrics there at every checkpoint
        self.stop = stop  # the driver's StopFlag actor: set when the driver is told to stop (SIGTERM, Ctrl-C)
        self._asking = None  # the question to it in flight
        self._restored: Path | None = None  # this node's copy of the checkpoint restored from object storage
        self._root: Path | None = None

    def checkpoint_root(self, run_dir: Path, rank: int) -> tuple[Path, bool]:
        context = ray.train.get_context()
        name = f"infinitune-{context.get_experiment_name()}-rank{rank}-{os.getpid()}"
        self._root = Path(tempfile.gettempdir()) / name
        return self._root, False

    def close(self) -> None:
        """Remove this process's checkpoint staging directory: Ray took each checkpoint from it as it was
        reported, and what remains (DeepSpeed's recovery scripts, a save abandoned part way) is of no use."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def restore_from(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if getattr(checkpoint.filesystem, "type_name", "") == "local":
            return Path(checkpoint.path)  # a shared file system: read in place, nothing copied
        # From object storage: one copy per node, which its ranks share (and convert once, see reshard.py).
        run = hashlib.sha256(str(Path(checkpoint.path).parent).encode()).hexdigest()[:16]
        target = Path(tempfile.gettempdir()) / f"infinitune-restore-{run}" / Path(checkpoint.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank of the node downloads; the others wait for it
            with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{COMPLETE}") as f:
                marker = f.read()
            copied = target / COMPLETE
            if target.is_dir() and not (
                copied.is_file() and copied.read_bytes() == marker and checkpoint_problem(target, "size") is None
            ):  # another save of that step, or a copy whose removal died part way
                shutil.rmtree(target)
            for debris in target.parent.iterdir():  # older copies, downloads that died: never used again
                if debris.name not in (target.name, ".lock"):
                    shutil.rmtree(debris, ignore_errors=True)
            if not target.is_dir():
                staging = target.with_name(f"{target.name}.staging-{os.getpid()}")
                started = time.perf_counter()
                checkpoint.to_directory(str(staging))
                os.replace(staging, target)
                size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
                log.info(
                    "copied %s from storage to %s (%.2f GB in %.1f s) for this node's ranks",
                    target.name,
                    target,
                    size / 1e9,
                    time.perf_counter() - started,
                )
            else:
                log.info("using this node's copy of %s in %s", target.name, target)
        self._restored = target
        return target

    def restore_done(self) -> None:
        if self._restored is not None and ray.train.get_context().get_local_rank() == 0:
            # Renamed first: a removal cut short leaves no directory that looks like a copy to reuse.
            parent = self._restored.parent
            gone = parent.with_name(f"{parent.name}.removing-{os.getpid()}")
            os.replace(parent, gone)
            shutil.rmtree(gone, ignore_errors=True)
        self._restored = None

    def report(self, step: int, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None:  # every rank, the same number of times: report() is a barrier
            ray.train.report(
                {"step": step, **metrics},
                checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                checkpoint_dir_name=checkpoint.name,
                delete_local_checkpoint_after_upload=True,
            )
            self.upload_logs()
        elif self.progress is not None and ray.train.get_context().get_world_rank() == 0:
            # A full or gone queue only costs the progress bar an update.
            with contextlib.suppress(Exception):
                self.progress.put_nowait({"step": step, **metrics})

    def upload_logs(self) -> None:
        if self.storage and self.run_dir is not None and ray.train.get_context().get_world_rank() == 0:
            upload(self.run_dir, self.storage)

    def preemption_requested(self) -> bool:
        getter = getattr(ray.train, "get_preemption_info", None)
        if getter and getter() is not None:
            return True
        # Rank 0 asks the driver; the loop's all-reduce tells the others.
        return ray.train.get_context().get_world_rank() == 0 and self._driver_answered_stop()

    def _driver_answered_stop(self) -> bool:
        """Whether the driver's stop flag is set, without waiting on it at each step: one question is always in
        flight, its answer read at the first step boundary after it arrives and the next question sent at once,
        so a stop is acted on within three step boundaries (the loop agrees on it one step later)."""
        if self.stop is None:
            return False
        if self._asking is None:
            self._asking = self.stop.get.remote()
        ready, _ = ray.wait([self._asking], timeout=0)
        if not ready:
            return False
        self._asking = self.stop.get.remote()
        try:
            return ray.get(ready[0]) is not None
        except Exception:  # the driver gone: Ray ends the workers anyway
            return False

    def stopped_by_driver(self) -> bool:
        return self.stop is not None and _stop_requested(self.stop, timeout=10)


def _train_fn(config: dict[str, Any]) -> None:
    """The training function on each Ray worker."""
    rank = ray.train.get_context().get_world_rank()
    spec: TrainerSpec = config["spec"]
    configure_logging(rank, Path(spec.run_dir) / "logs" / f"rank{rank}.log")
    context = RayContext(config.get("progress"), Path(spec.run_dir), config.get("storage"), config.get("stop"))
    try:
        code = train(spec, context)
    except DETERMINISTIC as e:
        if not restart_cannot_fix(e):
            raise
        raise FatalError(f"{type(e).__name__}: {e}") from e
    finally:
        context.close()
    context.upload_logs()  # what came after the last checkpoint (final evaluation, hparams)
    if code == EXIT_PREEMPTED and context.stopped_by_driver():
        return  # the user stopped the job: end here (the driver says how to resume), no restart
    if code == EXIT_PREEMPTED:
        # Every rank's report of that checkpoint is in Ray's queue before any rank fails: Ray registers a
        # checkpoint once it has polled every rank's report, and a rank failing first makes it restart from the
        # checkpoint before.
        distributed.barrier()
        # A failure for Ray, so that it restarts the workers, which continue from the checkpoint just saved.
        raise RuntimeError("preempted: a complete checkpoint was saved; restarting from it")


def run_job(spec: TrainerSpec, cluster: ClusterConfig, storage: str | None = None) -> int:
    """Run the job on Ray until it ends; returns 0, or raises JobFailed with what to do. Checkpoints go to
    RUN_DIR/checkpoints, or to STORAGE/checkpoints when `storage` (a URI) is given."""
    run_dir = Path(spec.run_dir)
    started = connect(cluster)
    try:
        if storage is None:
            check_storage_shared(run_dir, cluster)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    # The driver's helpers live on the driver's node: a lost worker node must not take them along.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    progress = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = ray.remote(num_cpus=0, scheduling_strategy=here)(StopFlag).remote()
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={
            "spec": spec,
            "storage": storage,
            "progress": progress,
            "stop": stop,
        },
        scaling_config=ScalingConfig(
            num_workers=cluster.worker_range if cluster.elastic else cluster.worker_range[0],
            elastic_resize_monitor_interval_s=cluster.resize_check_s,
            use_gpu=cluster.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cluster.placement_strategy,
        ),
        torch_config=torch_config(cluster.use_gpu),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=storage or str(run_dir.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            callbacks=_worker_callbacks(),
        ),
    )
    done = threading.Event()
    bar = threading.Thread(target=_show_progress, args=(progress, spec.train.max_steps, done), daemon=True)
    bar.start()
    previous = _stop_on_signals(stop)
    try:
        _fit_off_the_main_thread(trainer)
        stopped = _stop_requested(stop)
    except ray.train.ControllerError as e:
        if isinstance(e.controller_failure, FatalError):
            raise JobFailed(_failure_message(e.controller_failure, run_dir, cluster, retried=False)) from None
        raise JobFailed(_failure_message(e, run_dir, cluster)) from None
    except Exception as e:  # Ray wraps the worker's error; the user needs what, where and how to go on
        raise JobFailed(_failure_message(e, run_dir, cluster)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        done.set()
        bar.join(timeout=5)
        if started:
            ray.shutdown()
    return EXIT_PREEMPTED if stopped else 0


def _reads_back(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_storage_shared(directory: Path, cluster: ClusterConfig, timeout: float = 120) -> None:
    """Refuse a storage directory that the cluster's nodes do not share: a file written there on this node must
    be read back, the same, on every other live node. Checkpoints on one node's own disk would be missing
    wherever Ray restarts the workers, and the run could not continue."""
    # The nodes that can hold a worker: a CPU-only head or another pool never reads the checkpoints.
    slot = "GPU" if cluster.use_gpu else "CPU"
    nodes = [
        n
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get(slot, 0) >= (1 if cluster.use_gpu else cluster.cpus_per_worker)
    ]
    if len(nodes) < 2:
        return
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = directory / f".storage-probe-{token}"
    probe.write_text(token)
    try:
        reads = ray.remote(num_cpus=0, max_retries=0)(_reads_back)
        asked = [
            reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe), token
            )
            for n in nodes
        ]
        try:
            seen = ray.get(asked, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            for ref in asked:
                ray.cancel(ref, force=True)
            raise ConfigError(
                "cluster.storage_path",
                f"could not check within {timeout:.0f} s that every node sees {directory.parent} (a task on each "
                "node reads a file written there; some did not run). Use s3://... or a shared mount",
            ) from None
    finally:
        probe.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ConfigError(
            "cluster.storage_path",
            f"{directory.parent} is not shared by the cluster's nodes: {', '.join(blind)} do not see what this node "
            "writes there, so checkpoints would be missing wherever Ray restarts the workers. Use storage every "
            "node reaches: s3://bucket/prefix (or another URI pyarrow knows: gs://, abfs://, hdfs://) or a shared "
            "mount at the same path on every node",
        )


def _fit_off_the_main_thread(trainer) -> None:
    """`trainer.fit()`, raising what it raises. In a thread of its own: on the main thread Ray Train installs
    its own SIGINT handler, which aborts the run with no checkpoint (and exits 0); the driver's own handlers
    (`_stop_on_signals`) stay in force on the main thread, which only waits."""
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    fitter = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    fitter.start()
    while fitter.is_alive():
        fitter.join(0.5)  # a bounded wait: signal handlers run on this thread in between
    if "error" in outcome:
        raise outcome["error"]


def _stop_requested(stop, timeout: float = 30) -> bool:
    try:
        return ray.get(stop.get.remote(), timeout=timeout) is not None
    except Exception:  # the flag's actor (or the driver) lost: nobody can have set it since
        return False


class StopFlag:
    """A Ray actor the driver sets when it is told to stop; the workers' rank 0 reads it at each step."""

    def __init__(self):
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> str | None:
        return self.reason


def _stop_on_signals(stop) -> dict:
    """SIGTERM or Ctrl-C to the driver (a scheduler, `ray job stop`, the user): the workers save within two step
    boundaries and end; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    asked: list[str] = []

    def handle(signum, frame=None):
        name = signal.Signals(signum).name
        if asked:
            raise KeyboardInterrupt
        asked.append(name)
        print(f"\n{name}: the workers save within three step boundaries and stop (again to abort)", flush=True)
        stop.set.remote(name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)
    return previous


def _failure_message(error: Exception, run_dir: Path, cluster: ClusterConfig, retried: bool = True) -> str:
    cause = str(error).strip().splitlines()
    summary = next((line for line in reversed(cause) if line.strip()), type(error).__name__)
    when = f"after {cluster.max_failures} restart(s)" if retried else "at once (a restart would fail the same way)"
    return (
        f"training failed {when}: {summary}\n"
        f"  worker logs: {run_dir / 'logs'} (and Ray's, in {_session_logs()} on each node)\n"
        f"  continue from the last complete checkpoint: infinitune resume {run_dir}"
    )


def _session_logs() -> str:
    """This Ray session's log directory (`session_latest` may name another cluster's by now)."""
    try:
        return str(Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs")
    except Exception:  # disconnected already, or Ray's internals moved
        return "/tmp/ray/session_*/logs"


def _show_progress(progress, total: int, stop: threading.Event) -> None:
    """The driver's progress bar: step, loss, tokens/s and ETA, from rank 0's reports."""
    bar = tqdm(total=total, unit="step", desc="train", dynamic_ncols=True)
    try:
        while not stop.is_set():
            try:
                row = progress.get(timeout=0.5)
            except (queue.Empty, Exception):
                continue
            if "cluster/workers" in row:
                bar.write(f"step {row['step']}: {row['message']}")
            elif "train/loss" in row:
                bar.n = row["step"]
                bar.set_postfix(
                    loss=f"{row['train/loss']:.4f}", tok_s=f"{row.get('perf/tokens_per_s', 0):.0f}", refresh=False
                )
                bar.refresh()
            elif "eval/loss" in row:
                bar.write(
                    f"step {row['step']}: eval loss {row['eval/loss']:.4f}, exact match "
                    f"{row.get('eval/exact_match', float('nan')):.2f}"
                )
    finally:
        bar.close()
