"""The job config: every shipped config loads; bad keys and values are refused with their key path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infinitune.launcher.job_config import JobConfig, check_against_model, load_job_config
from infinitune.typed_config import ConfigError, apply_overrides, describe

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.stem for p in CONFIGS}
    assert "quickstart" in names and len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path, tmp_path):
    cfg = load_job_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.name and cfg.data.sources
    # The resolved config (what a run saves) round-trips through YAML.
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_job_config(resolved) == cfg


def test_the_kuberay_job_runs_a_shipped_config_with_overrides_that_load():
    import shlex

    repo = Path(__file__).resolve().parents[1]
    job = yaml.safe_load((repo / "deploy" / "kuberay-rayjob.yaml").read_text())
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["infinitune", "train"]
    config = repo / "configs" / Path(words[2]).name  # the image holds the repo's configs under /app
    cfg = load_job_config(config, words[3:])
    assert cfg.cluster.address == "auto" and cfg.cluster.storage_path.startswith("s3://")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.cluster.worker_range[1] <= workers["replicas"] * gpus  # the workers fit the cluster it asks for


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


BASE = """
name: t
model: {path: some/model}
data: {sources: [{path: data.jsonl}], seq_len: 256}
train: {global_batch_size: 8, micro_batch_size: 2}
cluster: {num_workers: 2}
"""


def test_overrides_set_typed_values(tmp_path):
    cfg = load_job_config(
        _write(tmp_path, BASE),
        [
            "train.lr=3e-4",
            "data.seq_len=512",
            "data.sources.0.weight=2",
            "model.adapter={method: ia3, target_modules: [k_proj, down_proj]}",
            "logging.tensorboard=false",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string: taken as the number meant
    assert cfg.data.seq_len == 512
    assert cfg.data.sources[0].weight == 2.0
    assert cfg.model.adapter is not None and cfg.model.adapter.method == "ia3" and cfg.model.adapter.r == 16
    assert cfg.logging.tensorboard is False


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["trian.lr=1"], "trian", "did you mean 'train'"),
        (["train.learning_rate=1e-4"], "train.learning_rate", "unknown key"),
        (["data.sources.0.fromat=alpaca"], "data.sources.0.fromat", "did you mean 'format'"),
        (["train.micro_batch_size=-1"], "train.micro_batch_size", "must be positive"),
        (["train.global_batch_size=0"], "train.global_batch_size", "must be positive"),
        (["train.max_steps=ten"], "train.max_steps", "expected an integer"),
        (["train.lr=fast"], "train.lr", "expected a number"),
        (["data.packing=maybe"], "data.packing", "expected true or false"),
        (["data.train_on=assistants"], "data.train_on", "did you mean 'assistant'"),
        (["data.val_fraction=1.5"], "data.val_fraction", "[0, 1)"),
        (["data.sources=[]"], "data.sources", "at least one source"),
        (["data.sources.0.weight=-1"], "data.sources.0.weight", "(0, 100]"),
        (["data.sources.0.roles={narrator: god}"], "data.sources.0.roles.narrator", "must be one of"),
        (["train.global_batch_size=6"], "train.global_batch_size", "micro_batch_size x cluster.num_workers"),
        (
            ["train.global_batch_size=6"],
            "train.global_batch_size",
            "Worker counts that hold it: 1, 3; global batches that fit 2 workers: 4 or 8",
        ),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "must be one of 0, 1, 2, 3"),
        (
            ["deepspeed.offload_params=cpu", "deepspeed.zero_stage=2"],
            "deepspeed.offload_params",
            "zero_stage 3",
        ),
        (["cluster.num_workers=0"], "cluster.num_workers", "must be positive"),
        (["cluster.num_workers=[2, 1]"], "cluster.num_workers", "a range [min, max] with 0 < min <= max"),
        (["cluster.num_workers=[2, 3]"], "train.global_batch_size", "8 does not split into micro-batches of 2 on 3"),
        (["data.seed=-1"], "data.seed", "must be >= 0"),
        (["name=a/b"], "name", "plain directory name"),
        (["model.path="], "model.path", "must name"),
        (["data.sources.3.path=x"], "data.sources.3", "no list item 3"),
        (["model.adapter={method: adalora}", "deepspeed.zero_stage=3"], "model.adapter.method", "zero_stage=0"),
        (
            ["model.adapter={method: prefix}", "model.attn_implementation=flex_attention"],
            "model.attn_implementation",
            "use sdpa or eager",
        ),
        (["model.adapter={method: prefix}", "model.compile_layers=true"], "model.compile_layers", "prefix tuning"),
        (["model.adapter={method: dora}"], "model.adapter.method", "must be one of"),
        (["model.adapter={method: adalora, r: 8, init_r: 4}"], "model.adapter.init_r", ">= r"),
        (["train.eval_metrics=[exact_match, rouge]"], "train.eval_metrics", "unknown ['rouge']"),
        (
            ["train.early_stopping_patience=2", "train.early_stopping_metric=bleu", "train.eval_metrics=[rouge_l]"],
            "train.early_stopping_metric",
            "in eval_metrics",
        ),
        (["cluster.storage_path=s3://KEY:SECRET@bucket/runs"], "cluster.storage_path", "must not hold credentials"),
    ],
)
def test_bad_values_are_refused_with_their_key_path(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_job_config(_write(tmp_path, BASE), overrides)
    assert info.value.key == key
    assert words.lower() in str(info.value).lower()
    assert "job.yaml" in str(info.value)  # names the file too


def test_missing_required_key_names_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_job_config(_write(tmp_path, "name: t\ndata: {sources: [{path: x}]}\n"))
    assert info.value.key == "model"


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_job_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_job_config(tmp_path / "absent.yaml")


def test_seq_len_beyond_the_models_positions_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 128}')
    cfg = load_job_config(_write(tmp_path, BASE), [f"model.path={model_dir}", "data.seq_len=256"])
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg)
    assert info.value.key == "data.seq_len" and "128 positions" in str(info.value)
    check_against_model(load_job_config(_write(tmp_path, BASE), [f"model.path={model_dir}", "data.seq_len=128"]))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_field_docstrings_are_the_help_text():
    from infinitune.data_pipeline.config import DataConfig

    assert "Tokens per training sample" in dict((k, d) for k, _, _, d in describe(DataConfig))["seq_len"]
    rows = {key: doc for key, _, _, doc in describe(JobConfig)}
    assert "data.sources[].path" in rows and "train.lr" in rows and "model.adapter.method" in rows
    undocumented = [key for key, doc in rows.items() if not doc]
    assert not undocumented, f"config fields without a docstring: {undocumented}"


def test_config_reference_in_docs_is_current():
    out = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", "config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (REPO / "docs" / "config.md").read_text() == out, "regenerate: infinitune config > docs/config.md"


def test_a_config_held_by_an_environment_variable_loads_as_a_file_would(tmp_path, monkeypatch):
    """`submit` sends the resolved config with the job in a variable (`train env:NAME`)."""
    from infinitune.launcher.job_config import dump_job_config

    (tmp_path / "job.yaml").write_text(BASE)
    resolved = load_job_config(tmp_path / "job.yaml", ["train.lr=5e-5", "cluster.num_workers=[1,2]"])
    monkeypatch.setenv("INFINITUNE_TEST_CONFIG", dump_job_config(resolved))
    again = load_job_config("env:INFINITUNE_TEST_CONFIG", ["cluster.address=auto"])
    assert again.train.lr == 5e-5 and again.cluster.num_workers == [1, 2] and again.cluster.address == "auto"
    assert dump_job_config(again) == dump_job_config(
        load_job_config(tmp_path / "job.yaml", ["train.lr=5e-5", "cluster.num_workers=[1,2]", "cluster.address=auto"])
    )
    with pytest.raises(ConfigError, match="INFINITUNE_NOT_SET is not set"):
        load_job_config("env:INFINITUNE_NOT_SET")
    monkeypatch.setenv("INFINITUNE_TEST_CONFIG", "train: {lr: [")
    with pytest.raises(ConfigError, match="env:INFINITUNE_TEST_CONFIG: not valid YAML"):
        load_job_config("env:INFINITUNE_TEST_CONFIG")


def test_the_json_schema_is_current_and_checks_every_shipped_config():
    """`infinitune config --schema` is docs/config.schema.json, which every shipped config names for editors and
    passes; a misspelt key or a wrong type fails it, as it fails the loader."""
    import jsonschema

    out = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.cli", "config", "--schema"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (REPO / "docs" / "config.schema.json").read_text() == out, (
        "regenerate: infinitune config --schema > docs/config.schema.json"
    )
    schema = json.loads(out)
    validator = jsonschema.Draft202012Validator(schema)
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=../docs/config.schema.json\n"), path
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
        assert not errors, (path.name, errors)
        load_job_config(path)  # and the loader agrees
    quickstart = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    misspelt = {**quickstart, "train": {**quickstart["train"], "learning_rate": 1e-4}}
    assert any("learning_rate" in e.message for e in validator.iter_errors(misspelt))
    wrong_type = {**quickstart, "data": {**quickstart["data"], "packing": "maybe"}}
    assert [e.json_path for e in validator.iter_errors(wrong_type)] == ["$.data.packing"]
    out_of_range = {**quickstart, "train": {**quickstart["train"], "max_steps": 0}}
    assert [e.json_path for e in validator.iter_errors(out_of_range)] == ["$.train.max_steps"]


def test_the_worker_entry_point_checks_the_whole_config(tmp_path):
    """Under torchrun the worker loads the job config whole: a rule between sections refuses it (exit 2)."""
    path = _write(tmp_path, BASE)
    bad = yaml.safe_load(path.read_text())
    bad["model"]["adapter"] = {"method": "adalora"}
    bad["deepspeed"] = {"zero_stage": 3}
    path.write_text(yaml.safe_dump(bad))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "infinitune.launcher.worker", str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.adapter.method" in done.stderr and "zero_stage" in done.stderr


def test_values_are_taken_as_a_yaml_user_means_them(tmp_path):
    """YAML 1.1 reads `2e-5` as a string, `16.0` is a whole number, `5` may name a path: taken as meant, also
    inside lists; what cannot be meant is refused, naming the whole type of a field that takes several."""
    cfg = load_job_config(
        _write(tmp_path, BASE),
        ["train.max_steps=16.0", "train.betas=['9e-1', 0.95]", "model.tokenizer=5", "train.lr='2e-5'"],
    )
    assert cfg.train.max_steps == 16 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.betas == [0.9, 0.95] and cfg.train.lr == 2e-5
    assert cfg.model.tokenizer == "5"
    for override, words in [
        ("train.max_steps=16.5", "expected an integer, got 16.5"),
        ("cluster.num_workers=[1, x]", "expected int | list of int"),
        ("data.packing=1", "expected true or false"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_job_config(_write(tmp_path, BASE), [override])
