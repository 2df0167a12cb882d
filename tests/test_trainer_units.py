"""Trainer parts that need no process group: the loss, attention over packed documents, the schedule, the
DeepSpeed config, FLOPs, checkpoint completeness checks."""

from __future__ import annotations

import json

import pytest
import torch

from infinitune.data_pipeline.stream import BatchLayout
from infinitune.trainer.background import snapshot
from infinitune.trainer.checkpoint_format import COMPLETE, checkpoint_problem, owner
from infinitune.trainer.config import DeepSpeedConfig, ModelConfig, TrainConfig
from infinitune.trainer.ds_config import deepspeed_config
from infinitune.trainer.metrics import FlopCounter
from infinitune.trainer.model import TokenLossModel, load_causal_lm
from infinitune.trainer.schedule import lr_factor


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from infinitune.testing.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer_dir, max_positions=256)


@pytest.mark.parametrize(
    "attn, adapter",
    [("sdpa", None), ("eager", None), ("packed", None), ("sdpa", "prefix"), ("packed", "prefix"), ("sdpa", "lora")],
)
def test_a_packed_document_has_the_loss_it_has_alone(tiny_model_dir, attn, adapter):
    """Two documents packed into one row, positions restarting: each keeps exactly its own loss, i.e.
    neither attends to the other (with the KV cache off, as the trainer builds the model); with a trained
    prefix too, which peft hands over as a KV cache (then transformers would not mask packed documents)."""
    from infinitune.trainer.config import AdapterConfig
    from infinitune.trainer.model import PACKED_SDPA, apply_adapter, register_packed_sdpa

    register_packed_sdpa()
    cfg = ModelConfig(path=str(tiny_model_dir), attn_implementation="sdpa" if attn == "packed" else attn)
    lm = load_causal_lm(cfg, torch.float32, attention=PACKED_SDPA if attn == "packed" else None)
    if adapter is not None:
        lm = apply_adapter(lm, AdapterConfig(method=adapter, num_virtual_tokens=6), seed=0, total_steps=10)
        for p in lm.parameters():  # trained-looking adapter weights, so that they matter
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.5)
    model = TokenLossModel(lm).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 500, (1, 37), generator=g), torch.randint(3, 500, (1, 50), generator=g)
    la, lb = a.clone(), b.clone()
    la[0, :5] = -100  # a prompt without loss
    lb[0, :9] = -100
    with torch.no_grad():
        loss_a, n_a = model(a, la, torch.arange(37)[None])
        loss_b, n_b = model(b, lb, torch.arange(50)[None])
        packed = torch.cat([a, b], 1)
        labels = torch.cat([la, lb], 1)
        positions = torch.cat([torch.arange(37), torch.arange(50)])[None]
        loss_p, n_p = model(packed, labels, positions)
        # Same again without restarting positions: the documents now see each other and the loss moves.
        loss_x, _ = model(packed, labels, torch.arange(87)[None])
    assert int(n_p) == int(n_a) + int(n_b)
    assert abs(float(loss_p) - float(loss_a + loss_b)) / float(n_p) < 1e-5
    assert abs(float(loss_x) - float(loss_a + loss_b)) / float(n_p) > 1e-4


def test_swiglu_keeping_gate_and_up_gives_the_same_loss_and_gradients_and_keeps_less(tiny_model_dir):
    """The MLPs' fused forward (silu(gate) and the product recomputed in the backward pass): the same loss and
    every gradient as transformers' forward, with two fewer tensors of the MLP's width kept per layer."""
    from infinitune.trainer.model import fuse_swiglu

    cfg = ModelConfig(path=str(tiny_model_dir))
    plain = TokenLossModel(load_causal_lm(cfg, torch.float32))
    fused = TokenLossModel(load_causal_lm(cfg, torch.float32))
    layers = plain.lm.config.num_hidden_layers
    assert fuse_swiglu(fused.lm) == layers
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 500, (2, 48), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    positions = torch.arange(48).repeat(2, 1)
    kept = {}
    grads = {}
    for name, model in (("plain", plain), ("fused", fused)):
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model(ids, labels, positions)
        loss.backward()
        kept[name] = sum(storages.values())
        grads[name] = (loss.detach(), {k: p.grad for k, p in model.named_parameters()})
    torch.testing.assert_close(grads["fused"][0], grads["plain"][0], rtol=1e-6, atol=1e-6)
    for k, grad in grads["plain"][1].items():
        torch.testing.assert_close(grads["fused"][1][k], grad, rtol=1e-4, atol=1e-6, msg=k)
    width = plain.lm.config.intermediate_size
    assert kept["plain"] - kept["fused"] == 2 * layers * ids.numel() * width * 4  # two fp32 tensors per layer


