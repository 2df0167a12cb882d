"""`infinitune plan`: parameter counts equal transformers', model states agree with DeepSpeed's own estimators,
and every shipped config is planned from its config alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinitune.trainer.plan import KNOWN_CONFIGS, ModelShape, make_plan

from .conftest import REPO

SHAPES = {
    "llama-3.2-1b": KNOWN_CONFIGS["meta-llama/Llama-3.2-1B"],
    "llama-3.1-8b": KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"],
    "llama-3.1-70b": KNOWN_CONFIGS["meta-llama/Llama-3.1-70B"],
    "qwen2.5-7b": KNOWN_CONFIGS["Qwen/Qwen2.5-7B"],
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, model_type="llama",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        dict(SHAPES["llama-3.2-1b"], num_hidden_layers=2),
        dict(SHAPES["qwen2.5-7b"], num_hidden_layers=2),  # biases on q, k and v
        dict(KNOWN_CONFIGS["mistralai/Mistral-7B-v0.3"], num_hidden_layers=2),
        dict(SHAPES["smollm2-135m"]),
    ],
    ids=["llama-tied", "qwen2-bias", "mistral", "smollm2"],
)
def test_parameter_counts_equal_the_models_built_by_transformers(config):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(hf)
    assert ModelShape.from_config(hf.to_dict()).params == sum(p.numel() for p in model.parameters())


def model_states(plan, *names) -> float:
    return sum(i.bytes for i in plan.items if i.name in names)


STATES = ("parameters", "gradients", "master weights (fp32)", "optimizer state (Adam)")


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("world", [1, 8, 64])
def test_model_states_agree_with_deepspeeds_estimators(name, world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = ModelShape.from_config(SHAPES[name])
    common = dict(world=world, precision="bf16", micro_batch=1, seq_len=1024)
    zero3 = make_plan(shape, zero_stage=3, **common)
    _, theirs, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_layer, num_gpus_per_node=world, cpu_offload=False, cpu_offload_params=False
    )
    ours = model_states(zero3, *STATES, "ZeRO-3 largest layer, gathered")
    assert abs(ours - theirs) <= 0.10 * theirs, (ours / 1e9, theirs / 1e9)
    zero2 = make_plan(shape, zero_stage=2, **common)
    _, theirs = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=world, cpu_offload=False)
    ours = model_states(zero2, *STATES)
    assert abs(ours - theirs) <= 0.10 * theirs, (ours / 1e9, theirs / 1e9)


def test_what_changes_the_plan_moves_the_items_it_should():
    shape = ModelShape.from_config(SHAPES["llama-3.1-8b"])
    base = dict(world=8, zero_stage=3, precision="bf16", micro_batch=2, seq_len=4096)
    plain = make_plan(shape, **base)
    item = {i.name: i for i in plain.items}
    checkpointed = {i.name: i for i in make_plan(shape, **base, gradient_checkpointing=True).items}
    assert checkpointed["activations"].bytes < item["activations"].bytes / 10
    pieces = {i.name: i for i in make_plan(shape, **base, loss_chunk_tokens=1024).items}
    assert pieces["logits and loss"].bytes == item["logits and loss"].bytes / 8
    offloaded = make_plan(shape, **base, offload_optimizer="cpu")
    assert offloaded.total() < plain.total() and offloaded.total("host") > 0
    wider = make_plan(shape, **{**base, "world": 64})
    assert wider.total() < plain.total() and wider.step["bytes_sent"] > plain.step["bytes_sent"]
    lora = make_plan(shape, **base, lora_r=16)
    assert lora.settings["trainable"] < shape.params / 100 and lora.total() < plain.total()
    one = make_plan(shape, **{**base, "world": 1})
    assert one.step["bytes_sent"] == 0 and not one.fits and one.largest.name == "optimizer state (Adam)"
    # Stage 0 flattens the gradients to all-reduce them, unless there is one worker and nothing to reduce.
    stage0 = {i.name: i for i in make_plan(shape, **{**base, "zero_stage": 0}).items}
    assert stage0["all-reduce buffer"].bytes == 2 * 500_000_000  # one bucket of 5e8 bf16 elements at a time
    assert "all-reduce buffer" not in {i.name for i in make_plan(shape, **{**base, "zero_stage": 0, "world": 1}).items}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "infinitune.launcher.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_is_planned_and_fits(config):
    out = cli("plan", str(REPO / "configs" / config), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["fits"] and plan["device_total_gb"] > 0 and plan["step"]["tokens_per_s"] > 0


def test_a_job_that_cannot_fit_is_named_with_its_largest_item():
    config = Path(REPO / "configs" / "llama-8b-2x8gpu.yaml")
    out = cli("plan", str(config), "cluster.num_workers=1", "train.global_batch_size=8", "--gpu", "L4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DOES NOT FIT (largest: optimizer state (Adam))" in out.stdout
    assert "total on the device" in out.stdout and "upper bound" in out.stdout


def test_train_refuses_a_job_that_cannot_fit_before_anything_starts_and_says_what_would():
    config = str(REPO / "configs" / "llama-8b-1x8gpu.yaml")
    out = cli("train", config, "cluster.num_workers=1", "train.global_batch_size=8")
    assert out.returncode == 2, out.stderr[-2000:]
    message = out.stderr
    assert "cluster.gpu: the job is predicted to need" in message and "a H100 has 80 GB" in message
    assert "the largest item is optimizer state (Adam)" in message
    assert "deepspeed.offload_optimizer=cpu" in message and "cluster.num_workers=4" in message
    assert "--ignore-plan" in message
    # What the message offers does fit.
    from infinitune.launcher.job_config import check_plan_fits, load_job_config

    for fix in ("deepspeed.offload_optimizer=cpu", "cluster.num_workers=4"):
        check_plan_fits(load_job_config(config, ["cluster.num_workers=1", "train.global_batch_size=8", fix]))


@pytest.mark.slow
def test_the_plan_accounts_for_a_zero3_runs_host_memory_on_this_cpu(tmp_path, tiny_tokenizer_dir):
    """On a CPU everything a rank holds is host memory. Two ZeRO-3 runs on 2 workers, fp32: a tiny model (what the
    process holds besides the model: torch, DeepSpeed, gloo) and a 57M-parameter one, whose model states,
    activations, logits and buffers the plan predicts; its measured peak is within 25% of the tiny run's plus
    the plan's."""
    import yaml

    from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of
    from infinitune.testing.tiny import save_tiny_llama

    setup = make_tiny_setup(tmp_path / "setup", tiny_tokenizer_dir, records=300)
    medium = save_tiny_llama(tmp_path / "medium", tiny_tokenizer_dir, layers=6, hidden=768, heads=12, kv_heads=4)
    peaks, plans = {}, {}
    for name, model in (("tiny", setup["model"]), ("medium", str(medium))):
        config = job_config(
            {**setup, "model": model},
            tmp_path / "runs",
            name,
            model={"path": model, "dtype": "float32"},
            train={"max_steps": 2, "eval_every": 0, "global_batch_size": 2, "micro_batch_size": 1},
            checkpoint={"every_steps": 0},
        )
        assert run(config) == 0, logs(config)
        rows = [json.loads(x) for x in (run_dir_of(config) / "metrics.jsonl").read_text().splitlines()]
        peaks[name] = max(r["memory/host_peak_gb"] for r in rows if "memory/host_peak_gb" in r) * 2**30
        from infinitune.launcher.job_config import job_plan, load_job_config

        plan = job_plan(load_job_config(config))
        runtime = next(i.bytes for i in plan.items if i.name.startswith("runtime"))
        plans[name] = plan.total() + plan.total("host") - runtime  # on a CPU, all of it is host memory
        print(
            name, yaml.safe_dump({k: round(v / 1e9, 3) for k, v in {"peak": peaks[name], "plan": plans[name]}.items()})
        )
    predicted = peaks["tiny"] - plans["tiny"] + plans["medium"]
    assert plans["medium"] > 0.4 * peaks["medium"]  # the model's part is no small share of what is measured
    assert abs(predicted - peaks["medium"]) <= 0.25 * peaks["medium"], (predicted / 1e9, peaks["medium"] / 1e9)


