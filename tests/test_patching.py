"""`unsloth_dist.models.patch_model` on tiny Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 models built
from configs (fp32): the patched model gives the same logits, losses and parameter gradients as
the unpatched one -- plain, peft LoRA (patched before or after `get_peft_model`), gradient
checkpointing, packed position_ids restarting at 0, tied embeddings -- and the fused-loss contract
the Trainer relies on (`loss_reduction="sum"` -> fp32 token-loss sum, logits None).

On CPU the kernels dispatch to their PyTorch references here (fast); one test runs the patched
model through the Triton kernels in Triton's interpreter (see tests/test_kernels.py for why that
may need a child process).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch


# TRITON_INTERPRET is prepared for the first `import triton` in tests/conftest.py

import copy  # noqa: E402

import pytest  # noqa: E402

from unsloth_dist import kernels as K  # noqa: E402
from unsloth_dist.kernels._utils import triton_interpreter_ready  # noqa: E402
from unsloth_dist.models import PatchReport, patch_model, unpatch_model  # noqa: E402
from unsloth_dist.trainer import token_loss_sum  # noqa: E402

VOCAB = 211
ARCHES = ["llama", "qwen2", "qwen3", "mistral", "gemma2"]


@pytest.fixture(autouse=True)
def _reference_dispatch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make_model(arch: str, tie: bool = False, seed: int = 0):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  tie_word_embeddings=tie)
    if arch == "llama":
        cfg = T.LlamaConfig(**common, attn_implementation="sdpa")
        cls = T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = T.Qwen2Config(**common, attn_implementation="sdpa")
        cls = T.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = T.Qwen3Config(**common, attn_implementation="sdpa")
        cls = T.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg = T.MistralConfig(**common, attn_implementation="sdpa")
        cls = T.MistralForCausalLM
    elif arch == "gemma2":
        cfg = T.Gemma2Config(**common, attn_implementation="eager", final_logit_softcapping=4.0,
                             attn_logit_softcapping=20.0, query_pre_attn_scalar=16, sliding_window=8)
        cls = T.Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # norms away from their init values so their weights matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def batch(seed: int = 0, B: int = 2, T: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, -2:] = -100
    mask = torch.ones_like(ids)
    return ids, mask, labels


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_match(a, b, what="", rtol=1e-5, atol=1e-6):
    ga, gb = grads_of(a), grads_of(b)
    assert ga.keys() == gb.keys() and ga, f"{what}: different parameters got gradients"
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{what} grad {n}: {m}")


def zero_grads(*models):
    for m in models:
        for p in m.parameters():
            p.grad = None


# --------------------------------------------------------------------------- report / switches


@pytest.mark.parametrize("arch", ARCHES)
def test_report_lists_patched_ops(arch):
    model = make_model(arch)
    report = patch_model(model)
    assert isinstance(report, PatchReport)
    assert report.ops == ["rms_norm", "rope", "swiglu", "fused_cross_entropy"], str(report)
    layers = model.config.num_hidden_layers
    norms_per_layer = {"gemma2": 4, "qwen3": 4}.get(arch, 2)  # qwen3: + q_norm/k_norm
    assert report.count("rms_norm") == layers * norms_per_layer + 1
    assert report.count("rope") == layers and report.count("swiglu") == layers
    text = str(report)
    prefix = type(model).__name__.replace("ForCausalLM", "")
    for piece in (type(model).__name__, f"{prefix}RMSNorm", f"{prefix}MLP", f"{prefix}Attention",
                  "fused_cross_entropy", "apply_rotary_pos_emb"):
        assert piece in text, text
    assert model.unsloth_fused_loss is True
    if arch == "gemma2":
        assert model._unsloth_ce["softcap"] == 4.0
        assert model.model.layers[0].mlp._unsloth_act == "gelu_tanh"
        assert model.model.norm._unsloth_rms[1:] == (1.0, True)
    unpatch_model(model)


def test_kernels_false_leaves_the_model_untouched():
    import transformers.models.llama.modeling_llama as ml

    fn = ml.apply_rotary_pos_emb
    model = make_model("llama")
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    report = patch_model(model, kernels=False)
    assert not report.ops and not report.enabled and "nothing patched" in str(report)
    assert not hasattr(model, "unsloth_fused_loss")
    assert ml.apply_rotary_pos_emb is fn
    for n, m in model.named_modules():
        assert m.__dict__.keys() == before[n].keys(), n
        assert "forward" not in m.__dict__


def test_switches_and_unpatch_restore_everything():
    import transformers.models.llama.modeling_llama as ml

    # models patched by earlier tests and never unpatched keep the (inactive) dispatcher
    # installed: compare with what is there now, and with HF's own function under it
    before = ml.apply_rotary_pos_emb
    hf_function = getattr(before, "_unsloth_original", before)
    model = make_model("llama")
    report = patch_model(model, rope=False, fused_cross_entropy=False)
    assert report.ops == ["rms_norm", "swiglu"] and "switched off" in str(report)
    assert not hasattr(model, "unsloth_fused_loss") and ml.apply_rotary_pos_emb is before
    report = patch_model(model)  # idempotent; adds the rest
    assert report.ops == ["rms_norm", "rope", "swiglu", "fused_cross_entropy"]
    assert report.count("rms_norm") == 5
    assert ml.apply_rotary_pos_emb is not hf_function
    assert ml.apply_rotary_pos_emb._unsloth_original is hf_function
    keys = list(model.state_dict())
    unpatch_model(model)
    assert ml.apply_rotary_pos_emb is before
    assert not hasattr(model, "unsloth_fused_loss")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys


# --------------------------------------------------------------------------- equivalence


def _check_equivalent(ref, pat, ids, mask, labels, position_ids=None, what=""):
    """ref: unpatched, pat: patched; both in train mode. Compares logits (no labels), the HF mean
    loss (labels), the Trainer's fused sum (loss_reduction='sum') and every parameter gradient."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    # 1. no labels: logits like HF
    with torch.no_grad():
        lr = ref(input_ids=ids, attention_mask=mask, **extra).logits
        lp = pat(input_ids=ids, attention_mask=mask, **extra).logits
    torch.testing.assert_close(lp, lr, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} logits: {m}")
    # 2. labels, training: HF's mean loss, computed fused (no logits)
    zero_grads(ref, pat)
    out_r = ref(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out_p = pat(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    assert out_p.logits is None, f"{what}: the fused path returned logits"
    torch.testing.assert_close(out_p.loss, out_r.loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} mean loss: {m}")
    out_r.loss.backward()
    out_p.loss.backward()
    assert_grads_match(ref, pat, f"{what} (mean loss)")
    # 3. the Trainer's contract: loss_reduction="sum" -> fp32 token-loss sum
    zero_grads(ref, pat)
    want = token_loss_sum(ref(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits, labels)
    got = pat(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, loss_reduction="sum", **extra)
    assert got.logits is None and got.loss.dtype == torch.float32 and got.loss.dim() == 0
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} loss sum: {m}")
    (want * 0.37).backward()
    (got.loss * 0.37).backward()
    assert_grads_match(ref, pat, f"{what} (sum loss)")
    zero_grads(ref, pat)


@pytest.mark.parametrize("arch", ARCHES)
def test_patched_matches_unpatched(arch):
    ref = make_model(arch)
    pat = copy.deepcopy(ref)
    patch_model(pat)
    ref.train(), pat.train()
    _check_equivalent(ref, pat, *batch(), what=arch)
    # eval mode with labels and no loss_reduction: HF's own forward (logits and loss)
    ref.eval(), pat.eval()
    ids, mask, labels = batch(1)
    with torch.no_grad():
        a, b = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
        s = pat(input_ids=ids, labels=labels, loss_reduction="sum")
    assert b.logits is not None
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.loss, token_loss_sum(a.logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tied_embeddings(arch):
    ref = make_model(arch, tie=True)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    pat = copy.deepcopy(ref)
    keys = list(pat.state_dict())
    patch_model(pat)
    assert pat.lm_head.weight is pat.model.embed_tokens.weight
    assert pat.get_output_embeddings() is pat.lm_head and isinstance(pat.lm_head, torch.nn.Linear)
    assert list(pat.state_dict()) == keys
    ref.train(), pat.train()
    _check_equivalent(ref, pat, *batch(2), what=f"{arch} tied")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("order", ["patch-then-peft", "peft-then-patch"])
def test_peft_lora(arch, order):
    base = make_model(arch)
    ref = add_lora(copy.deepcopy(base))
    if order == "patch-then-peft":
        patched = copy.deepcopy(base)
        report = patch_model(patched)
        pat = add_lora(patched)
    else:
        pat = add_lora(copy.deepcopy(base))
        report = patch_model(pat)
        assert pat.unsloth_fused_loss is True
        assert report.count("lora") == 7 * len(pat.get_base_model().model.layers)  # every wrapped projection
    lora_op = ["lora"] if order == "peft-then-patch" else []
    assert report.ops == ["rms_norm", "rope", "swiglu", "fused_cross_entropy"] + lora_op
    assert getattr(pat, "unsloth_fused_loss", False) is True  # what the Trainer reads (peft forwards getattr)
    # the patched MLP calls the LoRA-wrapped projections
    mlp = pat.get_base_model().model.layers[0].mlp
    assert type(mlp.gate_proj).__module__.startswith("peft"), type(mlp.gate_proj)
    ref.train(), pat.train()
    _check_equivalent(ref, pat, *batch(3), what=f"{arch} lora {order}")
    # only adapters train; they got gradients
    assert all("lora_" in n for n, p in pat.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gradient_checkpointing(arch):
    ref = make_model(arch)
    pat = copy.deepcopy(ref)
    patch_model(pat)
    for m in (ref, pat):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.config.use_cache = False
        m.train()
    _check_equivalent(ref, pat, *batch(4), what=f"{arch} grad-ckpt")


def test_gradient_checkpointing_with_lora():
    base = make_model("qwen2")
    ref, pat = add_lora(copy.deepcopy(base)), add_lora(copy.deepcopy(base))
    patch_model(pat)
    for m in (ref, pat):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    _check_equivalent(ref, pat, *batch(5), what="qwen2 lora grad-ckpt")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_position_ids_restarting_at_zero(arch):
    ref = make_model(arch)
    pat = copy.deepcopy(ref)
    patch_model(pat)
    ref.train(), pat.train()
    ids, mask, labels = batch(6, B=2, T=12)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]])
    _check_equivalent(ref, pat, ids, mask, labels, position_ids=pos, what=f"{arch} packed")


def test_num_items_in_batch_and_return_dict_false():
    ref = make_model("mistral")
    pat = copy.deepcopy(ref)
    patch_model(pat)
    ref.train(), pat.train()
    ids, mask, labels = batch(7)
    n = torch.tensor(5)
    a = ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    b = pat(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    t = pat(ids, mask, labels=labels, return_dict=False)  # positional args bind like HF's
    r = ref(ids, mask, labels=labels, return_dict=False)
    assert isinstance(t, tuple) and len(t) == len(r)
    torch.testing.assert_close(t[0], ref(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    # the logits' slot stays second (None: the fused loss never computes them), the cache after it
    assert t[1] is None and r[1].shape[-1] == ref.config.vocab_size


def test_rope_dispatcher_leaves_unpatched_instances_alone():
    """The module-level RoPE dispatcher only routes patched attention instances to the kernel:
    an unpatched model of the same class, in the same process, runs HF's function."""
    plain = make_model("llama", seed=3)
    twin = copy.deepcopy(plain)
    patch_model(make_model("llama", seed=4))  # installs the dispatcher for modeling_llama
    ids, mask, _ = batch(8)
    import unsloth_dist.models.patching as P

    calls = []
    orig_apply_rope = P.apply_rope

    def spy(*a, **k):
        calls.append(1)
        return orig_apply_rope(*a, **k)

    P.apply_rope = spy
    try:
        with torch.no_grad():
            a = plain(input_ids=ids).logits
        assert not calls, "an unpatched model went through the kernel"
        patch_model(twin)
        with torch.no_grad():
            b = twin(input_ids=ids).logits
        assert calls, "the patched model did not go through the kernel"
    finally:
        P.apply_rope = orig_apply_rope
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_lm_head_wrapped_after_patching_falls_back():
    """If peft later wraps lm_head (LoRA on lm_head), the fused path steps aside and
    loss_reduction='sum' is still honoured from the logits."""
    base = make_model("llama")
    ref = add_lora(copy.deepcopy(base), targets=("q_proj", "lm_head"))
    patched = copy.deepcopy(base)
    patch_model(patched)
    pat = add_lora(patched, targets=("q_proj", "lm_head"))
    ref.train(), pat.train()
    ids, mask, labels = batch(9)
    want = token_loss_sum(ref(input_ids=ids, attention_mask=mask).logits, labels)
    got = pat(input_ids=ids, attention_mask=mask, labels=labels, loss_reduction="sum")
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Triton path (interpreter)

def run_in_interpreter(monkeypatch, module: str) -> None:
    """`<module>.run_interpreter_case()` through Triton's interpreter: in this process where triton was
    imported under TRITON_INTERPRET=1 (tests/conftest.py) on a CPU-only machine, with every kernel output
    poisoned; else in a fresh process with the variable set."""
    if triton_interpreter_ready() and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with K.poison_outputs():
            sys.modules[module].run_interpreter_case()
        return
    script = (f'import sys; sys.path.insert(0, "tests"); import {module} as t; t.run_interpreter_case(); '
              'print("INTERPRETER CASE OK")')
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER CASE OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-6000:]



def run_interpreter_case():
    """Patched tiny Gemma 2 (all four kernels incl. GeGLU, (1+w) norms, soft-capped CE) and a
    LoRA Llama and a LoRA Qwen3 (q_norm / k_norm right before RoPE) with gradient checkpointing,
    through the Triton kernels in the interpreter, vs the unpatched models: losses and gradients,
    and the checkpointed forward runs each norm once (nothing recomputed inside the forward)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for arch, lora in (("gemma2", False), ("llama", True), ("qwen3", True)):
        base = make_model(arch, tie=arch == "gemma2")
        ref, pat = copy.deepcopy(base), copy.deepcopy(base)
        if lora:
            ref, pat = add_lora(ref), add_lora(pat)
        report = patch_model(pat)
        for m in (ref, pat):
            if lora:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
        before = dict(K.LAUNCHES)
        ids, mask, labels = batch(10, B=2, T=7)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]])
        with torch.no_grad():
            torch.testing.assert_close(pat(input_ids=ids, position_ids=pos).logits,
                                       ref(input_ids=ids, position_ids=pos).logits, rtol=1e-5, atol=1e-5)
        want = token_loss_sum(ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits, labels)
        norms_before = K.LAUNCHES["rmsnorm_fwd"]
        got = pat(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, loss_reduction="sum").loss
        assert K.LAUNCHES["rmsnorm_fwd"] - norms_before == report.count("rms_norm"), f"{arch}: norms re-run in forward"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want.backward()
        got.backward()
        ga, gb = grads_of(ref), grads_of(pat)
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{arch} {n}: {m}")
        ran = {k for k, v in K.LAUNCHES.items() if v > before.get(k, 0)}
        assert {"rmsnorm_fwd", "rmsnorm_bwd", "rope", "glu_fwd", "glu_bwd", "cross_entropy"} <= ran, ran


def test_patched_model_through_triton_interpreter(monkeypatch):
    run_in_interpreter(monkeypatch, "test_patching")
