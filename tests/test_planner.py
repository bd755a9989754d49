"""The memory planner: parameter counts, consistency, and its formulas checked against real
tensors on CPU (saved activations of a Llama forward; params / grads / master / Adam state of a
real single-backend step)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from unsloth_dist.launch import planner as PL
from unsloth_dist.launch.planner import PRESETS, VARIANTS, estimate, shape_from_hf_config

V = {v.name: v for v in VARIANTS}


def hf_llama(h=128, I=352, L=2, nh=4, nkv=2, vocab=512, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=I, num_hidden_layers=L, num_attention_heads=nh,
                      num_key_value_heads=nkv, max_position_embeddings=256, tie_word_embeddings=tie,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), cfg


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_transformers(tie):
    model, cfg = hf_llama(tie=tie)
    shape = shape_from_hf_config(cfg.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_param_count_qwen2_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    assert shape_from_hf_config(cfg.to_dict()).params == sum(p.numel() for p in model.parameters())


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    model, cfg = hf_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape_from_hf_config(cfg.to_dict()).lora_params(8) == trainable


def test_presets_have_their_published_sizes():
    assert PRESETS["llama-3.2-1b"].params == 1_235_814_400
    assert PRESETS["llama-3.1-8b"].params == 8_030_261_248
    assert PRESETS["qwen2.5-7b"].params == 7_615_616_512
    assert PRESETS["mistral-7b"].params == 7_248_023_552


def test_consistency():
    m = PRESETS["llama-3.1-8b"]
    kw = dict(gpus=8, seq=2048, micro_batch=1)
    for p in PL.PRECISIONS:
        full = {n: estimate(m, V[n], p, **kw) for n in ("ddp", "zero1", "zero2", "zero3")}
        static = {n: sum(e.parts[k] for k in ("weights", "grads", "master", "adam")) for n, e in full.items()}
        assert static["zero3"] < static["zero2"] < static["zero1"] < static["ddp"], static
        lora = estimate(m, V["ddp"], p, lora=True, **kw)
        opt = lambda e: sum(e.parts[k] for k in ("grads", "master", "adam"))  # noqa: E731
        assert opt(lora) < 0.02 * opt(full["ddp"])
        assert lora.allocated < 0.6 * full["ddp"].allocated
        for v in VARIANTS[1:]:
            # peak = static + max(backward, step): never decreasing, strictly once activations dominate
            a = [estimate(m, v, p, gpus=8, seq=s, micro_batch=1) for s in (512, 1024, 2048, 4096, 8192)]
            b = [estimate(m, v, p, gpus=8, seq=1024, micro_batch=mb) for mb in (1, 2, 4, 8, 16)]
            for series in (a, b):
                peak = [e.allocated for e in series]
                acts = [e.parts["activations"] + e.parts["autocast_copies"] for e in series]
                assert peak == sorted(peak) and acts == sorted(acts) and len(set(acts)) == 5, v
                assert peak[-1] > peak[-2], v
            ck = estimate(m, v, p, gpus=8, seq=4096, micro_batch=4, gradient_checkpointing=True)
            assert ck.parts["activations"] < estimate(m, v, p, gpus=8, seq=4096, micro_batch=4).parts["activations"] / 4
    # more GPUs never need more memory per GPU with sharding
    e = [estimate(m, V["zero3"], "bf16", gpus=g, seq=2048).allocated for g in (2, 4, 8)]
    assert e == sorted(e, reverse=True)


def test_recommendation_fits_and_prefers_less_communication():
    m = PRESETS["llama-3.1-8b"]
    plan = PL.plan(m, 8, 80, precisions=("bf16",), seq=2048)
    assert plan.recommended is not None and plan.recommended.reserved <= 80 * PL.GiB
    assert plan.recommended.backend != "ddp"  # 8B full fine-tuning with Adam does not fit replicated
    small = PL.plan(PRESETS["llama-3.2-1b"], 8, 80, precisions=("bf16",), seq=1024, lora=True)
    assert small.recommended.backend == "ddp"
    assert PL.plan(m, 1, 16, precisions=("fp32",), seq=4096).recommended is None


def _saved_activation_bytes(model, mode, ids):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
            logits = model(input_ids=ids, use_cache=False).logits
        logits = logits[:, :-1].float()  # the trainer's token loss
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16-mixed"])
@pytest.mark.parametrize("ckpt", [False, True, 1], ids=["no-ckpt", "ckpt", "ckpt-first-1-of-3"])
def test_activation_formula_matches_saved_tensors(mode, ckpt):
    model, cfg = hf_llama(h=256, I=688, L=3, nh=8, nkv=2, vocab=2048)
    if mode == "bf16":
        model.to(torch.bfloat16)
    k = None if ckpt is True else ckpt if ckpt is not False else None
    if ckpt is not False:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.model.layers[k or cfg.num_hidden_layers:]:  # what the Trainer does for K
            layer.gradient_checkpointing = False
    model.train()
    B, S = 2, 96
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    measured = _saved_activation_bytes(model, mode, ids)
    acts, copies = PL.activation_bytes(shape_from_hf_config(cfg.to_dict()), mode, B * S, ckpt is not False, k, kernels=False)
    if ckpt is not False:
        # after forward the checkpointed layers keep their inputs only; the one recomputed layer
        # (and its autocast copies) exist during backward, not here
        one = lambda n: PL.activation_bytes(shape_from_hf_config(cfg.to_dict() | {"num_hidden_layers": n}), mode, 1, False, kernels=False)  # noqa: E731
        acts -= B * S * (one(1)[0] - one(0)[0])
        copies -= one(1)[1] - one(0)[1]
    assert measured == pytest.approx(acts + copies, rel=0.05), (measured, acts, copies)


def _graph_saved_bytes(root, exclude: set) -> int:
    """Bytes of the distinct storages the autograd graph behind `root` holds for backward (outside
    `exclude`, the parameters): the saved tensors of torch's nodes, and of custom Functions both
    `save_for_backward` and tensors kept as ctx attributes (the fused cross-entropy keeps its
    gradients computed in the forward that way)."""
    nodes, stack, seen = set(), [root], {}

    def add(x):
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if st.data_ptr() not in exclude:
                seen.setdefault(st.data_ptr(), st.nbytes())
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)

    while stack:
        n = stack.pop()
        if n is None or id(n) in nodes:
            continue
        nodes.add(id(n))
        for a in dir(n):
            if a.startswith("_saved_"):
                try:
                    add(getattr(n, a))
                except RuntimeError:
                    pass
        if hasattr(n, "saved_tensors"):
            add(n.saved_tensors)
        for v in getattr(n, "__dict__", {}).values():
            add(v)
        stack.extend(nx for nx, _ in n.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("mode,lora", [("bf16", False), ("bf16", True), ("fp32", False), ("bf16-mixed", False)])
def test_kernel_activation_formula_matches_the_patched_graph(monkeypatch, mode, lora):
    """With unsloth_dist's kernels (patch_model, run by Triton's interpreter here) the planner's
    activations per token, plus the head's gradient the fused cross-entropy computes in the forward
    (full fine-tuning), are what the autograd graph of a patched Llama holds after its forward."""
    from unsloth_dist.kernels._utils import triton_interpreter_ready
    from unsloth_dist.models import patch_model

    if not triton_interpreter_ready() or torch.cuda.is_available():
        pytest.skip("needs triton imported under TRITON_INTERPRET=1 (tests/conftest.py) on a CPU-only machine")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, cfg = hf_llama(h=128, I=352, L=2, nh=4, nkv=2, vocab=512)
    r = 8
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if mode == "bf16":
        model.to(torch.bfloat16)
    report = patch_model(model)
    assert {"rms_norm", "rope", "swiglu", "fused_cross_entropy"} <= set(report.patched), report
    model.train()
    B, S = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
        loss = model(input_ids=ids, labels=ids, loss_reduction="sum").loss
    measured = _graph_saved_bytes(loss.grad_fn, {p.untyped_storage().data_ptr() for p in model.parameters()})
    m = shape_from_hf_config(cfg.to_dict())
    acts, copies = PL.activation_bytes(m, mode, B * S, False, kernels=True, lora_r=r if lora else 0)
    head_grad = 0 if lora else (4 if mode == "fp32" else 2) * m.vocab * m.hidden
    assert measured == pytest.approx(acts + copies + head_grad, rel=0.04), (measured, acts, copies, head_grad)
    # and the estimate counts that head gradient for full fine-tuning only; fp32 with grouped-query
    # attention also the attention probabilities of the GPU's math path (CPU's SDPA has a fused kernel)
    est = estimate(m, V["single"], mode, micro_batch=B, seq=S, lora=lora, lora_r=r)
    math_path = m.layers * PL.attention_matrix_bytes(m, mode, B * S, S)
    assert (math_path > 0) == (mode == "fp32")
    assert est.parts["activations"] == acts + head_grad + math_path


def test_estimates_match_the_measured_gpu_peaks():
    """benchmarks/results/memory_h200_2026-12-04_*.json: peak allocated GPU memory of real training runs
    (bench_memory.py, one H200, every backend and offload variant, full / LoRA / QLoRA, bf16 / bf16-mixed / fp32, with and
    without the kernels and gradient checkpointing, 1B, 3B and 8B shapes). The planner's estimate for each
    must stay within -3% / +10% of what was measured."""
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("memory_h200_2026-12-04_*.json"))
    rows = [r for f in files for r in json.loads(f.read_text()) if "error" not in r]
    assert len(rows) >= 46, files
    off = []
    for r in rows:
        variant = V[r["backend"]]
        est = estimate(PL.resolve_model(r["model"]), variant, r["precision"], gpus=r["gpus"], micro_batch=r["micro_batch"],
                       seq=r["seq"], lora=r["kind"] == "lora", qlora=r["kind"] == "qlora",
                       gradient_checkpointing=r["checkpointing"], kernels=r.get("kernels", True))
        ratio = est.allocated / 2**30 / max(r["measured_allocated_gib"])
        if not 0.97 <= ratio <= 1.10:
            off.append((r["model"], r["case"], round(ratio, 3)))
    assert not off, off


def test_checkpoint_layers_in_estimates_and_errors():
    m = PRESETS["llama-3.1-8b"]
    v = V["ddp"]
    kw = dict(gpus=2, seq=2048, micro_batch=4, lora=True, gradient_checkpointing=True)
    acts = [estimate(m, v, "bf16", checkpoint_layers=k, **kw).activations for k in (0, 8, 24, 32)]
    assert acts == sorted(acts, reverse=True)  # fewer checkpointed layers, more activations
    assert acts[-1] == estimate(m, v, "bf16", **kw).activations  # K = all layers is plain checkpointing
    assert acts[0] == pytest.approx(estimate(m, v, "bf16", **(kw | {"gradient_checkpointing": False})).activations)
    # each un-checkpointed layer adds its full activations less the input a checkpointed one keeps:
    # with the kernels (12h + 6I + 4kv + 4nh + 8 + the adapters' 7 x 2r) - 2h bytes per token in bf16;
    # transformers' own Llama (20h + 8I + 4kv + 4(nh + 2)) - 2h
    h, inter, kv, nh = m.hidden, m.intermediate, m.kv_dim, m.heads
    assert acts[2] - acts[3] == 8 * 4 * 2048 * (10 * h + 6 * inter + 4 * kv + 4 * nh + 8 + 7 * 2 * 16)
    plain = [estimate(m, v, "bf16", checkpoint_layers=k, kernels=False, **kw).activations for k in (24, 32)]
    assert plain[0] - plain[1] == 8 * 4 * 2048 * (18 * h + 8 * inter + 4 * kv + 4 * (nh + 2))
    with pytest.raises(PL.ConfigError, match="has 32 decoder layers"):
        estimate(m, v, "bf16", checkpoint_layers=33, **kw)
    with pytest.raises(PL.ConfigError, match="needs --gradient-checkpointing"):
        PL.plan(m, 2, 80, checkpoint_layers=4)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
def test_static_parts_match_a_real_step(tmp_path, precision):
    """params / grads / master / Adam of the single backend after a real step vs the estimate."""
    from unsloth_dist import Trainer

    model, cfg = hf_llama(h=128, I=352, L=2, vocab=512)
    data = [{"input_ids": [(i * 7 + j) % 512 for j in range(16)]} for i in range(16)]
    trainer = Trainer(model, data, args={"backend": "single", "precision": precision, "max_steps": 1,
                                         "per_device_train_batch_size": 2, "output_dir": str(tmp_path),
                                         "disable_tqdm": True})
    trainer.train()
    be = trainer.backend
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    weights = nbytes(be.module.parameters())
    master = nbytes(be._master) if getattr(be, "_master", None) else 0
    adam = nbytes(t for st in be.optimizer.state.values() for k, t in st.items() if k != "step")
    batch = trainer.collator(data[:2])
    be.backward(trainer._forward_loss_sum(batch))
    grads = nbytes(p.grad for p in be.module.parameters() if p.grad is not None)
    est = estimate(shape_from_hf_config(cfg.to_dict()), V["single"], precision, gpus=1, micro_batch=2, seq=16)
    assert weights == est.parts["weights"]
    assert grads == est.parts["grads"]
    assert master == est.parts["master"]
    assert adam == est.parts["adam"]


def test_plan_command_json():
    from unsloth_dist.cli import app

    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.2-1b", "--gpus", "2", "--lora", "--json", "-p", "bf16"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["params"] == 1_235_814_400 and data["recommended"]["backend"] == "ddp"
    assert {row["backend"] for row in data["rows"]} >= {"ddp", "zero1", "zero2", "zero3", "fsdp"}


def test_plan_from_config_dir(tmp_path):
    from unsloth_dist.cli import app

    _, cfg = hf_llama()
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    r = CliRunner().invoke(app, ["plan", "--model", str(tmp_path), "--gpus", "2", "--gpu-memory", "24"])
    assert r.exit_code == 0, r.output
    assert "recommended" in r.output


def test_plan_command_checkpoint_layers():
    from unsloth_dist.cli import app

    base = ["plan", "--model", "llama-3.1-8b", "--gpus", "2", "--lora", "--json", "-p", "bf16", "--gradient-checkpointing"]
    rows = {}
    for k in (None, 8):
        r = CliRunner().invoke(app, base + ([] if k is None else ["--checkpoint-layers", str(k)]))
        assert r.exit_code == 0, r.output
        rows[k] = {row["backend"]: row for row in json.loads(r.output)["rows"]}
        assert all(row["checkpoint_layers"] == k for row in rows[k].values())
    assert rows[8]["ddp"]["activations"] > rows[None]["ddp"]["activations"]
    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "2", "--checkpoint-layers", "4"])
    assert r.exit_code != 0 and "needs --gradient-checkpointing" in r.output


def test_activation_offload_keeps_one_layer_input_on_the_gpu():
    m = PRESETS["llama-3.1-8b"]
    kw = dict(gpus=2, seq=2048, micro_batch=4, lora=True, gradient_checkpointing=True)
    plain = estimate(m, V["fsdp"], "bf16", **kw)
    off = estimate(m, V["fsdp"], "bf16", activation_offload=True, **kw)
    # 31 of the 32 bf16 layer inputs (2h bytes per token) leave the GPU; the next one to recompute stays
    assert plain.parts["activations"] - off.parts["activations"] == 31 * 4 * 2048 * 2 * m.hidden
    assert off.activation_offload and not plain.activation_offload
    # on the host: every layer's input (the one fetched back too), 16 MiB x 4 here, a power of two
    assert off.host_offload == 32 * 4 * 2048 * 2 * m.hidden and plain.host_offload == 0
    # a size between powers of two takes the next one (the pool's buffers): 3000 x 4096 x 2 B -> 32 MiB
    odd = estimate(m, V["fsdp"], "bf16", activation_offload=True, **dict(kw, micro_batch=1, seq=3000))
    assert odd.host_offload == 32 * 2**25
    # with only the first 8 layers checkpointed, 7 of their 8 inputs leave
    part = dict(kw, checkpoint_layers=8)
    assert (estimate(m, V["fsdp"], "bf16", **part).parts["activations"]
            - estimate(m, V["fsdp"], "bf16", activation_offload=True, **part).parts["activations"]) == 7 * 4 * 2048 * 2 * m.hidden
    with pytest.raises(PL.ConfigError, match="--activation-offload needs --gradient-checkpointing"):
        PL.plan(m, 2, 80, activation_offload=True)
    from unsloth_dist.cli import app

    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "2", "--lora", "--json", "-p", "bf16",
                                 "--gradient-checkpointing", "--activation-offload"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert all(row["activation_offload"] and row["host_offload"] == 0.5 for row in rows)  # GiB: 32 bf16 inputs of 16 MiB (2048 x 4096) at micro-batch 1
    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "2", "--lora", "-p", "bf16",
                                 "--gradient-checkpointing", "--activation-offload", "--seq", "8192"])
    assert r.exit_code == 0 and "pinned host memory per GPU" in r.output, r.output


def test_fsdp_keeps_at_most_one_vocabulary_matrix_whole():
    """fsdp (sharding full) keeps the root whole through the step but frees an untied input embedding
    and an untied head after their forwards (backends/fsdp.py): tied, the one shared vocab x hidden
    matrix stays unsharded, untied none; grad_op keeps everything gathered, so there the untied model
    holds both. Under bf16 a LoRA model's frozen base is counted at 2 bytes per parameter."""
    import dataclasses

    untied = PRESETS["llama-3.1-8b"]
    assert not untied.tie_embeddings
    tied = dataclasses.replace(untied, tie_embeddings=True)
    kw = dict(gpus=2, seq=2048, micro_batch=1, lora=True, gradient_checkpointing=True)
    full = [estimate(m, V["fsdp"], "bf16", **kw).parts["unsharded"] for m in (tied, untied)]
    assert full[0] - full[1] == 2 * untied.vocab * untied.hidden  # bf16 bytes of the one matrix
    # the untied head is whole while the loss runs (its forward): counted at that moment
    assert estimate(untied, V["fsdp"], "bf16", **kw).parts["head_gathered"] == 2 * untied.vocab * untied.hidden
    assert "head_gathered" not in estimate(tied, V["fsdp"], "bf16", **kw).parts
    # + the head's gradient, and its reduce-scatter: an fp32 input and the fp32 shard (1/N) it leaves
    trained = estimate(untied, V["fsdp"], "bf16", **{**kw, "lora": False})
    assert trained.parts["head_gathered"] == 2 * 2 * untied.vocab * untied.hidden + 4 * untied.vocab * untied.hidden * 1.5
    lora = estimate(untied, V["fsdp"], "bf16", **kw)
    T = untied.lora_params(16)
    assert lora.parts["weights"] == (2 * untied.params + 4 * T) / 2
    grad_op = [estimate(m, V["fsdp(grad_op)"], "bf16", **kw).parts["unsharded"] for m in (tied, untied)]
    assert grad_op[1] - grad_op[0] == 2 * untied.vocab * untied.hidden


