"""activation_offload: the input of each checkpointed decoder layer lives in host memory between the
forward and the recompute. Losses and gradients are those of plain checkpointing, bit for bit; the
layer inputs are no longer held after the forward; the familiar `use_gradient_checkpointing="unsloth"`
switches it on; bad settings are refused before training. (The CUDA side streams and the prefetch:
tests/test_gpu_kernels.py::test_activation_offload_on_cuda.)"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tiny import ragged_dataset, tiny_llama
from unsloth_dist import Trainer
from unsloth_dist.config import ConfigError, load_config
from unsloth_dist.models.lora import add_lora, enable_gradient_checkpointing
from unsloth_dist.models.offload import enable_activation_offload, uses_activation_offload


def _model(dropout: float = 0.0):
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=3)
    model.config.attention_dropout = dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    enable_gradient_checkpointing(model, True)
    return model.train()


def _step(model, ids, inputs=None):
    if inputs is not None:  # weak references to what each decoder layer was called with
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, a, k: inputs.append(weakref.ref(a[0] if a else k["hidden_states"])),
                                            with_kwargs=True)
    torch.manual_seed(11)
    out = model(input_ids=ids, labels=ids)
    gc.collect()
    alive = [r() is not None for r in inputs] if inputs is not None else None
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, alive


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offload_is_bit_identical_and_frees_the_layer_inputs(dropout):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    plain_inputs, offload_inputs = [], []
    loss, grads, plain_alive = _step(_model(dropout), ids, plain_inputs)
    model = _model(dropout)
    assert enable_activation_offload(model) == 3 and uses_activation_offload(model)
    loss_o, grads_o, offload_alive = _step(model, ids, offload_inputs)
    assert torch.equal(loss, loss_o)
    assert grads.keys() == grads_o.keys()
    for name in grads:  # the recompute read the very bytes the forward did (and drew the same dropout masks)
        assert torch.equal(grads[name], grads_o[name]), name
    # between forward and backward plain checkpointing holds every layer's input; with offload none is held
    assert plain_alive == [True, True, True]
    assert offload_alive == [False, False, False]


def test_dropout_makes_the_bit_identical_check_meaningful():
    """The dropout case above compares offload with plain checkpointing, bit for bit: it checks that the
    recompute draws the forward's masks only if dropout changes the gradients at all, which it does.
    (On CPU torch's checkpoint always restores the CPU RNG; the CUDA RNG, which needs the empty device
    tensor offload passes along, is checked by the GPU test.)"""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    _, with_dropout, _ = _step(_model(0.3), ids)
    _, without, _ = _step(_model(0.0), ids)
    assert not torch.equal(with_dropout["model.layers.0.self_attn.q_proj.weight"],
                           without["model.layers.0.self_attn.q_proj.weight"])


def _train(tmp_path, name, model, **args):
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    trainer = Trainer(model, data, backend="single", args={
        "output_dir": str(tmp_path / name), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 3, "learning_rate": 1e-3, "precision": "fp32", "seed": 3, "disable_tqdm": True, **args})
    return trainer, trainer.train().losses


def test_trainer_activation_offload_trains_like_plain_checkpointing(tmp_path):
    _, plain = _train(tmp_path, "plain", tiny_llama(seed=0, layers=3), gradient_checkpointing=True)
    trainer, offloaded = _train(tmp_path, "offload", tiny_llama(seed=0, layers=3), gradient_checkpointing=True,
                                activation_offload=True)
    assert uses_activation_offload(trainer.model)
    assert offloaded == plain
    from unsloth_dist.models.offload import host_pool

    pool = host_pool(torch.device("cpu"))  # the host buffers were given back when training ended
    assert pool.bytes == 0 and pool.in_use == 0


def test_unsloth_mode_offloads_and_the_trainer_keeps_it(tmp_path):
    model = add_lora(tiny_llama(seed=0, layers=2), r=4, use_gradient_checkpointing="unsloth")
    assert uses_activation_offload(model)
    plain = add_lora(tiny_llama(seed=0, layers=2), r=4, use_gradient_checkpointing=True)
    assert not uses_activation_offload(plain)
    # a config that only says gradient_checkpointing: true does not undo what the model was set up with
    trainer, _ = _train(tmp_path, "unsloth", model, gradient_checkpointing=True)
    assert uses_activation_offload(trainer.model)


def test_bad_settings_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="activation_offload: true but gradient_checkpointing is false"):
        load_config({"max_steps": 1, "activation_offload": True})
    mlp = torch.nn.Sequential(torch.nn.Embedding(128, 8), torch.nn.Linear(8, 128))
    with pytest.raises(ConfigError, match="activation_offload: Sequential has no transformers decoder layers"):
        Trainer(mlp, ragged_dataset(n=4), backend="single", args={
            "output_dir": str(tmp_path / "x"), "max_steps": 1, "gradient_checkpointing": True,
            "activation_offload": True, "disable_tqdm": True})
    with pytest.raises(ValueError, match="non-reentrant"):
        from unsloth_dist.models.offload import offloaded_checkpoint

        offloaded_checkpoint(lambda x: x * 2, torch.ones(2, requires_grad=True), use_reentrant=True)


def test_hidden_states_passed_by_keyword_are_offloaded_too():
    import unsloth_dist.models.offload as O

    model = _model()
    enable_activation_offload(model)
    plain = _model()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    for m in (model, plain):  # every decoder layer called with hidden_states=... instead of positionally
        for layer in m.model.layers:
            layer.register_forward_pre_hook(
                lambda mod, a, k: ((), {**k, "hidden_states": a[0]}) if a else None, with_kwargs=True)
    calls = []
    run = O._run
    O._run = lambda *a, **k: calls.append(1) or run(*a, **k)
    try:
        loss, grads, _ = _step(model, ids)
    finally:
        O._run = run
    assert len(calls) == 2 * 3  # forward and recompute of the 3 layers went through the host copies
    loss_p, grads_p, _ = _step(plain, ids)
    assert torch.equal(loss, loss_p) and all(torch.equal(grads[n], grads_p[n]) for n in grads)


def test_explicit_false_turns_offload_off_for_an_unsloth_model(tmp_path):
    model = add_lora(tiny_llama(seed=0, layers=2), r=4, use_gradient_checkpointing="unsloth")
    trainer, _ = _train(tmp_path, "off", model, gradient_checkpointing=True, activation_offload=False)
    assert not uses_activation_offload(trainer.model)
    model = add_lora(tiny_llama(seed=0, layers=2), r=4, use_gradient_checkpointing="unsloth")
    trainer, _ = _train(tmp_path, "off2", model, activation_offload=False)  # the model's own checkpointing stays
    assert not uses_activation_offload(trainer.model)
    assert all(layer.gradient_checkpointing for layer in trainer.model.base_model.model.model.layers)


def test_host_pool_reuses_best_fit_and_releases_what_growth_outdates():
    from unsloth_dist.models.offload import HostPool

    pool = HostPool(pinned=False)
    a = pool.take(70_000)  # rounded up to a power of two
    assert a.numel() == 1 << 17 and pool.bytes == 1 << 17 and pool.in_use == 1
    b = pool.take(10)
    assert b.numel() == 1 << 16 and pool.bytes == 3 << 16
    pool.give(a)
    pool.give(b)
    assert pool.take(1000) is b  # the smallest free buffer that fits, not the first
    assert pool.take(100_000) is a
    pool.give(a)
    pool.give(b)
    c = pool.take(200_000)  # larger than every free buffer: a new one, and the outgrown ones go
    assert c.numel() == 1 << 18 and pool.bytes == 1 << 18 and pool.in_use == 1
    pool.give(c)
    pool.clear()
    assert pool.bytes == 0


def test_offload_with_varying_lengths_keeps_one_buffer_per_layer_and_exact_gradients(monkeypatch):
    """Steps of different padded lengths draw on one pool: every host buffer comes back after the
    backward, one step's layers never share a buffer (the gradients equal plain checkpointing's at
    every length), and the pool holds no more than the layers x the largest input (rounded up)."""
    import unsloth_dist.models.offload as O

    monkeypatch.setattr(O, "_MIN_BUFFER", 1)
    monkeypatch.setattr(O, "_pools", {})
    model, plain = _model(), _model()
    enable_activation_offload(model)
    gen = torch.Generator().manual_seed(3)
    largest = 0
    for length in (8, 32, 16, 24, 40, 4, 40):
        ids = torch.randint(0, 128, (2, length), generator=gen)
        for m in (model, plain):
            m.zero_grad(set_to_none=True)
        loss, grads, _ = _step(model, ids)
        loss_p, grads_p, _ = _step(plain, ids)
        assert torch.equal(loss, loss_p) and all(torch.equal(grads[n], grads_p[n]) for n in grads), length
        pool = O.host_pool(torch.device("cpu"))
        assert pool.in_use == 0, length  # every layer's buffer came back once its backward ran
        nbytes = 2 * length * 64 * 4  # one layer input: batch x length x hidden, fp32
        largest = max(largest, 1 << (nbytes - 1).bit_length())
        assert pool.bytes <= 3 * largest, (length, pool.bytes, largest)
    # torch's cache alone would have kept a set per size class seen (4 classes here): 3 x (sum) bytes
    assert pool.bytes == 3 * largest
