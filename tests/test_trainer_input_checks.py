"""Bad in-memory data and models the backend cannot take are refused by the Trainer before any
process group exists, naming the row or the field (not at the step that reaches them)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tiny import ragged_dataset, tiny_llama
from unsloth_dist import Trainer
from unsloth_dist.config import ConfigError

ARGS = dict(per_device_train_batch_size=2, max_steps=2, precision="fp32", disable_tqdm=True)


def _args(tmp_path, **kw):
    return dict(ARGS, output_dir=str(tmp_path / "run"), **kw)


def test_a_later_row_with_mismatched_labels_is_named(tmp_path):
    data = ragged_dataset(n=8)
    data[5] = dict(data[5], labels=data[5]["labels"][:3])
    with pytest.raises(ValueError, match=r"train_dataset\[5\]\['labels'\] has a different length"):
        Trainer(tiny_llama(), data, args=_args(tmp_path), backend="single")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("key", ["input_ids", "labels"])
def test_a_token_id_past_the_vocabulary_is_named(tmp_path, key):
    data = ragged_dataset(n=8, vocab=128)
    data[3] = dict(data[3], **{key: [130] + data[3][key][1:]})  # e.g. added tokens, embeddings not resized
    with pytest.raises(ValueError, match=r"train_dataset\[3\] has token id 130, outside the model's vocabulary of 128"):
        Trainer(tiny_llama(vocab=128), data, args=_args(tmp_path), backend="single")


def test_a_sample_past_learned_positions_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=12, n_embd=32, n_layer=1, n_head=2))
    data = ragged_dataset(n=8, min_len=6, max_len=10) + [{"input_ids": list(range(20))}]
    with pytest.raises(ConfigError, match="the longest train_dataset sample is 20 tokens, past the 12 positions"):
        Trainer(model, data, args=_args(tmp_path), backend="single")


def test_a_sample_past_rotary_positions_warns(tmp_path, caplog):
    model = tiny_llama()
    model.config.max_position_embeddings = 12
    data = ragged_dataset(n=8, min_len=6, max_len=10) + [{"input_ids": list(range(20))}]
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        Trainer(model, data, args=_args(tmp_path), backend="single")
    assert any("20 tokens, past the model's 12 positions" in r.getMessage() for r in caplog.records)


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(128, 16)
        self.out = nn.Linear(16, 128)

    def forward(self, input_ids, **kw):
        return self.out(self.emb(input_ids))


def test_fsdp_without_decoder_layers_is_refused_before_the_process_group(tmp_path):
    with pytest.raises(ConfigError, match="backend fsdp: found no decoder layers"):
        Trainer(_Flat(), ragged_dataset(n=8), args=_args(tmp_path), backend="fsdp")
    assert not torch.distributed.is_initialized()


def test_zero3_leaf_layers_asked_for_without_decoder_layers_is_refused_before_the_process_group(tmp_path):
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match="backend.stage3_leaf_layers: found no decoder layers.*stage3_leaf_layers: false"):
        Trainer(_Flat(), ragged_dataset(n=8), args=_args(tmp_path), backend={"name": "zero3", "stage3_leaf_layers": True})
    assert not torch.distributed.is_initialized()


def test_zero3_leaf_layers_by_default_fall_back_without_decoder_layers():
    """The default (not asked for) does not refuse such a model: module-by-module gathering."""
    pytest.importorskip("deepspeed")
    from unsloth_dist.backends.deepspeed import leaf_layers

    assert leaf_layers(_Flat(), required=False) is None
    model = tiny_llama(seed=0)
    assert leaf_layers(model, required=True) == list(model.model.layers)


@pytest.mark.parametrize("how", ["loss_function", "loss_type", "peft"])
def test_a_model_with_its_own_loss_is_refused_before_the_process_group(tmp_path, how):
    """The loop trains the next-token cross-entropy; a model whose own loss is another one (transformers'
    `model.loss_function = fn`, or a loss_type such as ForMaskedLM) would silently train something else."""
    model = tiny_llama()
    if how == "loss_type":
        model.loss_type = "ForMaskedLM"
    else:
        model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().pow(2).mean()
    if how == "peft":
        from tiny import add_lora

        model = add_lora(model)
    with pytest.raises(ConfigError, match="would not train that loss"):
        Trainer(model, ragged_dataset(n=8), args=_args(tmp_path))
    assert not torch.distributed.is_initialized()
    model = tiny_llama()  # the default loss trains
    Trainer(model, ragged_dataset(n=8), args=_args(tmp_path)).train()