def test_zero_bucket_is_the_trainable_count_unless_set():
    """An unset reduce_bucket_size is lowered to the trainable elements at setup (backends/deepspeed.py):
    under LoRA the planner counts a bucket of the adapters' size; a size the user set is kept."""
    from unsloth_dist.config import ZeroConfig

    m = PRESETS["llama-3.1-8b"]
    kw = dict(gpus=2, seq=2048, micro_batch=1, lora=True, gradient_checkpointing=True)
    T = m.lora_params(16)
    # the ZeRO-3 bucket is in the communication dtype: fp32 on 2 ranks (reduce_dtype fp32), bf16 on one
    assert estimate(m, V["zero3"], "bf16", **kw).parts["buckets"] == 4 * T
    assert estimate(m, V["zero3"], "bf16", **{**kw, "gpus": 1}).parts["buckets"] == 2 * T
    bf16_comm = ZeroConfig(name="zero3", reduce_dtype="bf16")
    assert estimate(m, V["zero3"], "bf16", zero=bf16_comm, **kw).parts["buckets"] == 2 * T
    set_ = ZeroConfig(name="zero3", reduce_bucket_size=500_000_000)
    assert estimate(m, V["zero3"], "bf16", zero=set_, **kw).parts["buckets"] == 4 * 500_000_000
    full = estimate(m, V["zero3"], "bf16", gpus=2, seq=2048, micro_batch=1, gradient_checkpointing=True)
    assert full.parts["buckets"] == 4 * 500_000_000  # 8B trainable elements: the default stays


