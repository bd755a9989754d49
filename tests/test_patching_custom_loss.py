"""`patch_model`'s fused linear cross-entropy vs a model whose own loss is not transformers'
``ForCausalLMLoss``, and the loss kwargs of the forward, compared with the unpatched transformers
model (tiny models built from configs, fp32):

* ``model.loss_function = fn`` / ``model.loss_type = "ForMaskedLM"`` / a subclass overriding
  ``loss_function``: HF-style labelled training calls run the model's own forward and loss (the
  fused path would compute the plain next-token CE instead), warned once; ``loss_reduction=`` calls
  (the unsloth_dist.Trainer contract: the CE token loss) raise a ValueError naming the attribute.
* ForCausalLMLoss itself, set explicitly or through a loss type that maps to it, keeps the fused path.
* ``num_items_in_batch`` (transformers' gradient accumulation: sum / num_items_in_batch) gives
  transformers' loss and gradients on the fused path, through the PyTorch reference and through
  the Triton kernels in the interpreter; together with ``loss_reduction=`` it is refused.
"""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from test_patching import add_lora, assert_grads_match, batch, make_model, run_in_interpreter, zero_grads
from unsloth_dist import kernels as K
from unsloth_dist.models import patch_model
from unsloth_dist.trainer import token_loss_sum

CALLS: list[dict] = []


@pytest.fixture(autouse=True)
def _reference_dispatch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    CALLS.clear()


def smoothed_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                  **kwargs):
    """A user's loss in transformers' loss_function signature: label-smoothed next-token CE."""
    CALLS.append({"num_items_in_batch": num_items_in_batch, **kwargs})
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, vocab_size), shift_labels.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=0.2, reduction="sum" if num_items_in_batch is not None else "mean")
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def pair(arch: str = "llama", setup=None):
    """(unpatched, patched) copies of one tiny model in training mode; `setup(model)` on both, before
    patching."""
    ref = make_model(arch)
    if setup is not None:
        setup(ref)
    pat = copy.deepcopy(ref)
    report = patch_model(pat)
    assert report.fused_loss
    ref.train(), pat.train()
    return ref, pat


def set_loss_function(m):
    m.loss_function = smoothed_loss


def set_masked_lm_loss_type(m):
    m.loss_type = "ForMaskedLM"  # LOSS_MAPPING: no label shift


def fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "fused linear cross-entropy" in r.getMessage()]