def test_packed_sdpa_is_chosen_only_where_it_keeps_the_models_attention():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    from infinitune.trainer.model import PACKED_SDPA, attention_implementation

    def chosen(config, **model):
        return attention_implementation(ModelConfig(path="m", **model), config)

    assert chosen(LlamaConfig()) == PACKED_SDPA
    assert chosen(MistralConfig(sliding_window=None)) == PACKED_SDPA
    assert chosen(Qwen2Config(use_sliding_window=False)) == PACKED_SDPA  # a window configured but off
    assert chosen(MistralConfig(sliding_window=4096)) == "sdpa"  # the window lives in the mask
    assert chosen(LlamaConfig(), compile_layers=True) == "sdpa"  # a loop over documents would recompile
    assert chosen(LlamaConfig(), attn_implementation="eager") == "eager"  # another kernel chosen is kept
    assert chosen(GPT2Config()) == "sdpa"  # its own attention code


def test_packed_sdpa_runs_each_document_alone_with_sdpas_loss_and_gradients(tiny_model_dir, monkeypatch):
    """Two rows of packed documents (one continuing from the row before, a padding run at a row's end): the
    packed attention, which lays the rows end to end and runs sdpa on each document by itself, gives the loss
    and gradients of sdpa over the rows with the block-diagonal mask, and calls it once per document and layer."""
    import transformers.integrations.sdpa_attention as sdpa_module
    from transformers import AttentionInterface

    from infinitune.trainer.model import PACKED_SDPA, document_lengths, register_packed_sdpa

    register_packed_sdpa()
    cfg = ModelConfig(path=str(tiny_model_dir))
    models = {
        name: TokenLossModel(load_causal_lm(cfg, torch.float32, attention=attention))
        for name, attention in (("sdpa", None), ("packed", PACKED_SDPA))
    }
    assert models["packed"].packed and not models["sdpa"].packed
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (2, 64), generator=g)
    # Row 0: documents of 20 and 30 tokens, then 14 of padding; row 1: a document continuing from before
    # (positions from 7), then one of 24.
    positions = torch.cat(
        [
            torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]),
            torch.cat([torch.arange(7, 47), torch.arange(24)]),
        ]
    ).view(2, 64)
    labels = ids.clone()
    labels[0, :4] = labels[0, 20:26] = labels[0, 50:] = labels[1, 40:45] = -100
    assert document_lengths(positions) == [20, 30, 14, 40, 24]

    calls = []
    real = sdpa_module.sdpa_attention_forward

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])  # the query's length
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counting)  # what the packed attention calls
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting)  # what "sdpa" models call
    results = {}
    for name, model in models.items():
        calls.clear()
        loss, n = model(ids, labels, positions)
        loss.backward()
        results[name] = (loss.detach(), n, {k: p.grad for k, p in model.named_parameters()}, list(calls))
    loss_s, n_s, grads_s, calls_s = results["sdpa"]
    loss_p, n_p, grads_p, calls_p = results["packed"]
    assert int(n_s) == int(n_p) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_p, loss_s, rtol=1e-5, atol=1e-5)
    for k, grad in grads_s.items():
        torch.testing.assert_close(grads_p[k], grad, rtol=1e-4, atol=1e-6, msg=k)
    layers = models["sdpa"].lm.config.num_hidden_layers
    assert calls_s == [64] * layers  # the whole rows, masked
    assert calls_p == [20, 30, 14, 40, 24] * layers  # each document by itself