def test_planner_refuses_moe_and_prequantized_configs_and_prefers_no_offload():
    from unsloth_dist.config import ConfigError
    from unsloth_dist.launch import planner as P

    base = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8}
    with pytest.raises(ConfigError, match="mixture of experts.*num_local_experts"):
        P.shape_from_hf_config(base | {"num_local_experts": 8}, "mixtral")
    with pytest.raises(ConfigError, match="pre-quantized.*quantization_config"):
        P.shape_from_hf_config(base | {"quantization_config": {"load_in_4bit": True}}, "bnb")
    # 8B on 8 GPUs of 40 GiB: plain fsdp fits, so no CPU-offloading variant is recommended
    plan = P.plan(P.PRESETS["llama-3.1-8b"], 8, 40.0, precisions=("bf16",))
    assert plan.recommended is not None and plan.recommended.backend == "fsdp", plan.recommended  # was zero2+offload_opt
    offloading = [v.name for v in P.VARIANTS if v.offload_optimizer or v.offload_param]
    assert P.PREFERENCE[-len(offloading):] == offloading


def test_plan_no_kernels_counts_the_logits():
    """`plan --no-kernels`: a model as transformers built it keeps the logits' loss buffers (two fp32
    [tokens, vocab]) the fused cross-entropy never makes; the default plans the kernels."""
    from unsloth_dist.cli import app

    def rows(*extra):
        r = CliRunner().invoke(app, ["plan", "--model", "llama-3.2-1b", "--gpus", "1", "--micro-batch", "2", "--json",
                                     "-p", "bf16", *extra])
        assert r.exit_code == 0, r.output
        return {row["backend"]: row for row in json.loads(r.output)["rows"]}

    fused, plain = rows(), rows("--no-kernels")
    assert fused["single"]["kernels"] is True and plain["single"]["kernels"] is False
    m = PRESETS["llama-3.2-1b"]
    assert plain["single"]["transient"] == pytest.approx(8 * 2 * 2048 * m.vocab / 2**30, abs=1e-3)
    assert plain["single"]["allocated"] > 1.3 * fused["single"]["allocated"]


