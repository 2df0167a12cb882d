"""`infinitune eval --workers N`: the examples split into N contiguous slices, each answered by a Ray task that
loads the model itself (on a GPU when the cluster has them); the driver joins the rows in order and scores them.

Slices start at multiples of the batch size and sampled batches are seeded by their global index, so the
answers are the same for any number of workers.
"""

from __future__ import annotations

from typing import Any

import ray

from infinitune.cluster.config import ClusterConfig
from infinitune.cluster.ray_job import connect
from infinitune.trainer.evaluate import eval_slice, load_examples, require_constraints
from infinitune.trainer.loading import load_eval_tokenizer


def _slice(target: str, data: str, settings: Any, lo: int, hi: int):
    return eval_slice(target, data, settings, lo, hi, progress=False)


def eval_on_workers(target: str, data: str, settings: Any, workers: int, address: str | None = None):
    """(rows in example order, records left out by reason, examples in all), computed by `workers` tasks."""
    # The examples' count decides the slices: the driver needs the tokenizer, not the model.
    tokenizer = load_eval_tokenizer(target, settings.step)
    examples, _ = load_examples(data, tokenizer, settings.limit)
    require_constraints(examples, settings.metrics, data)  # before a cluster starts
    per = -(-len(examples) // workers)
    per = -(-per // settings.batch_size) * settings.batch_size  # whole batches: the seeding stays put
    bounds = [(lo, min(lo + per, len(examples))) for lo in range(0, len(examples), per)] or [(0, 0)]
    started = connect(ClusterConfig(address=address, num_workers=workers))
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= len(bounds) else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_slice)
        results = ray.get([task.remote(target, data, settings, lo, hi) for lo, hi in bounds])
    finally:
        if started:
            ray.shutdown()
    rows = [row for part, _, _ in results for row in part]
    return rows, results[0][1], results[0][2]
