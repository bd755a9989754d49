"""FSDP and frozen weights (LoRA / QLoRA bases), one gloo rank, in process:
- under precision bf16 frozen weights are kept in bf16 whatever dtype they came in (a QLoRA model
  leaves peft's prepare_model_for_kbit_training with fp32 embeddings, head and norms): the same
  numbers as before, since FSDP2's MixedPrecisionPolicy computes with bf16 copies of every parameter
  anyway, at half the memory;
- a frozen untied head (its own FSDP group) is not gathered again for the fused loss's backward."""
from __future__ import annotations

import copy
import os

import pytest
import torch

_PG_VARS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def _train(model, data, out_dir, precision="bf16"):
    from unsloth_dist import Trainer

    trainer = Trainer(model, data, backend="fsdp", args={
        "output_dir": str(out_dir), "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-2,
        "precision": precision, "disable_tqdm": True, "seed": 0})
    dtypes = {n: (p.dtype, p.requires_grad) for n, p in trainer.backend.module.named_parameters()}
    result = trainer.train()
    lora = {n: p.detach().full_tensor().float().clone() for n, p in trainer.backend.module.named_parameters()
            if p.requires_grad}
    return dtypes, result.losses, lora


def _one_rank(fn):
    had = {k for k in _PG_VARS if k in os.environ}
    try:
        return fn()
    finally:  # the one-rank process group and its variables must not leak into later tests
        from unsloth_dist import distributed as D

        D.shutdown()
        for key in _PG_VARS - had:
            os.environ.pop(key, None)


@pytest.mark.parametrize("triton", ["1", "0"])
def test_fsdp_frozen_head_is_not_gathered_again_for_the_fused_loss_backward(tmp_path, monkeypatch, triton):
    """LoRA on an untied model with the fused CE: during the fused CE's backward the frozen head is
    still its shard (FSDP2 did not gather it again); with the gather forced back on (as before), it
    is whole. Same losses and adapters either way. Without Triton (triton "0": the CE's PyTorch
    reference, plain autograd, which saves the weight) the head is gathered for backward as before
    (skipping it there would read a freed tensor)."""
    from torch.distributed.tensor import DTensor
    from tiny import ragged_dataset, tiny_llama

    from unsloth_dist.kernels import cross_entropy as CE
    from unsloth_dist.models import patching
    from unsloth_dist.models.lora import add_lora
    from unsloth_dist.models.patching import patch_model

    monkeypatch.setenv("TRITON_INTERPRET", triton)
    data = ragged_dataset(n=12, seed=1, vocab=128, max_len=12, min_len=4)
    base = add_lora(tiny_llama(seed=0, vocab=128, hidden=64, layers=1), r=4, lora_alpha=8)
    seen = []
    real_backward = CE.FusedLinearCrossEntropyFunction.backward
    heads = []

    def backward(ctx, *grads):
        seen.append(isinstance(heads[-1].weight, DTensor))
        return real_backward(ctx, *grads)

    monkeypatch.setattr(CE.FusedLinearCrossEntropyFunction, "backward", staticmethod(backward))

    def run(name):
        model = copy.deepcopy(base)
        patch_model(model)
        assert model.unsloth_fused_loss
        heads.append(model.get_output_embeddings())
        seen.clear()
        _, losses, lora = _train(model, data, tmp_path / name, precision="fp32")
        flag = heads[-1]._get_fsdp_state()._fsdp_param_group.unshard_in_backward  # as the last forward set it
        return list(seen), losses, lora, flag

    def both():
        skipped = run("skip")
        real = patching._fsdp_head_backward_gather
        monkeypatch.setattr(patching, "_fsdp_head_backward_gather", lambda head, ce, x: real(head, None, x))
        return skipped, run("gather")

    (seen_skip, losses, lora, flag), (seen_gather, ref_losses, ref_lora, ref_flag) = _one_rank(both)
    assert ref_flag is True
    if triton == "1":
        assert flag is False
        assert seen_skip == [True] * 3, seen_skip  # the shard: not gathered for backward
        assert seen_gather == [False] * 3, seen_gather  # forced: gathered, as before
    else:
        assert flag is True and seen_skip == seen_gather == []  # the reference path: gathered, as before
    assert losses == ref_losses
    for n, w in lora.items():
        assert torch.equal(w, ref_lora[n]), n


def test_fsdp_bf16_keeps_frozen_weights_in_bf16_with_the_same_losses(tmp_path, monkeypatch):
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist.models.lora import add_lora

    data = ragged_dataset(n=12, seed=1, vocab=128, max_len=12, min_len=4)
    fp32_frozen = add_lora(tiny_llama(seed=0, vocab=128, hidden=64, layers=2), r=4, lora_alpha=8)
    before = copy.deepcopy(fp32_frozen)
    assert all(p.dtype == torch.float32 for p in fp32_frozen.parameters())
    import unsloth_dist.backends.fsdp as F

    def both():
        dtypes, losses, lora = _train(fp32_frozen, data, tmp_path / "a")
        # the rule before: a frozen weight kept the dtype it came in (FSDP2 cast it to bf16 per gather)
        monkeypatch.setattr(F, "_kept_dtype", lambda p, bf16: torch.float32 if p.requires_grad else None)
        ref_dtypes, ref_losses, ref_lora = _train(before, data, tmp_path / "b")
        assert {d for d, trained in ref_dtypes.values() if not trained} == {torch.float32}
        return dtypes, losses, lora, ref_losses, ref_lora

    dtypes, losses, lora, ref_losses, ref_lora = _one_rank(both)
    frozen = {n: d for n, (d, trained) in dtypes.items() if not trained}
    trained = {n: d for n, (d, t) in dtypes.items() if t}
    assert frozen and trained
    assert set(frozen.values()) == {torch.bfloat16}, frozen  # embeddings, head, norms, base linears
    assert set(trained.values()) == {torch.float32}, trained  # the LoRA masters
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert losses == ref_losses  # bit for bit: the same bf16 values were computed with
    for n, w in lora.items():
        assert torch.equal(w, ref_lora[n]), n


def test_fsdp_frozen_input_embedding_is_not_gathered_for_backward(tmp_path, monkeypatch):
    """A frozen untied input embedding whose output requires grad (enable_input_require_grads, as
    peft's prepare_model_for_kbit_training sets): FSDP2 would gather it again at the end of every
    backward (its pre-backward hook, and the last layer's implicit backward prefetch) for nothing: no
    weight gradient to compute. Counted at FSDP2's unshard: no backward gather of it goes through."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as G
    from tiny import ragged_dataset, tiny_llama

    from unsloth_dist.models.lora import add_lora

    gathers = []
    real_unshard = G.FSDPParamGroup.unshard

    def unshard(self, async_op=False):
        if (self._module_fqn.endswith("embed_tokens") and self._training_state == G.TrainingState.PRE_BACKWARD
                and not self.is_unsharded and self.unshard_in_backward):
            gathers.append(self._module_fqn)  # this call goes on to gather
        return real_unshard(self, async_op)

    monkeypatch.setattr(G.FSDPParamGroup, "unshard", unshard)
    data = ragged_dataset(n=12, seed=1, vocab=128, max_len=12, min_len=4)
    model = add_lora(tiny_llama(seed=0, vocab=128, hidden=64, layers=1), r=4, lora_alpha=8)
    model.enable_input_require_grads()
    _, losses, _ = _one_rank(lambda: _train(model, data, tmp_path / "e", precision="fp32"))
    assert gathers == [], gathers
    assert len(losses) == 3 and all(l == l for l in losses)