def test_qlora_stores_the_layer_linears_in_nf4():
    """--qlora: the decoder layers' linears at NF4 with double quantization (0.5 + 1/64 + 4/16384 bytes
    per weight), embeddings / norms / head in the weight dtype, LoRA adapters trained as under --lora;
    sharded by fsdp / zero3 like the rest of the base. `--lora-r` without adapters is an error."""
    from unsloth_dist.cli import app

    m = PRESETS["llama-3.1-8b"]
    kw = dict(gpus=2, seq=2048, micro_batch=1, gradient_checkpointing=True)
    T = m.lora_params(16)
    Q = m.layers * m.layer_matmul_params
    q = estimate(m, V["ddp"], "bf16", qlora=True, **kw)
    lo = estimate(m, V["ddp"], "bf16", lora=True, **kw)
    assert q.lora and q.qlora
    assert lo.weights - q.weights == pytest.approx((2 - PL.NF4_BYTES) * Q)
    assert q.weights == pytest.approx(2 * (m.params - Q) + PL.NF4_BYTES * Q + 2 * T)
    assert (q.grads, q.optimizer) == (lo.grads, lo.optimizer)
    z3 = estimate(m, V["zero3"], "bf16", qlora=True, **kw)
    assert z3.parts["weights"] == pytest.approx(q.weights / 2)
    fs = estimate(m, V["fsdp"], "bf16", qlora=True, **kw)
    assert fs.parts["weights"] == pytest.approx((2 * (m.params - Q) + PL.NF4_BYTES * Q + 4 * T) / 2)
    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "2", "--qlora", "--json", "-p", "bf16"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert all(row["qlora"] and row["lora"] for row in rows)
    r = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "2", "--lora-r", "8"])
    assert r.exit_code != 0 and "--lora-r 8 without --lora" in r.output, r.output


