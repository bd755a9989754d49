"""single / ddp under precision bf16 cast the parameters, never the buffers: a rotary embedding's
fp32 inv_freq rounded to bf16 puts far positions at the wrong angle."""
from __future__ import annotations

import copy

import torch

from unsloth_dist.backends.base import place_model


def _rotary_tables(model, n: int = 2048):
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), torch.arange(n)[None])
    return cos.float(), sin.float()


def test_place_model_casts_parameters_and_keeps_the_rotary_frequencies():
    from tiny import tiny_llama

    ref = tiny_llama(seed=0, vocab=128, hidden=256, layers=1)
    model = place_model(copy.deepcopy(ref), torch.device("cpu"), torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name], p.to(torch.bfloat16), rtol=0, atol=0)
    inv = model.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32 and torch.equal(inv, ref.model.rotary_emb.inv_freq)
    cos, sin = _rotary_tables(model)
    cos0, sin0 = _rotary_tables(ref)
    assert torch.equal(cos, cos0) and torch.equal(sin, sin0)
    # what model.to(bfloat16) gives instead: the tables of far positions are far off
    cos_bad, _ = _rotary_tables(copy.deepcopy(ref).to(torch.bfloat16))
    assert (cos_bad - cos0).abs().max() > 0.25


def test_single_backend_under_bf16_keeps_fp32_rotary_frequencies(tmp_path):
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=1)
    trainer = Trainer(model, ragged_dataset(n=8, seed=1, vocab=128, max_len=12, min_len=4), args={
        "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 1, "precision": "bf16",
        "disable_tqdm": True, "fused_master_adamw": False})
    trainer.train()
    module = trainer.backend.module
    assert module.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert module.model.rotary_emb.inv_freq.dtype == torch.float32