def test_only_gpu_jobs_that_name_their_gpu_are_checked():
    from infinitune.launcher.job_config import check_plan_fits, load_job_config
    from infinitune.typed_config import ConfigError

    config = str(REPO / "configs" / "llama-8b-1x8gpu.yaml")
    too_big = ["cluster.num_workers=1", "train.global_batch_size=8"]
    with pytest.raises(ConfigError, match=r"cluster\.gpu"):
        check_plan_fits(load_job_config(config, too_big))
    check_plan_fits(load_job_config(config, [*too_big, "cluster.gpu=null"]))  # no GPU named: not checked
    check_plan_fits(load_job_config(config, [*too_big, "cluster.use_gpu=false"]))  # a CPU job


def test_zero_stage_auto_is_0_where_the_whole_model_fits_on_a_device_else_3():
    from infinitune.launcher.job_config import choose_zero_stage, load_job_config

    def choose(*overrides, memory=None):
        cfg = load_job_config(REPO / "configs" / "llama-1b-1gpu.yaml", ["deepspeed.zero_stage=auto", *overrides])
        chosen, why = choose_zero_stage(cfg, memory)
        assert chosen.deepspeed.zero_stage == int(why[0]), why  # the config carries what the reason says
        return why

    assert choose().startswith("0 (auto: at stage 0 a worker holds ")  # a 1B model, an H100's 80 GB
    assert choose("cluster.gpu=L4").startswith("3 (auto: at stage 0 a worker would hold ")  # 24 GB: partitioned
    assert choose(memory=40.0).startswith("3 ")  # the memory given wins over cluster.gpu's
    assert choose("data.seq_len=256", memory=40.0).startswith("0 ")  # fewer activations: it fits again
    assert choose("cluster.gpu=null") == "3 (auto: the memory of a device is unknown (set cluster.gpu))"
    assert choose("deepspeed.offload_optimizer=cpu") == "3 (auto: offloading needs ZeRO's partitions)"
    assert choose("deepspeed.zero_stage=2") == "2 (configured)"  # a stage given is kept, fitting or not
    assert choose("model.adapter.method=adalora").startswith("0 (auto: AdaLoRA")
    cpu = ["cluster.use_gpu=false", "cluster.gpu=null"]
    assert choose(*cpu, memory=1000.0).startswith("0 ") and choose(*cpu, memory=1.0).startswith("3 ")
    assert choose(*cpu, "cluster.address=ray://head:10001") == (
        "3 (auto: the memory of a device is unknown (the cluster's hosts are not this machine))"
    )


def test_zero_stage_auto_is_chosen_before_the_workers_and_shown(tmp_path):
    from infinitune.launcher.job_config import load_job_config
    from infinitune.typed_config import ConfigError

    config = REPO / "configs" / "llama-1b-1gpu.yaml"
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: auto is chosen before"):
        load_job_config(config, ["deepspeed.zero_stage=auto"]).trainer_spec(tmp_path)
    out = cli("plan", str(config), "deepspeed.zero_stage=auto")
    assert out.returncode == 0, out.stderr
    assert "ZeRO stage: 0 (auto: at stage 0 a worker holds" in out.stdout
    assert "ZeRO-3" not in out.stdout  # planned at the stage chosen: no partition buckets
    out = cli("plan", str(config), "deepspeed.zero_stage=auto", "--gpu", "L4", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["settings"]["zero_stage"] == 3, out.stderr