def test_the_fast_output_layer_equals_the_full_forward(tiny_model_dir):
    lm = load_causal_lm(ModelConfig(path=str(tiny_model_dir)), torch.float32)
    fast, full = TokenLossModel(lm).eval(), TokenLossModel(lm).eval()
    full.plain_head = False
    ids = torch.randint(3, 500, (2, 40))
    labels = ids.clone()
    labels[:, :10] = -100
    pos = torch.arange(40).repeat(2, 1)
    with torch.no_grad():
        assert torch.allclose(fast(ids, labels, pos)[0], full(ids, labels, pos)[0], rtol=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, schedule="cosine")
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=100, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(50, linear) == pytest.approx(0.5)
    assert lr_factor(70, TrainConfig(schedule="constant", warmup_steps=0)) == 1.0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "recomputed"])
@pytest.mark.parametrize("tied, trained_from", [(False, 10), (True, 10), (False, 35)])
def test_the_loss_in_chunks_equals_the_loss_at_once_and_so_do_its_gradients(
    tiny_model_dir, tmp_path, tiny_tokenizer_dir, tied, trained_from, fused
):
    """model.loss_chunk_tokens: the output layer and loss in pieces give the loss and every gradient of the
    whole micro-batch at once; with tied embeddings too, and with pieces left empty. Fused (the gradients of
    each piece in the forward pass), or under ZeRO-3 each piece recomputed in the backward pass."""
    from infinitune.testing.tiny import save_tiny_llama

    path = save_tiny_llama(tmp_path / "tied", tiny_tokenizer_dir, tie_embeddings=True) if tied else tiny_model_dir
    lm = load_causal_lm(ModelConfig(path=str(path)), torch.float32)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :trained_from] = -100  # with 7: 2 x 39 positions in 12 pieces (from 35: 10 trained, 2 pieces empty)
    pos = torch.arange(40).repeat(2, 1)
    results = []
    for chunk in (0, 7):
        lm.zero_grad()
        loss, n = TokenLossModel(lm, loss_chunk_tokens=chunk, zero3=not fused)(ids, labels, pos)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in lm.named_parameters()}))
    (whole, grads_whole), (chunked, grads_chunked) = results
    assert int(n) == 2 * (39 - trained_from + 1) and torch.allclose(whole, chunked, rtol=1e-6)
    for name, g in grads_whole.items():  # float32 sums in another order: equal to 1e-5 of the gradient's scale
        assert (g - grads_chunked[name]).abs().max() <= 1e-5 * g.abs().max(), name


def test_the_compiled_loss_equals_the_eager_one_in_pieces_and_in_bfloat16(tiny_model_dir):
    """model.compile_layers compiles the cross-entropy too: same loss and gradients as eager, through the
    pieces' recomputation, and computed in float32 from bfloat16 logits as the eager one is."""
    from infinitune.trainer.model import cross_entropy_sum

    lm = load_causal_lm(ModelConfig(path=str(tiny_model_dir)), torch.float32)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100
    pos = torch.arange(40).repeat(2, 1)
    results = []
    compiled_model = TokenLossModel(lm, loss_chunk_tokens=7, compile_loss=True, zero3=True)  # pieces recomputed
    for model in (TokenLossModel(lm), compiled_model):
        lm.zero_grad()
        loss, _ = model(ids, labels, pos)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in lm.named_parameters()}))
    (eager, grads_eager), (compiled, grads_compiled) = results
    assert torch.allclose(eager, compiled, rtol=1e-6)
    for name, g in grads_eager.items():
        assert (g - grads_compiled[name]).abs().max() <= 1e-5 * g.abs().max(), name

    logits = (torch.randn(50, 300, generator=torch.Generator().manual_seed(2)) * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(3))
    outs = []
    for ce in (cross_entropy_sum, compiled_model.cross_entropy):
        logits.grad = None
        loss = ce(logits, targets)
        loss.backward()
        outs.append((loss.detach(), logits.grad.clone()))
    assert outs[0][0].dtype == outs[1][0].dtype == torch.float32
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-5)
    assert outs[1][1].dtype == torch.bfloat16 and torch.allclose(outs[0][1].float(), outs[1][1].float(), atol=1e-2)


