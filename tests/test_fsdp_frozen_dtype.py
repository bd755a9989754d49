"""FSDP under precision bf16 keeps frozen weights in bf16 whatever dtype they came in (a QLoRA model
leaves peft's prepare_model_for_kbit_training with fp32 embeddings, head and norms): the same
numbers as before, since FSDP2's MixedPrecisionPolicy computes with bf16 copies of every parameter
anyway, at half the memory. One gloo rank, in process."""
from __future__ import annotations

import copy
import os

import torch

_PG_VARS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def _train(model, data, out_dir):
    from unsloth_dist import Trainer

    trainer = Trainer(model, data, backend="fsdp", args={
        "output_dir": str(out_dir), "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-2,
        "precision": "bf16", "disable_tqdm": True, "seed": 0})
    dtypes = {n: (p.dtype, p.requires_grad) for n, p in trainer.backend.module.named_parameters()}
    result = trainer.train()
    lora = {n: p.detach().full_tensor().float().clone() for n, p in trainer.backend.module.named_parameters()
            if p.requires_grad}
    return dtypes, result.losses, lora


def test_fsdp_bf16_keeps_frozen_weights_in_bf16_with_the_same_losses(tmp_path):
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist.models.lora import add_lora

    data = ragged_dataset(n=12, seed=1, vocab=128, max_len=12, min_len=4)
    fp32_frozen = add_lora(tiny_llama(seed=0, vocab=128, hidden=64, layers=2), r=4, lora_alpha=8)
    bf16_frozen = copy.deepcopy(fp32_frozen)
    for p in bf16_frozen.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # what FSDP2's bf16 policy computed with all along
    assert all(p.dtype == torch.float32 for p in fp32_frozen.parameters())
    had = {k for k in _PG_VARS if k in os.environ}
    try:
        dtypes, losses, lora = _train(fp32_frozen, data, tmp_path / "a")
        _, ref_losses, ref_lora = _train(bf16_frozen, data, tmp_path / "b")
    finally:  # the one-rank process group and its variables must not leak into later tests
        from unsloth_dist import distributed as D

        D.shutdown()
        for key in _PG_VARS - had:
            os.environ.pop(key, None)
    frozen = {n: d for n, (d, trained) in dtypes.items() if not trained}
    trained = {n: d for n, (d, t) in dtypes.items() if t}
    assert frozen and trained
    assert set(frozen.values()) == {torch.bfloat16}, frozen  # embeddings, head, norms, base linears
    assert set(trained.values()) == {torch.float32}, trained  # the LoRA masters
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert losses == ref_losses  # bit for bit: the same bf16 values were computed with
    for n, w in lora.items():
        assert torch.equal(w, ref_lora[n]), n
