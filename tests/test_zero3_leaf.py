"""ZeRO-3 leaf layers (`backend.stage3_leaf_layers`) on the model itself, without a process group:
which layers become leaves, where the input-gradient hook goes, that it neither stacks nor outlives
the setting, and what it does to a layer's inputs. The training itself (losses and grad norms equal to
module-by-module zero3 and to one process, LoRA and full) is tests/test_equivalence.py."""
from __future__ import annotations

import pytest
import torch

from tiny import add_lora, tiny_llama

pytest.importorskip("deepspeed")
from unsloth_dist.backends.deepspeed import _HOOK, _plain_linear, set_leaf_layers  # noqa: E402


def _hooked(model):
    return [getattr(layer, _HOOK, None) is not None for layer in model.model.layers]


def test_leaf_layers_and_hooks_on_trainable_layers_only():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=0, layers=3)
    # adapters on layers 1 and 2 only: layer 0 is frozen, has no backward, needs no hook
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]))
    assert set_leaf_layers(model, True, required=True) == 3
    assert [layer._z3_leaf for layer in base.model.layers] == [True, True, True]
    assert _hooked(base) == [False, True, True]
    # a second Trainer on the same model does not stack another hook
    hooks = [len(layer._forward_pre_hooks) for layer in base.model.layers]
    set_leaf_layers(model, True, required=True)
    assert [len(layer._forward_pre_hooks) for layer in base.model.layers] == hooks
    # and one with the setting off undoes the leaves (the hooks then do nothing)
    assert set_leaf_layers(model, False, required=False) == 0
    assert [layer._z3_leaf for layer in base.model.layers] == [False, False, False]


def test_full_fine_tuning_hooks_every_layer():
    model = tiny_llama(seed=0, layers=2)
    set_leaf_layers(model, True, required=False)
    assert _hooked(model) == [True, True]


def test_the_hook_makes_the_hidden_states_require_grad_and_positional():
    model = add_lora(tiny_llama(seed=0, layers=1), seed=1)
    layer = model.base_model.model.model.layers[0]
    set_leaf_layers(model, True, required=True)
    seen = []
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    h = torch.randn(1, 4, 64)
    cos, sin = torch.ones(1, 4, 16), torch.zeros(1, 4, 16)
    layer(hidden_states=h, position_embeddings=(cos, sin))
    args, kwargs = seen[-1]
    assert len(args) == 1 and "hidden_states" not in kwargs, "hidden states not passed positionally"
    assert args[0].requires_grad and not h.requires_grad  # a new leaf tensor; the caller's is untouched
    assert torch.equal(args[0], h)
    assert not kwargs["position_embeddings"][0].requires_grad  # only the hidden states
    # already requiring grad: passed on as it is
    g = torch.randn(1, 4, 64, requires_grad=True)
    layer(g, position_embeddings=(cos, sin))
    assert seen[-1][0][0] is g
    # no grad (evaluation): untouched
    with torch.no_grad():
        layer(h, position_embeddings=(cos, sin))
    assert not seen[-1][0][0].requires_grad


def test_the_input_grad_reaches_the_first_lora_layer():
    """What the hook is for: with frozen embeddings the first layer's input needs no gradient; with the
    hook the first layer's backward runs with its input in the graph, and the LoRA gradients are the
    same as without (the extra input gradient changes nothing else)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 8))
    grads = []
    for leaf in (False, True):
        model = add_lora(tiny_llama(seed=0, layers=2), seed=1)
        set_leaf_layers(model, leaf, required=False)
        first = model.base_model.model.model.layers[0]
        got = []
        first.register_forward_pre_hook(lambda m, args, kwargs: got.append(args[0].requires_grad), with_kwargs=True)
        model(input_ids=ids, labels=ids).loss.backward()
        assert got == [leaf]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=lambda m, name=name: f"{name}: {m}")


def test_plain_linear_restores_torch_linear():
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = F.linear
    had = hasattr(InsertPostInitMethodToModuleSubClasses, "linear_bk")
    saved = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    try:
        InsertPostInitMethodToModuleSubClasses.linear_bk = original
        F.linear = zero3_linear_wrap  # as an earlier zero3 run with memory_efficient_linear leaves it
        _plain_linear()
        assert F.linear is original
    finally:
        F.linear = original
        if had:
            InsertPostInitMethodToModuleSubClasses.linear_bk = saved
        else:
            del InsertPostInitMethodToModuleSubClasses.linear_bk