def test_pieces_of_the_loss_are_refused_for_a_model_that_computes_its_own_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from infinitune.trainer.model import build_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    path = str(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"model\.loss_chunk_tokens: GPT2LMHeadModel"):
        build_model(ModelConfig(path=path, loss_chunk_tokens=64), None, torch.float32, None, 0, 10)
    assert build_model(ModelConfig(path=path), None, torch.float32, None, 0, 10).lm is not None


def test_deepspeed_config_follows_our_sections():
    layout = BatchLayout(16, 2, 2)
    c = deepspeed_config(
        DeepSpeedConfig(zero_stage=3, precision="bf16", param_persistence_threshold=0),
        TrainConfig(global_batch_size=16, micro_batch_size=2, max_grad_norm=0.5),
        layout,
    )
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (
        16,
        2,
        4,
    )
    assert c["zero_optimization"]["stage"] == 3 and c["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"] and c["gradient_clipping"] == 0.5
    assert "optimizer" not in c  # a client torch AdamW: nothing to compile
    off = deepspeed_config(
        DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_params="cpu"),
        TrainConfig(global_batch_size=16, micro_batch_size=2),
        layout,
    )
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam steps the offloaded state
    zero0 = deepspeed_config(DeepSpeedConfig(zero_stage=0, precision="fp32"), TrainConfig(), BatchLayout(8, 1, 1))
    assert zero0["zero_optimization"] == {"stage": 0} and not zero0["bf16"]["enabled"]
    assert zero0["gradient_clipping"] == 0.0  # the loop clips (and reports the norm) at stage 0 in fp32


def test_zero3_reduce_bucket_is_sized_to_the_model():
    def bucket(hidden, stage=3):
        c = deepspeed_config(DeepSpeedConfig(zero_stage=stage), TrainConfig(), BatchLayout(8, 1, 1), hidden)
        return c["zero_optimization"].get("reduce_bucket_size")

    assert bucket(2048) == 1 << 24  # a 1B model: 64 MB in fp32, not DeepSpeed's 2 GB; small models the same
    assert bucket(8192) == 8192 * 8192  # 70B-sized: hidden²
    assert bucket(65536) == 500_000_000  # never above DeepSpeed's default
    assert bucket(2048, stage=2) is None  # ZeRO-1/2 keep DeepSpeed's
    assert bucket(None) is None  # a config without a hidden size: DeepSpeed's


def test_flops_count_parameters_and_causal_attention_per_document():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    counter = FlopCounter(cfg, trainable=1000, frozen=500)
    one_doc = torch.arange(8)[None]
    two_docs = torch.cat([torch.arange(4), torch.arange(4)])[None]
    base = (6 * 1000 + 4 * 500) * 8
    assert counter.step_flops(one_doc) == base + 12 * 2 * 64 * sum(range(1, 9))
    assert counter.step_flops(two_docs) == base + 12 * 2 * 64 * 2 * sum(range(1, 5))