def check_same_loss_and_grads(ref, pat, what: str, **kw):
    ids, mask, labels = batch(11)
    a = ref(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    b = pat(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} loss: {m}")
    (a.loss * 0.7).backward()
    (b.loss * 0.7).backward()
    assert_grads_match(ref, pat, what)
    zero_grads(ref, pat)
    return a, b


# --------------------------------------------------------------------------- a custom loss, HF-style calls


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_custom_loss_function_runs_the_models_own_loss(arch, caplog):
    """Before: the fused path returned the plain next-token CE, never calling `model.loss_function`."""
    ref, pat = pair(arch)
    set_loss_function(ref), set_loss_function(pat)
    ids, _, labels = batch(11)
    with torch.no_grad():
        plain = make_model(arch).train()(input_ids=ids, labels=labels).loss
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        a, b = check_same_loss_and_grads(ref, pat, f"{arch} loss_function")
        assert len(CALLS) == 2  # once for each model
        assert b.logits is not None  # HF's forward ran
        assert not torch.allclose(b.loss, plain)  # the custom loss is not the CE
        # its loss kwargs reach it, as in HF's forward (transformers' Trainer passes num_items_in_batch)
        n = torch.tensor(9)
        CALLS.clear()
        check_same_loss_and_grads(ref, pat, f"{arch} loss_function + num_items", num_items_in_batch=n)
        assert [c["num_items_in_batch"] for c in CALLS] == [n, n]
    warned = fallback_warnings(caplog)
    assert len(warned) == 1, warned  # once per model, not per call
    assert "loss_function is smoothed_loss" in warned[0] and "fused_cross_entropy=False" in warned[0]


def test_loss_type_other_than_causal_lm_is_honoured(caplog):
    """Before: ``model.loss_type = "ForMaskedLM"`` (no label shift in HF) was ignored by the fused path."""
    ref, pat = pair("qwen3", setup=set_masked_lm_loss_type)
    ids, _, labels = batch(11)
    with torch.no_grad():
        plain = make_model("qwen3").train()(input_ids=ids, labels=labels).loss
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        a, b = check_same_loss_and_grads(ref, pat, "loss_type ForMaskedLM")
    assert not torch.allclose(a.loss, plain)
    warned = fallback_warnings(caplog)
    assert len(warned) == 1 and "loss_type is 'ForMaskedLM'" in warned[0], warned


def test_subclass_loss_function_override_is_honoured():
    import transformers as T

    class SmoothedLlama(T.LlamaForCausalLM):
        @property
        def loss_function(self):
            return smoothed_loss

    base = make_model("llama")
    ref = SmoothedLlama(base.config).float()
    ref.load_state_dict(base.state_dict())
    pat = copy.deepcopy(ref)
    patch_model(pat)
    ref.train(), pat.train()
    check_same_loss_and_grads(ref, pat, "subclass loss_function")
    assert len(CALLS) == 2


def test_custom_loss_on_peft_base_model_and_set_after_patching():
    """The loss is looked up per call on the transformers model inside peft, so one set after
    `patch_model` counts too."""
    base = make_model("llama")
    ref, pat = add_lora(copy.deepcopy(base)), copy.deepcopy(base)
    patch_model(pat)
    pat = add_lora(pat)
    ref.train(), pat.train()
    for m in (ref, pat):
        m.get_base_model().loss_function = smoothed_loss
    check_same_loss_and_grads(ref, pat, "peft + loss_function")
    assert len(CALLS) == 2


def test_report_names_a_custom_loss_set_before_patching():
    model = make_model("llama")
    set_loss_function(model)
    report = patch_model(model)
    assert "smoothed_loss" in report.details["fused_cross_entropy"], str(report)
    assert "smoothed_loss" in str(report)


# --------------------------------------------------------------------------- the default loss stays fused


@pytest.mark.parametrize("how", ["loss_function=ForCausalLMLoss", "loss_type=ForConditionalGeneration"])
def test_forcausallmloss_itself_keeps_the_fused_path(how, caplog):
    from transformers.loss.loss_utils import ForCausalLMLoss

    def setup(m):
        if how.startswith("loss_function"):
            m.loss_function = ForCausalLMLoss
        else:
            m.loss_type = "ForConditionalGeneration"  # LOSS_MAPPING maps it to ForCausalLMLoss

    ref, pat = pair("mistral", setup=setup)
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        a, b = check_same_loss_and_grads(ref, pat, how)
        assert b.logits is None  # fused: the logits were never computed
        ids, _, labels = batch(12)
        s = pat(input_ids=ids, labels=labels, loss_reduction="sum").loss
    with torch.no_grad():
        torch.testing.assert_close(s, token_loss_sum(ref(input_ids=ids).logits, labels), rtol=1e-5, atol=1e-5)
    assert not fallback_warnings(caplog)


def test_config_loss_type_follows_transformers():
    """transformers 5 resolves the loss from the model's ``loss_type`` attribute; a ``config.loss_type``
    is whatever the installed transformers makes of it -- the patched model does the same."""
    def setup(m):
        m.config.loss_type = "ForMaskedLM"

    ref, pat = pair("llama", setup=setup)
    check_same_loss_and_grads(ref, pat, "config.loss_type")


# --------------------------------------------------------------------------- loss_reduction= (Trainer contract)


@pytest.mark.parametrize("setup,attr", [(set_loss_function, "loss_function"), (set_masked_lm_loss_type, "loss_type")])
def test_loss_reduction_refuses_a_custom_loss(setup, attr):
    """Before: loss_reduction="sum" returned the CE token-loss sum, ignoring the model's loss."""
    ref, pat = pair("llama", setup=setup)
    ids, mask, labels = batch(13)
    for reduction in ("sum", "mean", "none"):
        with pytest.raises(ValueError, match=rf"LlamaForCausalLM\.{attr} is .*not transformers' ForCausalLMLoss"):
            pat(input_ids=ids, attention_mask=mask, labels=labels, loss_reduction=reduction)
    with pytest.raises(ValueError, match=attr):  # the unfused loss_reduction path (eval mode) too
        pat.eval()(input_ids=ids, labels=labels, loss_reduction="sum")
    pat.train()
    # removing it (what the message says) gives the fused token-loss sum back
    if attr == "loss_function":
        del pat._loss_function
    else:
        pat.loss_type = "ForCausalLM"
    got = pat(input_ids=ids, attention_mask=mask, labels=labels, loss_reduction="sum")
    assert got.logits is None
    with torch.no_grad():
        want = token_loss_sum(make_model("llama")(input_ids=ids, attention_mask=mask).logits, labels)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)


