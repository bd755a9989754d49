"""gradient_checkpointing_layers: selective activation checkpointing. Only the first K decoder
layers recompute their forward in backward (counted through their MLPs' calls); the training is
the same as with every layer or no layer checkpointed; bad values are refused before training."""
from __future__ import annotations

import pytest

from tiny import ragged_dataset, tiny_llama
from unsloth_dist import Trainer
from unsloth_dist.config import ConfigError, load_config


def _run(tmp_path, name, **args):
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=3)
    calls = [0] * 3
    for i, layer in enumerate(model.model.layers):
        # count the MLP's forward function itself: the backward's recompute runs it again, but (torch
        # 2.13) without the module's forward hooks
        def counted(*a, _f=layer.mlp.forward, _i=i, **k):
            calls[_i] += 1
            return _f(*a, **k)

        layer.mlp.forward = counted
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    trainer = Trainer(model, data, backend="single", args={
        "output_dir": str(tmp_path / name), "per_device_train_batch_size": 4, "max_steps": 2,
        "learning_rate": 1e-3, "precision": "fp32", "seed": 3, "disable_tqdm": True, **args})
    return trainer.train().losses, calls


def test_only_the_first_layers_recompute_and_training_is_unchanged(tmp_path):
    none, calls_none = _run(tmp_path, "none")
    every, calls_every = _run(tmp_path, "every", gradient_checkpointing=True)
    first, calls_first = _run(tmp_path, "first", gradient_checkpointing=True, gradient_checkpointing_layers=1)
    # 2 steps: one forward per layer and step, plus one recompute in backward where checkpointed
    assert calls_none == [2, 2, 2]
    assert calls_every == [4, 4, 4]
    assert calls_first == [4, 2, 2]
    assert every == pytest.approx(none, rel=1e-6) and first == pytest.approx(none, rel=1e-6)


def test_bad_values_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers.*gradient_checkpointing is false"):
        load_config({"max_steps": 1, "gradient_checkpointing_layers": 2})
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers"):
        load_config({"max_steps": 1, "gradient_checkpointing": True, "gradient_checkpointing_layers": -1})
    with pytest.raises(ConfigError, match="4 but the model has 3 decoder layers; use at most 3"):
        _run(tmp_path, "too-many", gradient_checkpointing=True, gradient_checkpointing_layers=4)
