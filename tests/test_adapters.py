"""Adapters through peft (LoRA, AdaLoRA, IA3, prefix tuning) on real DeepSpeed workers: each trains, checkpoints
only what trains, resumes after a crash with the same losses, and exports (merged into a model transformers
loads; prefix tuning as a peft adapter directory); and `infinitune compare` on two adapter runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinitune.testing.jobs import job_config, logs, make_tiny_setup, run, run_dir_of, step_losses
from infinitune.trainer.loading import consolidated_state_dict, find_checkpoint

pytestmark = pytest.mark.slow

STEPS = 8
METHODS = {
    # method: (adapter section, ZeRO stage, the names its trained weights carry)
    "lora": ({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]}, 3, "lora_"),
    "adalora": (
        {"method": "adalora", "r": 2, "init_r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        0,
        "lora_",
    ),
    "ia3": ({"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"]}, 3, "ia3_"),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 4}, 3, "prompt_encoder"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    return make_tiny_setup(tmp_path_factory.mktemp("adapters"), tiny_tokenizer_dir, records=800)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-runs")


def adapter_job(setup, runs, method, name):
    adapter, stage, _ = METHODS[method]
    return job_config(
        setup,
        runs,
        name,
        model={"adapter": adapter},
        train={"lr": 2e-2, "max_steps": STEPS, "eval_every": STEPS, "eval_generations": 2},
        deepspeed={"zero_stage": stage},
        checkpoint={"every_steps": 4, "keep_last": 3},
    )


@pytest.fixture(scope="module")
def references(setup, runs):
    out = {}
    for method in METHODS:
        config = adapter_job(setup, runs, method, f"{method}-reference")
        assert run(config) == 0, logs(config)
        out[method] = config
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_an_adapter_trains_checkpoints_only_itself_resumes_and_exports_merged(
    method, setup, runs, references, tmp_path
):
    from transformers import AutoModelForCausalLM

    from infinitune.trainer.export import export

    reference = references[method]
    losses = step_losses(reference)
    assert losses[STEPS] < losses[1]  # it learns

    # The checkpoint holds the adapter (and its optimizer state), not the frozen base model.
    directory = find_checkpoint(run_dir_of(reference))
    state = json.loads((directory / "trainer_state.json").read_text())
    weights = consolidated_state_dict(directory, state["zero_stage"], trainable_only=True)
    assert weights and all(METHODS[method][2] in name for name in weights), sorted(weights)[:4]
    base_bytes = sum(p.stat().st_size for p in Path(setup["model"]).glob("*.safetensors"))
    stored = sum(p.stat().st_size for p in directory.glob("*.pt"))
    assert stored < base_bytes / 2, (stored, base_bytes)

    # Killed after step 6, resumed from step 4: the same losses as the uninterrupted run.
    crashed = adapter_job(setup, runs, method, f"{method}-crashed")
    assert run(crashed, env={"INFINITUNE_FAULT": "after_step:6"}) == 137
    assert run(crashed) == 0, logs(crashed)
    assert "step_000004 (step 4)" in logs(crashed)
    want, got = step_losses(reference), step_losses(crashed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6, (method, step, got[step], want[step])

    if method == "prefix":  # not mergeable: a peft adapter directory pointing at its base
        from peft import PeftModel

        from infinitune.trainer.generation import reply

        out = export(run_dir_of(reference), tmp_path / "adapter", dtype="float32")
        assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == setup["model"]
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), out)
        trained = {n: p for n, p in reloaded.named_parameters() if "prompt_encoder" in n}
        assert len(trained) == 1 and len(weights) == 1
        assert torch.allclose(next(iter(trained.values())), next(iter(weights.values())))
        assert isinstance(reply(out, "Reverse the letters of the word.\n\nabc", max_new_tokens=4), str)
        return
    out = export(run_dir_of(reference), tmp_path / "merged", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not [n for n, _ in model.named_parameters() if "lora" in n or "ia3" in n]
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).state_dict()
    v = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.equal(model.state_dict()[v], base[v])  # the adapter is merged in
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    answer = model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert answer.shape[1] >= 4


def test_compare_two_adapter_runs_writes_the_table_and_the_plot(references, tmp_path):
    png = tmp_path / "compare.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "infinitune.launcher.cli",
            "compare",
            str(run_dir_of(references["lora"])),
            str(run_dir_of(references["ia3"])),
            "--out",
            str(png),
            "--table",
            str(tmp_path / "table.md"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0].startswith("| run | steps | final train loss | eval/loss | eval/exact_match")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {"lora-reference", "ia3-reference"}
    for name, config in (("lora-reference", references["lora"]), ("ia3-reference", references["ia3"])):
        assert f"| {STEPS} | {step_losses(config)[STEPS]:.4f} |" in rows[name]
    from PIL import Image

    image = Image.open(png)
    assert image.size[0] > 500 and len(set(image.convert("L").getdata())) > 10  # drawn, not blank