def test_loss_reduction_refuses_num_items_in_batch():
    """Before: num_items_in_batch was dropped silently when loss_reduction was given."""
    _, pat = pair("llama")
    ids, _, labels = batch(14)
    with pytest.raises(ValueError, match="loss_reduction='sum' and num_items_in_batch"):
        pat(input_ids=ids, labels=labels, loss_reduction="sum", num_items_in_batch=torch.tensor(5))
    # without labels no loss is computed: nothing to refuse
    assert pat(input_ids=ids, loss_reduction="sum", num_items_in_batch=5).logits is not None


# --------------------------------------------------------------------------- num_items_in_batch


def accumulate(model, micro_batches, n):
    """transformers' Trainer under gradient accumulation: each micro-batch's loss is its token-loss
    sum / the token count of the whole accumulated batch."""
    total = 0.0
    for ids, mask, labels in micro_batches:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
        out.loss.backward()
        total = total + out.loss.detach()
    return total, out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_num_items_in_batch_matches_transformers(arch, as_tensor):
    ref, pat = pair(arch)
    mbs = [batch(15), batch(16, T=9)]
    n = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in mbs)
    n = torch.tensor(n) if as_tensor else n
    a, _ = accumulate(ref, mbs, n)
    b, out = accumulate(pat, mbs, n)
    assert out.logits is None  # the fused path ran
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert_grads_match(ref, pat, f"{arch} num_items_in_batch")


# --------------------------------------------------------------------------- Triton path (interpreter)

def run_interpreter_case():
    """Through the Triton kernels in the interpreter: num_items_in_batch on the fused CE kernel (Gemma 2,
    soft-capped) and a custom loss falling back to HF's loss (the other kernels still patched), vs the
    unpatched models."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    ref, pat = pair("gemma2")
    mbs = [batch(17, T=7), batch(18, T=6)]
    n = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in mbs)
    before = K.LAUNCHES["cross_entropy"]
    a, _ = accumulate(ref, mbs, torch.tensor(n))
    b, out = accumulate(pat, mbs, torch.tensor(n))
    assert out.logits is None and K.LAUNCHES["cross_entropy"] > before, "the CE kernel did not run"
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert_grads_match(ref, pat, "gemma2 num_items (triton)", rtol=1e-4, atol=1e-5)

    ref, pat = pair("llama", setup=set_loss_function)
    before = dict(K.LAUNCHES)
    ids, mask, labels = batch(19, T=7)
    a = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    b = pat(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    ran = {k for k, v in K.LAUNCHES.items() if v > before.get(k, 0)}
    assert "cross_entropy" not in ran and {"rmsnorm_fwd", "rope", "glu_fwd"} <= ran, ran
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.backward()
    b.backward()
    assert_grads_match(ref, pat, "llama custom loss (triton)", rtol=1e-4, atol=1e-5)


def test_through_triton_interpreter(monkeypatch):
    run_in_interpreter(monkeypatch, "test_patching_custom_loss")