def test_trainer_memory_preflight_estimates_the_run_it_is_given(tmp_path, caplog):
    """Before the process group, the Trainer sizes its own run with the planner (on a GPU; here with a
    given GPU size): the shape from the model's config, LoRA from peft, the kernels from patch_model,
    the sequence from the longest sample; a warning when the estimate does not fit the GPU."""
    import logging

    from unsloth_dist import Trainer
    from unsloth_dist.config import load_config
    from unsloth_dist.distributed import read_launch_env, resolve_backend
    from unsloth_dist.trainer import _memory_preflight

    model, cfg = hf_llama(h=128, I=352, L=2, vocab=512)
    data = [{"input_ids": list(range(40))}, {"input_ids": list(range(24))}]
    tc = load_config({"output_dir": str(tmp_path), "precision": "bf16", "per_device_train_batch_size": 2,
                      "backend": "ddp", "max_steps": 1})
    env = read_launch_env()
    backend = resolve_backend(tc.backend, env)
    shape = shape_from_hf_config(cfg.to_dict())
    est = _memory_preflight(model, tc, backend, env, 40, gpu_bytes=2**40)
    want = estimate(shape, V["ddp"], "bf16", gpus=1, micro_batch=2, seq=40, kernels=False)
    assert est is not None and est.allocated == want.allocated and not est.lora
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        _memory_preflight(model, tc, backend, env, 40, gpu_bytes=2**20)
    assert "will likely run out of memory" in caplog.text and "micro-batch 2 x 40 tokens" in caplog.text
    # LoRA (peft) and the kernels (patch_model) are read off the model
    from peft import LoraConfig, get_peft_model

    from unsloth_dist.models import patch_model

    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    patch_model(lora)
    est = _memory_preflight(lora, tc, backend, env, 40, gpu_bytes=2**40)
    assert est.lora and est.kernels
    assert est.allocated == estimate(shape, V["ddp"], "bf16", gpus=1, micro_batch=2, seq=40, lora=True, lora_r=8).allocated
    # a model the planner cannot size: no estimate, no error
    assert _memory_preflight(torch.nn.Linear(2, 2), tc, backend, env, 40, gpu_bytes=2**40) is None
    # on CPU the Trainer itself does not guess a GPU
    assert Trainer(hf_llama()[0], data, args={"output_dir": str(tmp_path), "max_steps": 1,
                                              "per_device_train_batch_size": 1}).memory_estimate is None


