"""Nothing loaded from shards, checkpoints or configs can run code, and secrets stay out of what a run writes."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch

from .conftest import REPO

SOURCES = sorted((REPO / "infinitune").rglob("*.py"))


def calls(pattern: str):
    for path in SOURCES:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line) and not line.lstrip().startswith(("#", '"', "`")):
                yield f"{path.relative_to(REPO)}:{lineno}", line


def test_every_load_refuses_pickled_code():
    torch_loads = list(calls(r"torch\.load\("))
    assert torch_loads and all("weights_only=True" in line for _, line in torch_loads), torch_loads
    np_loads = list(calls(r"np\.load\("))
    assert np_loads and all("allow_pickle=False" in line for _, line in np_loads), np_loads
    assert not list(calls(r"pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|(?<![\w.])(eval|exec)\("))


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/infinitune-pwned",))


def test_a_shard_member_holding_a_pickle_is_refused_without_running_it(tmp_path):
    from infinitune.data_pipeline.shards import iter_shard

    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("0000000.input_ids.npy", "0000000.labels.npy", "0000000.position_ids.npy"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(Exception, match="allow_pickle"):
        list(iter_shard(str(tar_path), count=1))
    assert not (tmp_path / "pwned").exists()
    import os

    assert not os.path.exists("/tmp/infinitune-pwned")


def test_a_checkpoint_file_holding_a_pickle_is_refused_without_running_it(tmp_path):
    import os

    from infinitune.trainer.checkpoint_format import rank_state_path, read_rank_state

    directory = tmp_path / "step_000001"
    directory.mkdir()
    path = rank_state_path(directory, "adapter", rank=0)  # what the checkpointer reads back on resume
    torch.save({"ipt": Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        read_rank_state(path)
    assert not os.path.exists("/tmp/infinitune-pwned")


def test_secrets_stay_out_of_worker_environments_and_saved_configs(tmp_path, monkeypatch):
    from infinitune.cluster.ray_job import ray_environment
    from infinitune.launcher.job_config import load_job_config, save_job_config

    from .test_config import BASE

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value")
    monkeypatch.setenv("HF_TOKEN", "hf_sekrit")
    assert "sekrit" not in json.dumps(ray_environment(True)) + json.dumps(ray_environment(False))
    config = tmp_path / "job.yaml"
    config.write_text(BASE)
    save_job_config(load_job_config(config, ["cluster.storage_path=s3://bucket/runs"]), tmp_path / "saved.yaml")
    assert "sekrit" not in (tmp_path / "saved.yaml").read_text()


def test_the_embedded_ray_dashboard_binds_to_localhost_only():
    import inspect

    from infinitune.cluster import ray_job

    source = inspect.getsource(ray_job.connect)
    assert 'dashboard_host="127.0.0.1"' in source and "0.0.0.0" not in source
