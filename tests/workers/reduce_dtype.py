"""Train a tiny Llama under precision bf16 with backend.reduce_dtype fp32 and bf16 for ddp, fsdp and
zero2, and record what each engine was really set up with plus the losses and grad norms; then
fsdp with explicit forward/backward prefetching against the default schedule.

    torchrun --nproc_per_node 2 tests/workers/reduce_dtype.py OUT.pt
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import ragged_dataset, tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist import distributed as D  # noqa: E402


def engine_reduce_dtype(trainer) -> str:
    """The reduction dtype as the engine itself holds it (not as the config says)."""
    b = trainer.backend
    if b.name == "ddp":
        hooks = [h.__name__ for h, _ in trainer.model._comm_hooks]
        return "fp32" if "_fp32_allreduce_hook" in hooks else "native"
    if b.name == "fsdp":
        from unsloth_dist.backends.fsdp import decoder_layers

        dtypes = {layer._get_fsdp_state()._mp_policy.reduce_dtype for layer in decoder_layers(b.module)}
        assert len(dtypes) == 1, dtypes
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtypes.pop()]
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[b.engine.communication_data_type]


def main(out: str) -> None:
    records = {}
    for backend in ("ddp", "fsdp", "zero2"):
        for reduce_dtype in ("fp32", "bf16"):
            model = tiny_llama(seed=0, vocab=128, hidden=64, layers=2)
            data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
            trainer = Trainer(model, data, backend={"name": backend, "reduce_dtype": reduce_dtype}, args={
                "output_dir": os.path.join(os.path.dirname(out), f"{backend}-{reduce_dtype}"),
                "per_device_train_batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "precision": "bf16",
                "seed": 3, "disable_tqdm": True, "max_grad_norm": 1.0})
            result = trainer.train()
            records[f"{backend}-{reduce_dtype}"] = {
                "engine": engine_reduce_dtype(trainer), "losses": result.losses, "grad_norms": result.grad_norms,
                "cpu_group_is_world": D.cpu_group() is dist.group.WORLD,
                # bf16 parameters, but the rotary frequencies stay fp32 (a bf16 inv_freq misplaces positions)
                "param_dtype": str(trainer.backend.module.model.layers[0].mlp.up_proj.weight.dtype),
                "inv_freq_dtype": str(trainer.backend.module.model.rotary_emb.inv_freq.dtype)}
    # explicit FSDP2 prefetching (backend.forward_prefetch / backward_prefetch) changes only when
    # the all-gathers are issued: same run as fsdp-fp32, same losses
    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=3)
    data = ragged_dataset(n=16, seed=5, vocab=128, max_len=16, min_len=6)
    runs = {}
    for fwd, bwd in ((0, 1), (2, 2)):
        trainer = Trainer(copy.deepcopy(model), data, backend={"name": "fsdp", "forward_prefetch": fwd, "backward_prefetch": bwd},
                          args={"output_dir": os.path.join(os.path.dirname(out), f"fsdp-prefetch{fwd}{bwd}"),
                                "per_device_train_batch_size": 2, "max_steps": 4, "learning_rate": 1e-3,
                                "precision": "bf16", "seed": 3, "disable_tqdm": True, "max_grad_norm": 1.0})
        from torch.distributed.tensor import DTensor

        from unsloth_dist.backends.fsdp import decoder_layers

        layers = decoder_layers(trainer.backend.module)
        embed = trainer.backend.module.get_input_embeddings()
        head = trainer.backend.module.lm_head
        # when the first layer starts, is the (untied) embedding back to its shard, and the (untied)
        # head not gathered yet? when the last layer's backward starts, is the head back to its shard?
        sharded_at_layer0, head_sharded_at_last_backward = [], []
        probes = [layers[0].register_forward_pre_hook(lambda *_: sharded_at_layer0.append(
                      (isinstance(embed.weight, DTensor), isinstance(head.weight, DTensor)))),
                  layers[-1].register_full_backward_pre_hook(lambda *_: head_sharded_at_last_backward.append(
                      isinstance(head.weight, DTensor)))]
        result = trainer.train()
        for probe in probes:
            probe.remove()
        states = [layer._get_fsdp_state() for layer in layers]
        # for each layer: the indices of the layers it prefetches (None: FSDP2's implicit default)
        def idx(lst):
            return None if lst is None else [states.index(s) for s in lst]
        runs[f"{fwd}{bwd}"] = {
            "losses": result.losses,
            "forward": [idx(getattr(s, "_states_to_forward_prefetch", None)) for s in states],
            "backward": [idx(getattr(s, "_states_to_backward_prefetch", None)) for s in states],
            "reshard": [s._fsdp_param_group.post_forward_mesh_info is not None for s in states],
            "embed_sharded_at_layer0": [list(t) for t in sorted(set(sharded_at_layer0))],
            "head_sharded_at_last_backward": sorted(set(head_sharded_at_last_backward))}
    records["prefetch"] = runs
    # fused_master_adamw under DDP (Triton's interpreter: the launch sets TRITON_INTERPRET=1): the
    # all-reduced bf16 gradients (bucket views) go straight into the kernel; same run as ddp-fp32
    from test_kernels import _rne_bf16_casts

    from unsloth_dist.kernels import LAUNCHES

    class _Patch:  # the one monkeypatch method _rne_bf16_casts uses, for the rest of this process
        setattr = staticmethod(setattr)

    _rne_bf16_casts(_Patch())  # round fp32 -> bf16 to nearest even like a GPU (the interpreter truncates)

    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=2)
    trainer = Trainer(model, data, backend={"name": "ddp", "gradient_as_bucket_view": True}, args={
        "output_dir": os.path.join(os.path.dirname(out), "ddp-fused"), "per_device_train_batch_size": 2,
        "max_steps": 4, "learning_rate": 1e-3, "precision": "bf16", "seed": 3, "disable_tqdm": True,
        "max_grad_norm": 1.0, "fused_master_adamw": True})
    before = LAUNCHES["master_adamw"]
    result = trainer.train()
    records["ddp-fused"] = {"losses": result.losses, "grad_norms": result.grad_norms,
                            "launches": LAUNCHES["master_adamw"] - before, "n_params": len(trainer.backend._master)}
    if dist.get_rank() == 0:
        torch.save(records, out)


if __name__ == "__main__":
    main(sys.argv[1])
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