def test_setup_phase_and_columns_that_add_up_to_the_peak():
    """zero3 moves the whole model to each GPU before DeepSpeed partitions it (backends/deepspeed.py): a
    setup peak the planner counts on any GPU count; fsdp places and shards one layer at a time (none).
    The columns are what is alive at the peak."""
    m = PRESETS["llama-3.1-8b"]
    T = m.lora_params(16)
    lora = estimate(m, V["fsdp"], "bf16", gpus=8, seq=512, micro_batch=1, lora=True, gradient_checkpointing=True)
    assert lora.phase == "backward" and lora.parts["setup"] == 0
    z3 = estimate(m, V["zero3"], "bf16", gpus=8, seq=512, micro_batch=1, lora=True, gradient_checkpointing=True)
    assert z3.phase == "setup" and z3.allocated == 2 * (m.params + T)
    ddp = estimate(m, V["ddp"], "bf16", gpus=8, seq=512, micro_batch=1, lora=True)
    assert ddp.parts["setup"] == 0 and ddp.phase == "backward"
    for v in VARIANTS:
        for kw in (dict(lora=True), dict(), dict(gradient_checkpointing=True)):
            e = estimate(m, v, "bf16", gpus=8, seq=2048, micro_batch=2, **kw)
            assert e.weights + e.grads + e.optimizer + e.activations + e.transient == pytest.approx(e.allocated), (v, kw)
            assert e.phase != "step" or e.activations == 0


def test_estimate_model_maps_the_backend_settings():
    from types import SimpleNamespace as NS

    model, cfg = hf_llama(h=128, I=352, L=2, vocab=512)
    shape = shape_from_hf_config(cfg.to_dict())
    kw = dict(gpus=8, micro_batch=2, seq=64)
    est = lambda b, p="bf16", **k: PL.estimate_model(model, b, p, **kw, **k)  # noqa: E731
    # sharding none replicates (sized as one GPU); hybrid shards within a node
    none = estimate(shape, V["fsdp(grad_op)"], "bf16", **(kw | {"gpus": 1}), kernels=False)
    assert est(NS(name="fsdp", sharding="none", cpu_offload=False)).allocated == none.allocated
    assert est(NS(name="fsdp", sharding="hybrid", cpu_offload=False), gpus_per_node=4).gpus == 4
    # fp16-mixed: DeepSpeed's half weights under ZeRO, autocast elsewhere
    from unsloth_dist.config import ZeroConfig

    assert est(ZeroConfig(name="zero2"), "fp16-mixed").precision == "bf16"
    assert est(NS(name="ddp"), "fp16-mixed").precision == "bf16-mixed"