def test_checkpoint_file_owners():
    assert owner("zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert owner("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert owner("mp_rank_00_model_states.pt") == 0
    assert owner("rng.rank2.pt") == 2
    assert owner("trainer_state.json") == 0 and owner("hf/config.json") == 0


def _fake_checkpoint(directory, world=2):
    import hashlib

    directory.mkdir(parents=True)
    ranks = {}
    for r in range(world):
        (directory / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x" * (10 + r))
        name = f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        listing = {name: {"bytes": 10 + r, "sha256": hashlib.sha256(b"x" * (10 + r)).hexdigest()}}
        (directory / f"files.rank{r}.json").write_text(json.dumps(listing))
        ranks[str(r)] = hashlib.sha256((directory / f"files.rank{r}.json").read_bytes()).hexdigest()
    (directory / COMPLETE).write_text(json.dumps({"step": 1, "world_size": world, "ranks": ranks}))
    return directory


def test_checkpoint_completeness_is_checked_file_by_file(tmp_path):
    good = _fake_checkpoint(tmp_path / "a")
    assert checkpoint_problem(good, "sha256") is None
    (good / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"x" * 5)
    assert "truncated" in checkpoint_problem(good)
    flipped = _fake_checkpoint(tmp_path / "b")
    (flipped / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
    assert checkpoint_problem(flipped, "size") is None and "corrupted" in checkpoint_problem(flipped, "sha256")
    partial = _fake_checkpoint(tmp_path / "c")
    (partial / COMPLETE).unlink()
    assert "no completeness marker" in checkpoint_problem(partial)
    missing = _fake_checkpoint(tmp_path / "d")
    (missing / "files.rank1.json").unlink()
    assert "files.rank1.json" in checkpoint_problem(missing)


def test_a_background_save_writes_the_state_as_it_was_when_the_save_began(tmp_path):
    """The copy a background save writes: later in-place updates (the next optimizer steps) do not reach
    it, a view costs only its elements, and the types DeepSpeed's loaders rely on are kept."""
    from collections import OrderedDict, defaultdict

    flat = torch.arange(1000, dtype=torch.float32)  # ZeRO keeps partitions as views of one flat buffer
    moments = defaultdict(dict, {0: {"exp_avg": flat[10:20], "step": torch.tensor(3.0)}})
    state = {
        "module": OrderedDict(w=flat[:10]),
        "optimizer": {"state": moments, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
        "param_shapes": [OrderedDict(w=torch.Size([2, 5]))],
    }
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    module = torch.nn.Linear(2, 2).state_dict()  # carries _metadata, the per-module versions
    state["module"] = OrderedDict(w=flat[:10], **module)
    state["module"]._metadata = module._metadata
    state["loss_scaler"] = DynamicLossScaler(2.0**16, 1000, 1.0, 2, False)
    copy = snapshot(state)
    flat.add_(1000)  # the loop goes on training while the copy is written
    moments[0]["step"].add_(1)
    state["loss_scaler"].cur_scale /= 2  # fp16's dynamic scale moves as the steps overflow
    torch.save(copy, tmp_path / "ck.pt")
    back = torch.load(tmp_path / "ck.pt", weights_only=False)  # as DeepSpeed loads its own files
    assert torch.equal(back["module"]["w"], torch.arange(10, dtype=torch.float32))
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.arange(10, 20, dtype=torch.float32))
    assert back["optimizer"]["state"][0]["step"].item() == 3.0
    assert back["module"]["w"].untyped_storage().nbytes() == 10 * 4  # not the whole flat buffer
    assert type(copy["module"]) is OrderedDict and type(copy["optimizer"]["state"]) is defaultdict
    assert copy["module"]._metadata == module._metadata
    assert copy["loss_scaler"].cur_scale == 2.0**16 != state["loss_scaler"].cur_scale
    assert type(copy["param_shapes"][0]["w"]) is torch.Size and copy["optimizer"]["param_groups"][0]["betas"] == (
        0.9,
        0.95,
    )


def test_a_state_whose_copy_would_not_fit_in_host_memory_is_written_at_once(monkeypatch, tmp_path):
    """A background save copies each state dict DeepSpeed hands it into host memory; one that would not fit
    (with the reserve to spare) goes to the real engine at once instead, as a synchronous save would."""
    from infinitune.trainer import background

    written = []

    class Engine:  # DeepSpeed's checkpoint engine: save(state_dict, path)
        def save(self, state_dict, path):
            written.append(path)

    big = {"optimizer": {"exp_avg": torch.zeros(1000), "steps": [torch.zeros(10, dtype=torch.int64)]}}
    assert background.tensor_bytes(big) == 1000 * 4 + 10 * 8
    free = background.SNAPSHOT_RESERVE_BYTES + 3000  # room for a 3000-byte copy, not for a 4080-byte one
    monkeypatch.setattr(background, "host_memory_available", lambda: free)
    engine = background.SnapshotEngine(Engine(), step=5, rank=0)
    engine.save({"w": torch.zeros(100)}, "small.pt")  # 400 bytes: copied, written later by the thread
    engine.save(big, "big.pt")
    assert written == ["big.pt"] and engine.written_now == [4080]
    assert [path for _, path in engine.pending] == ["small.pt"]

    monkeypatch.setattr(background, "host_memory_available", lambda: 2**40)
    monkeypatch.setenv("INFINITUNE_FAULT", "rank1:snapshot:5:nomem")  # the tests' way to run out, on rank 1
    engine = background.SnapshotEngine(Engine(), step=5, rank=1)
    engine.save({"w": torch.zeros(100)}, "rank1.pt")
    assert written[-1] == "rank1.pt" and not engine.pending
    engine = background.SnapshotEngine(Engine(), step=5, rank=0)  # not the rank the fault names
    engine.save({"w": torch.zeros(1)}, "rank0.pt")
    assert written[-1] == "rank1.pt" and [path for _, path in engine.pending] == ["rank0.pt"]


def test_host_memory_available_reads_the_nearest_cgroup_limit(tmp_path):
    """The memory a background save may copy into: the system's available memory, or a cgroup limit less its
    usage (inactive page cache counted as free), the process's own cgroup or a parent's, v2 or v1."""
    import psutil

    from infinitune.trainer.host_memory import host_memory_available

    system = psutil.virtual_memory().available
    GB = 2**30

    def cgroup(directory, limit, usage, stat):
        directory.mkdir(parents=True, exist_ok=True)
        v2 = "memory" not in directory.parts
        (directory / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(f"{limit}\n")
        (directory / ("memory.current" if v2 else "memory.usage_in_bytes")).write_text(f"{usage}\n")
        (directory / "memory.stat").write_text(stat)

    # v2: no limit on the job's own cgroup ("max"), 3 GB on its parent with 2.5 GB used, 1 GB of it inactive cache.
    root = tmp_path / "v2"
    cgroup(root / "slurm" / "job_7", "max", 5 * GB, "anon 1\ninactive_file 9\n")
    cgroup(root / "slurm", 3 * GB, int(2.5 * GB), f"active_file 5\ninactive_file {GB}\n")
    (tmp_path / "v2.proc").write_text("0::/slurm/job_7\n")
    assert host_memory_available(root, tmp_path / "v2.proc") == min(system, int(1.5 * GB))

    # v1 beside a v2 line (a hybrid system): the memory controller's limit counts; "unlimited" is a huge number.
    root = tmp_path / "v1"
    cgroup(root / "memory" / "docker" / "abc", 2 * GB, GB, f"total_inactive_file {GB // 2}\n")
    cgroup(root / "memory", 9223372036854771712, 10 * GB, "total_inactive_file 0\n")
    (tmp_path / "v1.proc").write_text("4:memory:/docker/abc\n1:cpu:/\n0::/\n")
    assert host_memory_available(root, tmp_path / "v1.proc") == min(system, int(1.5 * GB))

    # A namespaced container sees its own cgroup as the root; the path in /proc does not exist under it.
    (tmp_path / "ns.proc").write_text("0::/kubepods/pod1/c1\n")
    cgroup(tmp_path / "ns", 4 * GB, GB, "inactive_file 0\n")
    assert host_memory_available(tmp_path / "ns", tmp_path / "ns.proc") == min(system, 3 * GB)
    # No cgroup files at all: the system's figure.
    assert abs(host_memory_available(tmp_path / "none", tmp_path / "none.proc") - system) < GB


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    from infinitune.trainer.model import build_model

    grads = []
    for checkpointing in (False, True):
        model = build_model(
            ModelConfig(path=str(tiny_model_dir), gradient_checkpointing=checkpointing),
            None,
            torch.float32,
            None,
            0,
            total_steps=10,
        )
        model.train()
        ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(1))
        loss, _ = model(ids, ids.clone(), torch.arange(32).repeat(2, 1))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_process_that_loaded_partitioned_loads_whole_models_afterwards(tiny_model_dir):
    """After training with ZeRO-3 (transformers told to build models partitioned), loading a model in the same
    process (a base to evaluate, a checkpoint to consolidate) must give real weights, not ZeRO placeholders."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from infinitune.trainer import model as model_module

    model_module._HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(
        {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    )
    assert is_deepspeed_zero3_enabled()  # what a ZeRO-3 training run leaves behind
    lm = load_causal_lm(ModelConfig(path=str(tiny_model_dir)), torch.float32)
    assert not is_deepspeed_zero3_enabled()
    assert all(p.numel() > 0 and not hasattr(p, "ds_id") for p in lm.parameters())


def test_a_fault_at_every_step_and_its_slow_wait(monkeypatch):
    import time

    from infinitune.trainer import faults

    monkeypatch.setenv("INFINITUNE_FAULT", "rank1:after_step:*:slow,after_step:7:nomem")
    monkeypatch.setenv("INFINITUNE_FAULT_SLOW_S", "0.2")
    assert faults.injected("after_step", 3, 1, "slow") and faults.injected("after_step", 90, 1, "slow")
    assert not faults.injected("after_step", 3, 0, "slow") and not faults.injected("during_save", 3, 1, "slow")
    assert faults.injected("after_step", 7, 0, "nomem") and not faults.injected("after_step", 8, 0, "nomem")
    started = time.perf_counter()
    faults.maybe_fail("after_step", 5, 1)
    assert 0.2 <= time.perf_counter() - started < 2.5


def test_a_format_1_checkpoint_reads_as_this_version(tmp_path):
    """Checkpoints written before the parts were named (the loop's fields at the top of trainer_state.json,
    AdaLoRA's budget in extra.rankR.pt) load into the same parts."""
    from infinitune.trainer.checkpoint_format import STATE, rank_state_path, read_trainer_state, write_trainer_state

    v1 = {"step": 12, "tokens_seen": 480, "best_eval_loss": 1.5, "data": {"position": 96, "epoch": 0}}
    (tmp_path / STATE).write_text(json.dumps({**v1, "world_size": 2, "zero_stage": 3, "config": {}}))
    state = read_trainer_state(tmp_path)
    assert state["parts"] == {
        "train": {"step": 12, "tokens_seen": 480, "best_eval_loss": 1.5},
        "data": {"position": 96, "epoch": 0},
    }
    assert state["step"] == 12 and state["zero_stage"] == 3
    assert rank_state_path(tmp_path, "adapter", 1, format_version=1).name == "extra.rank1.pt"
    assert rank_state_path(tmp_path, "adapter", 1).name == "adapter.rank1.pt"

    write_trainer_state(tmp_path, 13, {"train": {"step": 13}, "data": {"position": 104}}, {"world_size": 1})
    again = read_trainer_state(tmp_path)
    assert again["format_version"] == 2 and again["step"] == 13 and again["parts"]["data"] == {"position": 104}


def test_gloo_is_bound_to_the_interface_toward_the_master():
    """Without GLOO_SOCKET_IFNAME, gloo binds to the address the host name resolves to (loopback on many images);
    init_distributed names the interface the route to MASTER_ADDR leaves from instead."""
    from infinitune.trainer.distributed import interface_of, interface_toward

    assert interface_toward("127.0.0.1") == interface_of("127.0.0.1") == "lo"
    assert interface_toward("no-such-host.invalid") is None


def test_the_step_profiler_records_only_its_steps_per_step(tmp_path):
    from infinitune.trainer.metrics import StepProfiler

    profiler = StepProfiler([2, 3], tmp_path / "profile" / "rank0")
    a, recorded = torch.randn(64, 64), {}
    for step in range(1, 5):
        profiler.before(step)
        for _ in range(step):  # step s does s matrix products: steps 2 and 3 do 5, 2.5 per step
            a = torch.mm(a, a).tanh()
        recorded[step] = profiler.after(step)
    assert [s for s, rows in recorded.items() if rows is not None] == [3]  # returned once, at the last step
    (mm,) = [r for r in recorded[3] if r[0] == "aten::mm"]
    assert mm[2] == 2.5 and mm[1] > 0
    assert "aten::mm" in (tmp_path / "profile" / "rank0.txt").read_text()
    assert json.loads((tmp_path / "profile" / "rank0.json").read_text())["traceEvents"]
    assert StepProfiler([], tmp_path / "none").after(0) is None  # off: nothing recorded, nothing written
    assert not (tmp_path / "none.txt").exists()
