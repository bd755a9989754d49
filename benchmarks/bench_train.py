"""Training throughput and memory: unsloth_dist against transformers (+ Liger-Kernel) on every backend.

One run of this script measures, on the same GPUs and in the same session, unsloth_dist's Trainer
(kernels patched in) under single / ddp / fsdp / zero2 / zero3 and the baselines a user would
otherwise write: plain transformers with torch DDP, FSDP2 (`fully_shard` per decoder layer + root,
bf16 `MixedPrecisionPolicy`) or DeepSpeed ZeRO, each with and without Liger-Kernel's Llama patches
(`apply_liger_kernel_to_llama`, fused linear cross-entropy). Random weights, random tokens.

    # the whole matrix on 2 GPUs (each case is its own torchrun / python process)
    python benchmarks/bench_train.py --workload full-1b --gpus 2 --out benchmarks/results/train.json
    # a few cases
    python benchmarks/bench_train.py --workload lora-8b --gpus 2 --impls ours,hf --backends fsdp,zero3
    # one case, as the matrix launches it
    torchrun --nproc_per_node 2 benchmarks/bench_train.py --case --impl ours --backend fsdp --workload full-1b

Workloads: full-1b (Llama-3.2-1B shape, full fine-tuning, seq 2048, micro-batch 4), lora-8b
(Llama-3.1-8B shape, LoRA r=16 on all linear layers), qlora-8b (the same on a 4-bit NF4 base),
lora-qwen3-8b (the same LoRA on the Qwen3-8B shape, q_norm / k_norm before RoPE),
tiny / tiny-lora / tiny-qlora (a few-MB shape for the CPU test). Each case reports tokens/s per GPU (median of
the timed steps, after warm-up), peak memory per GPU (max over ranks), MFU and the losses.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, rope_theta=1000000.0)
TINY_QWEN3 = dict(TINY, head_dim=16)

WORKLOADS = {
    "full-1b": dict(shape=LLAMA_1B, seq=2048, micro=4, lora=False, quant=False, ckpt=False),
    "lora-8b": dict(shape=LLAMA_8B, seq=2048, micro=4, lora=True, quant=False, ckpt=True),
    "qlora-8b": dict(shape=LLAMA_8B, seq=2048, micro=4, lora=True, quant=True, ckpt=True),
    "tiny": dict(shape=TINY, seq=32, micro=2, lora=False, quant=False, ckpt=False),
    "tiny-lora": dict(shape=TINY, seq=32, micro=2, lora=True, quant=False, ckpt=True),
    "tiny-qlora": dict(shape=TINY, seq=32, micro=2, lora=True, quant=True, ckpt=True),
    # Qwen3 (q_norm / k_norm before RoPE): the architecture the RoPE-under-checkpointing fix touched
    "lora-qwen3-8b": dict(shape=QWEN3_8B, seq=2048, micro=4, lora=True, quant=False, ckpt=True, arch="qwen3"),
    "tiny-qwen3-lora": dict(shape=TINY_QWEN3, seq=32, micro=2, lora=True, quant=False, ckpt=True, arch="qwen3"),
}
IMPLS = ["ours", "hf", "hf-liger"]
BACKENDS = ["single", "ddp", "fsdp", "zero2", "zero3"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- shared pieces


def _env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(local_rank: int):
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(wl: dict, device, dtype, seq: int, attn: str):
    """The workload's Llama (or Qwen3) with random weights, built directly on `device` in `dtype`."""
    import torch
    import transformers as T

    config_cls, model_cls = ((T.Qwen3Config, T.Qwen3ForCausalLM) if wl.get("arch") == "qwen3"
                             else (T.LlamaConfig, T.LlamaForCausalLM))
    cfg = config_cls(**wl["shape"], max_position_embeddings=max(seq, 4096), attn_implementation=attn)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def quantize_4bit(model, compute_dtype):
    """Swap every decoder-layer nn.Linear for a bitsandbytes NF4 Linear4bit (double quantization,
    bf16 quant storage so FSDP2 / ZeRO-3 can shard it), quantizing the random weights on the GPU.
    The same modules `from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))` builds."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if not isinstance(child, nn.Linear) or "lm_head" in f"{name}.{child_name}":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.bfloat16, device="meta")
            w = child.weight.data
            # Params4bit quantizes on its first move to a GPU (also from a GPU tensor)
            # (module=q: the layer keeps the quant state too, which FSDP2's resharded parameter loses)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.bfloat16, module=q).to(w.device)
            setattr(mod, child_name, q)
            del child, w
    model.is_loaded_in_4bit = True
    model.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                        "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"}
    return model


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token (embedding lookups excluded, the head counted)."""
    import torch

    base = model
    while hasattr(base, "base_model") and base.base_model is not base:
        base = base.base_model
    cfg = base.config if hasattr(base, "config") else model.config
    n = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lora_" in name:
            continue
        numel = p.numel()
        if getattr(p, "quant_storage", None) is not None or p.dtype == torch.uint8:  # packed 4-bit
            numel = numel * (p.element_size() * 2)
        n += numel
    if getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size
    return n


def flops_per_token(wl: dict, n_matmul: int, seq: int) -> float:
    s = wl["shape"]
    attn = 12 * s["num_hidden_layers"] * s["hidden_size"] * seq  # QK^T and AV, forward + backward (no causal discount)
    # full fine-tuning: forward 2N + backward 4N; frozen base (LoRA): no weight gradients, 4N
    return (4 if wl["lora"] else 6) * n_matmul + attn


def random_batches(n: int, micro: int, seq: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, seq), generator=g) for _ in range(n)]


def _fused_adamw(args):
    """fused_master_adamw for ours: None (auto: on for single / ddp under bf16 on a GPU), True or False."""
    return {"auto": None, "on": True, "off": False}[args.fused_adamw]


def _backend_set(args) -> dict:
    """--backend-set KEY=VALUE pairs as a dict (VALUE read as YAML: 1, true, bf16)."""
    import yaml

    out = {}
    for kv in args.backend_set:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"--backend-set {kv!r}: expected KEY=VALUE, e.g. forward_prefetch=1")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _memory_peak(args, device):
    """What is alive at the peak, from the allocator trace over the steps (`--memory-peak`, rank 0, CUDA)."""
    from mem_peak import MemoryPeak

    return MemoryPeak(args.memory_peak if _env()[0] == 0 else None, device,
                      f"{args.impl}_{args.backend}")


class _Profile:
    """torch.profiler over `n` timed steps (rank 0), summarised into `dir/impl_backend.txt`: the
    top CUDA kernels and the share of each step the GPU spent in kernels."""

    def __init__(self, args, device, n: int = 3):
        self.args, self.device, self.n, self.prof, self.t0 = args, device, n, None, 0.0
        self.on = bool(args.profile_dir) and device.type == "cuda" and _env()[0] == 0

    def at_step(self, i: int) -> None:  # called after step i (0-based) finished
        import torch

        if not self.on:
            return
        if i == self.args.warmup - 1:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA],
                                               with_stack=self.args.profile_stack)
            self.prof.start()
            self.t0 = time.perf_counter()
        elif self.prof is not None and i == self.args.warmup - 1 + self.n:
            _sync(self.device)
            wall = (time.perf_counter() - self.t0) / self.n
            self.prof.stop()
            ka = self.prof.key_averages()
            kernel_us = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA") / self.n
            table = ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
            head = (f"{self.args.impl} {self.args.backend}: wall {wall * 1e3:.1f} ms/step, GPU kernels "
                    f"{kernel_us / 1e3:.1f} ms/step ({100 * kernel_us / 1e6 / wall:.0f}% busy)\n")
            out = Path(self.args.profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            cpu_table = ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
            (out / f"{self.args.impl}_{self.args.backend}.txt").write_text(head + table + "\n\nBy host time:\n" + cpu_table)
            if self.args.profile_stack:  # host time by Python call site (who spends it: our launchers, peft, FSDP...)
                stacks = self.prof.key_averages(group_by_stack_n=8).table(
                    sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90, max_src_column_width=160)
                (out / f"{self.args.impl}_{self.args.backend}_stacks.txt").write_text(head + stacks)
            print("PROFILE " + head.strip(), flush=True)
            rows = sorted(((e.self_device_time_total / self.n / 1e3, e.count / self.n, e.key) for e in ka
                           if e.self_device_time_total > 0), reverse=True)[:25]
            for ms, calls, key in rows:
                print(f"PROFILE   {ms:8.2f} ms/step {calls:6.0f} calls  {key[:100]}", flush=True)
            host = sorted(((e.self_cpu_time_total / self.n / 1e3, e.count / self.n, e.key) for e in ka
                           if e.self_cpu_time_total > 0), reverse=True)[:25]
            total_host = sum(e.self_cpu_time_total for e in ka) / self.n / 1e3
            print(f"PROFILE-HOST {self.args.impl} {self.args.backend}: {total_host:.1f} ms/step host time in ops", flush=True)
            for ms, calls, key in host:
                print(f"PROFILE-HOST {ms:8.2f} ms/step {calls:6.0f} calls  {key[:100]}", flush=True)
            self.prof = None


# --------------------------------------------------------------------------- ours


def run_ours(args, wl, device, world) -> dict:
    import torch

    from unsloth_dist import Trainer
    from unsloth_dist.models.patching import patch_model

    dtype = torch.bfloat16 if (wl["lora"] and device.type == "cuda") else torch.float32
    model = build_model(wl, device, dtype, args.seq, args.attn)
    if wl["quant"]:
        quantize_4bit(model, torch.bfloat16)
    n_matmul = matmul_params(model)
    if wl["lora"]:
        from unsloth_dist.models.lora import add_lora

        model = add_lora(model, r=16, lora_alpha=16, target_modules=LORA_TARGETS)
    report = patch_model(model, kernels=not args.no_kernels)
    if args.no_fused_lora:  # add_lora patched the LoRA linears: give them peft's forward back
        from unsloth_dist.models.patching import _clear_forward

        for m in model.modules():
            if m.__dict__.get("_unsloth_patch") == "lora":
                _clear_forward(m)
        report.patched.pop("lora", None)
    if args.no_step_before_read:  # fsdp: the optimizer step after the loss / norm read, as before
        from unsloth_dist.backends.fsdp import FSDPBackend

        FSDPBackend.step_before_read = lambda self: False
    if args.fsdp_head_in_root:  # fsdp: an untied output head stays in the root group (gathered until backward ends), as before
        from unsloth_dist.backends import fsdp as fsdp_backend

        fsdp_backend._untied_output_head = lambda model: None
    if args.no_qlora_linear:  # 4-bit bases through bitsandbytes' own forward (lora_xa, base, lora_add), as before
        from unsloth_dist.models import patching

        patching._frozen_4bit_linear = lambda base, x: None
    steps = args.warmup + args.steps
    vocab = wl["shape"]["vocab_size"]
    rows = [{"input_ids": r} for b in random_batches(steps * world, args.micro, args.seq, vocab, 1) for r in b.tolist()]
    times: list[float] = []
    prof = _Profile(args, device)

    class Timer:
        def on_step_end(self, trainer, step, loss):
            _sync(device)
            times.append(time.perf_counter())
            prof.at_step(len(times) - 1)

    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    backend = args.backend if args.backend == "single" else {
        "name": args.backend, "reduce_dtype": args.reduce_dtype, **_backend_set(args)}
    trainer = Trainer(model, rows, backend=backend, callbacks=[Timer()], args={
        "output_dir": out_dir, "precision": args.precision, "per_device_train_batch_size": args.micro,
        "max_steps": steps, "learning_rate": 1e-5, "gradient_checkpointing": wl["ckpt"], "disable_tqdm": True,
        "logging_steps": 10**6, "save_on_sigterm": False, "seed": 0, "max_grad_norm": 1.0,
        "shuffle": False,  # the rows in order: rank r's step s is batch s * world + r, as the baselines read them
        "fused_master_adamw": _fused_adamw(args),
        **({"gradient_checkpointing_layers": args.ckpt_layers} if wl["ckpt"] and args.ckpt_layers is not None else {}),
        **({"activation_offload": True} if args.activation_offload and wl["ckpt"] else {}),
        # the baselines' AdamW runs at a constant rate without weight decay: the loss columns compare
        "lr_scheduler_type": "constant", "weight_decay": 0.0,
    })
    # the peak is training's: building the random model on every GPU (unsharded) and the backend's
    # wrapping are not counted; what the wrapping keeps (shards, masters) is, as the allocation it is
    _reset_peak(device)
    t0 = time.perf_counter()
    mem = _memory_peak(args, device)
    mem.start([*trainer.backend.module.named_parameters(), *trainer.backend.module.named_buffers()])
    result = trainer.train()
    mem.finish()
    step_s = [b - a for a, b in zip([t0] + times[:-1], times)][args.warmup:]
    return {"step_s": step_s, "losses": result.losses, "n_matmul": n_matmul, "patched": list(report.ops),
            "fused_master_adamw": bool(getattr(trainer.backend, "_fused_adamw", False))}


# --------------------------------------------------------------------------- baselines


def run_hf(args, wl, device, world, liger: bool) -> dict:
    """The loop a transformers user writes: HF model, torch DDP / FSDP2 / DeepSpeed, fused AdamW,
    autocast (single / ddp) or bf16 MixedPrecisionPolicy (fsdp) or DeepSpeed bf16 (zero)."""
    import torch
    import torch.distributed as dist

    if liger:
        import liger_kernel.transformers.monkey_patch as LK

        apply = LK.apply_liger_kernel_to_qwen3 if wl.get("arch") == "qwen3" else LK.apply_liger_kernel_to_llama
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    backend = args.backend
    cuda = device.type == "cuda"
    bf16 = args.precision != "fp32"
    # full fine-tuning keeps fp32 weights (autocast / FSDP mixed precision / DeepSpeed bf16 masters);
    # a LoRA user loads the frozen base in bf16 (torch_dtype=torch.bfloat16) and peft keeps adapters fp32
    dtype = torch.bfloat16 if (wl["lora"] and cuda) else torch.float32
    model = build_model(wl, device, dtype, args.seq, args.attn)
    if wl["quant"]:
        quantize_4bit(model, torch.bfloat16)
    n_matmul = matmul_params(model)
    if wl["lora"]:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if wl["quant"]:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=wl["ckpt"],
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if wl["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if backend != "single" and not dist.is_initialized():
        if backend.startswith("zero"):
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        else:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]

    def adamw(ps):
        return torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.0, fused=cuda)

    autocast = bf16 and backend in ("single", "ddp")
    engine = None
    if backend == "single":
        opt = adamw(params)
        fwd = model
    elif backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[device.index] if cuda else None)
        opt = adamw(params)
    elif backend == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        fwd = model
        opt = adamw([p for p in model.parameters() if p.requires_grad])
    else:
        import deepspeed

        stage = int(backend[-1])
        ds_cfg = {
            "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
            "steps_per_print": 10**9, "wall_clock_breakdown": False,
        }
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=adamw(params), config=ds_cfg,
                                                 dist_init_required=False)
        fwd = engine
    _reset_peak(device)  # after wrapping, as for ours (see run_ours)
    rank = dist.get_rank() if dist.is_initialized() else 0
    vocab = wl["shape"]["vocab_size"]
    batches = random_batches((args.warmup + args.steps) * world, args.micro, args.seq, vocab, 1)[rank::world]
    times, losses = [], []
    prof = _Profile(args, device)
    model.train()
    _sync(device)
    mem = _memory_peak(args, device)
    mem.start()
    t = time.perf_counter()
    for x in batches:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fwd(input_ids=x, labels=x, use_cache=False).loss
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        _sync(device)
        now = time.perf_counter()
        times.append(now - t)
        t = now
        prof.at_step(len(times) - 1)
    mem.finish()
    # the global loss of each step, as ours reports it (after timing: no extra collective in the loop);
    # every rank's batch has the same token count, so the mean of the ranks' means is the token mean
    loss_t = torch.stack(losses).float()
    if dist.is_initialized() and world > 1:
        dist.all_reduce(loss_t)
        loss_t /= world
    return {"step_s": times[args.warmup:], "losses": loss_t.tolist(), "n_matmul": n_matmul}


# --------------------------------------------------------------------------- one case


def run_case(args) -> int:
    import torch

    rank, world, local = _env()
    device = _device(local)
    wl = dict(WORKLOADS[args.workload])
    if args.seq is None:
        args.seq = wl["seq"]
    if args.micro is None:
        args.micro = wl["micro"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = {"workload": args.workload, "impl": args.impl, "backend": args.backend, "world_size": world,
              "reduce_dtype": args.reduce_dtype if args.impl == "ours" else None,
              "backend_set": _backend_set(args) if args.impl == "ours" and args.backend != "single" else None,
              "fused_master_adamw": None,  # ours: what the backend ran (filled in below)
              "ckpt_layers": args.ckpt_layers if args.impl == "ours" else None,
              "activation_offload": args.activation_offload if args.impl == "ours" and wl["ckpt"] else None,
              "fused_lora": (not args.no_fused_lora) if args.impl == "ours" and wl["lora"] else None,
              "step_before_read": not args.no_step_before_read if args.impl == "ours" and args.backend == "fsdp" else None,
              "head_in_root": args.fsdp_head_in_root if args.impl == "ours" and args.backend == "fsdp" else None,
              "qlora_linear": (not args.no_qlora_linear and not args.no_fused_lora) if args.impl == "ours" and wl["quant"] else None,
              "seq": args.seq, "micro_batch": args.micro, "precision": args.precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        if args.impl == "ours":
            r = run_ours(args, wl, device, world)
        else:
            r = run_hf(args, wl, device, world, liger=args.impl == "hf-liger")
    except torch.cuda.OutOfMemoryError as exc:
        record.update(status="oom", error=str(exc).splitlines()[0][:300])
        r = None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            t = torch.tensor([peak if peak == peak else 0.0], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            peak = float(t) if device.type == "cuda" else peak
    if r is not None:
        med = statistics.median(r["step_s"])
        tokens = args.micro * args.seq
        fpt = flops_per_token(wl, r["n_matmul"], args.seq)
        record.update(
            status="ok", steps_timed=len(r["step_s"]), step_s_median=med, step_s=[round(x, 5) for x in r["step_s"]],
            step_s_iqr=_iqr(r["step_s"]), tokens_per_s_per_gpu=tokens / med, peak_mem_gib=peak,
            mfu=(tokens / med) * fpt / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
            loss_first=r["losses"][0], loss_last=r["losses"][-1], losses=[round(x, 6) for x in r["losses"]],
            n_matmul_params=r["n_matmul"],
        )
        if "patched" in r:
            record["kernels"] = r["patched"]
            record["fused_master_adamw"] = r["fused_master_adamw"]
    if rank == 0:
        line = json.dumps(record)
        print("BENCH_RESULT " + line, flush=True)
        if args.result_file:
            with open(args.result_file, "a") as f:
                f.write(line + "\n")
    if world > 1:
        from unsloth_dist.distributed import shutdown

        shutdown()  # gc (models / DDP reducers in cycles), barrier, every group destroyed before exit
    return 0 if record.get("status") in ("ok", "oom") else 1


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


# --------------------------------------------------------------------------- the matrix


def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401

        return True
    except Exception:
        return False


def run_matrix(args) -> int:
    impls = args.impls.split(",")
    backends = args.backends.split(",")
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"--impls: unknown {i!r} (choose from {', '.join(IMPLS)})")
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"--backends: unknown {b!r} (choose from {', '.join(BACKENDS)})")
    if "hf-liger" in impls and not _liger_available():
        print("note: liger-kernel is not installed; skipping the hf-liger baseline", flush=True)
        impls = [i for i in impls if i != "hf-liger"]
    result_file = Path(tempfile.mkstemp(prefix="bench_train_", suffix=".jsonl")[1])
    records = []
    cases = []
    for backend in backends:
        # --scaling: each multi-process backend also at one rank, same per-GPU batch, just before
        sizes = [1] if backend == "single" else ([1, args.gpus] if args.scaling and args.gpus > 1 else [args.gpus])
        cases += [(backend, impl, gpus) for gpus in sizes for impl in impls]
    for backend, impl, gpus in cases:
        base = [sys.executable] if backend == "single" else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        cmd = base + [__file__, "--case", "--impl", impl, "--backend", backend, "--workload", args.workload,
                      "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
                      "--attn", args.attn, "--peak-tflops", str(args.peak_tflops), "--result-file", str(result_file)]
        for flag, v in (("--seq", args.seq), ("--micro", args.micro)):
            if v is not None:
                cmd += [flag, str(v)]
        if args.no_kernels:
            cmd.append("--no-kernels")
        cmd += ["--fused-adamw", args.fused_adamw]
        if args.no_fused_lora:
            cmd.append("--no-fused-lora")
        if args.no_qlora_linear:
            cmd.append("--no-qlora-linear")
        if args.no_step_before_read:
            cmd.append("--no-step-before-read")
        if args.fsdp_head_in_root:
            cmd.append("--fsdp-head-in-root")
        if args.ckpt_layers is not None:
            cmd += ["--ckpt-layers", str(args.ckpt_layers)]
        if args.activation_offload:
            cmd.append("--activation-offload")
        cmd += ["--reduce-dtype", args.reduce_dtype]
        for kv in args.backend_set:
            cmd += ["--backend-set", kv]
        if args.memory_peak:
            cmd += ["--memory-peak", str(args.memory_peak)]
        if args.profile_dir:
            cmd += ["--profile-dir", str(args.profile_dir)]
            if args.profile_stack:
                cmd += ["--profile-stack"]
        before = len(_read(result_file))
        t0 = time.time()
        print(f"--- {impl} {backend} x{gpus}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.case_timeout)
        got = _read(result_file)[before:]
        for line in proc.stdout.splitlines():
            if line.startswith("PROFILE"):
                print(line, flush=True)
        if proc.returncode != 0 or not got:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            # the exception itself (torchrun's summary alone says only "FAILED")
            cause = [ln for ln in lines if ("Error" in ln or "Exception" in ln) and "error_file" not in ln
                     and "errors.html" not in ln and "Warning" not in ln][-6:]
            tail = "\n".join(cause + lines[-8:])
            rec = {"workload": args.workload, "impl": impl, "backend": backend, "world_size": gpus,
                   "status": "failed", "error": tail[-1500:], "exit_code": proc.returncode}
            if got:  # rank 0 wrote its result, then a rank failed (e.g. at exit): keep what was measured
                rec["measured"] = got[-1]
            log = Path(str(args.out) + f".{impl}_{backend}_x{gpus}.log")
            log.write_text(f"$ {' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
            rec["log"] = str(log)
            print(tail + f"\n(full output: {log})", flush=True)
        else:
            rec = got[-1]
        rec["wall_s"] = round(time.time() - t0, 1)
        records.append(rec)
        print(_fmt_row(rec), flush=True)
        _write(args.out, records)  # after every case: a run cut short keeps what it measured
    table = _write(args.out, records)
    print(table)
    for line in scaling_rows(records):
        print(line, flush=True)
    for line in loss_warnings(records):
        print(line, flush=True)
    failed = [r for r in records if r.get("status") == "failed"]
    return 1 if failed and args.strict else 0


def _write(out, records: list[dict]) -> str:
    table = markdown_table(records)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(out) + ".tmp")
        tmp.write_text(json.dumps({"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d"),
                                   "records": records, "table": table, "scaling": scaling(records)}, indent=1))
        tmp.replace(out)
    return table


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['impl']:9s} {r['backend']:6s} {r.get('status')}: {str(r.get('error', ''))[:200]}"
    mfu = f" mfu {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
    return (f"{r['impl']:9s} {r['backend']:6s} x{r['world_size']} {r['tokens_per_s_per_gpu']:10.0f} tok/s/gpu "
            f"peak {r['peak_mem_gib']:.2f} GiB{mfu} loss {r['loss_first']:.3f}->{r['loss_last']:.3f}")


# ours and a baseline read the same batches (ours with shuffle: false); at step 1 no update has happened
# yet, so their losses differ only by forward numerics (bf16 rounding: ~1e-3 at the 1B shape, run 5)
LOSS_GAP_WARN = 2e-3


def loss_gap(r: dict, base: dict):
    """(|Δ| at step 1, max |Δ| over the steps both ran) between two records' loss columns, or None."""
    a, b = r.get("losses") or [], base.get("losses") or []
    n = min(len(a), len(b))
    if n == 0:
        return None
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    return diffs[0], max(diffs)


def loss_warnings(records: list[dict]) -> list[str]:
    """A line for each (ours, baseline) pair of one backend whose step-1 losses differ by more than
    LOSS_GAP_WARN: the two models did not compute the same function before any update."""
    out = []
    ok = [r for r in records if r.get("status") == "ok"]
    for r in (r for r in ok if r["impl"] == "ours"):
        for base in (b for b in ok if b["impl"] != "ours" and b["backend"] == r["backend"]
                     and b.get("world_size") == r.get("world_size")):
            d = loss_gap(r, base)
            if d is not None and d[0] > LOSS_GAP_WARN:
                out.append(f"WARNING loss: ours {r['backend']} differs from {base['impl']} by {d[0]:.2e} at step 1 "
                           f"(before any update; > {LOSS_GAP_WARN:g}): check the forward's numerics")
    return out


def scaling(records: list[dict]) -> list[dict]:
    """Scaling efficiency per (impl, backend) measured at one rank and at N > 1 ranks (`--scaling`):
    tokens/s per GPU at N over tokens/s at one rank (tokens/s on N GPUs / (N x one GPU), same per-GPU
    batch; the issue's target is >= 0.97 for ddp and fsdp)."""
    ok = [r for r in records if r.get("status") == "ok"]
    out = []
    for r in ok:
        if r["world_size"] <= 1:
            continue
        one = [b for b in ok if b["impl"] == r["impl"] and b["backend"] == r["backend"] and b["world_size"] == 1]
        if one:
            out.append({"impl": r["impl"], "backend": r["backend"], "gpus": r["world_size"],
                        "tokens_per_s_per_gpu_1": one[-1]["tokens_per_s_per_gpu"],
                        "tokens_per_s_per_gpu_n": r["tokens_per_s_per_gpu"],
                        "efficiency": r["tokens_per_s_per_gpu"] / one[-1]["tokens_per_s_per_gpu"]})
    return out


def scaling_rows(records: list[dict]) -> list[str]:
    rows = scaling(records)
    if not rows:
        return []
    lines = ["| backend | impl | GPUs | tokens/s/GPU at 1 | at N | scaling efficiency |", "| --- | --- | --- | --- | --- | --- |"]
    for e in rows:
        lines.append(f"| {e['backend']} | {e['impl']} | {e['gpus']} | {e['tokens_per_s_per_gpu_1']:.0f} | "
                     f"{e['tokens_per_s_per_gpu_n']:.0f} | {e['efficiency']:.3f} |")
    return lines


def markdown_table(records: list[dict]) -> str:
    """Rows per backend: ours and each baseline, with ours' ratio to the best baseline of that backend
    at the same number of GPUs."""
    lines = ["| backend | impl | GPUs | tokens/s/GPU | peak GiB | MFU | loss first→last | vs best baseline (speed, memory) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for backend in BACKENDS:
        rows = [r for r in records if r.get("backend") == backend]
        if not rows:
            continue
        for r in rows:
            ok_base = [b for b in rows if b["impl"] != "ours" and b.get("status") == "ok"
                       and b.get("world_size") == r.get("world_size")]
            best = max(ok_base, key=lambda b: b["tokens_per_s_per_gpu"]) if ok_base else None
            if r.get("status") != "ok":
                lines.append(f"| {backend} | {r['impl']} | {r.get('world_size', '')} | {r.get('status')} | | | | |")
                continue
            ratio = ""
            if r["impl"] == "ours" and best is not None:
                mem = r["peak_mem_gib"] / best["peak_mem_gib"] if best["peak_mem_gib"] == best["peak_mem_gib"] else float("nan")
                ratio = f"{r['tokens_per_s_per_gpu'] / best['tokens_per_s_per_gpu']:.2f}x, {mem:.2f}x (vs {best['impl']})"
                d = loss_gap(r, best)
                if d is not None:
                    ratio += f"; Δloss {d[0]:.1e} at step 1, max {d[1]:.1e}"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
            lines.append(
                f"| {backend} | {r['impl']} | {r['world_size']} | {r['tokens_per_s_per_gpu']:.0f} | {r['peak_mem_gib']:.2f} "
                f"| {mfu} | {r['loss_first']:.3f}→{r['loss_last']:.3f} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="full-1b", choices=sorted(WORKLOADS))
    p.add_argument("--gpus", type=int, default=1, help="ranks per multi-process case (the matrix)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--micro", type=int, default=None, help="micro-batch per GPU")
    p.add_argument("--precision", default="bf16", choices=["bf16", "bf16-mixed", "fp32"],
                   help="ours' precision. bf16: bf16 parameters, fp32 masters (single / ddp without autocast); "
                        "bf16-mixed: fp32 parameters under bf16 autocast, as the single / ddp baselines run. "
                        "The baselines run autocast (single / ddp), FSDP2's bf16 MixedPrecisionPolicy or DeepSpeed "
                        "bf16 under either; fp32: everyone in fp32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--no-kernels", action="store_true", help="ours without the Triton kernels")
    p.add_argument("--ckpt-layers", type=int, default=None,
                   help="ours, workloads with activation checkpointing (lora-8b, qlora-8b): checkpoint only the "
                        "first K decoder layers (gradient_checkpointing_layers)")
    p.add_argument("--activation-offload", action="store_true",
                   help="ours, workloads with activation checkpointing: activation_offload (each checkpointed "
                        "layer's input in pinned CPU memory until its recompute)")
    p.add_argument("--no-fused-lora", action="store_true",
                   help="ours, LoRA workloads: peft's LoRA forward instead of the fused update (kernels.lora_delta)")
    p.add_argument("--scaling", action="store_true",
                   help="with --gpus N > 1: run each multi-process backend at one rank too (same per-GPU batch) and "
                        "report the scaling efficiency, tokens/s per GPU at N over that at one rank (ours' one-rank "
                        "ZeRO runs use the one-rank DeepSpeed config: bf16 communication, stages 1-2 without overlap_comm)")
    p.add_argument("--fsdp-head-in-root", action="store_true",
                   help="ours, fsdp: keep an untied output head in the root FSDP group, gathered from its forward to "
                        "the end of backward (the code before NOTES 32), for an A/B in the same call")
    p.add_argument("--no-qlora-linear", action="store_true",
                   help="ours, QLoRA workloads: bitsandbytes' Linear4bit forward under the fused update instead of "
                        "the one-node 4-bit GEMM (kernels.qlora_linear)")
    p.add_argument("--no-step-before-read", action="store_true",
                   help="ours, fsdp: issue the optimizer step after reading the loss and the norm (the order before "
                        "the fused AdamW's device-side skip)")
    p.add_argument("--fused-adamw", default="auto", choices=["auto", "on", "off"],
                   help="ours: fused_master_adamw (clip + AdamW on the fp32 masters + bf16 copy in one kernel); "
                        "auto leaves it unset (on for single / ddp under bf16 on a GPU)")
    p.add_argument("--reduce-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="ours: backend.reduce_dtype of ddp / fsdp / zero (the baselines keep their own defaults)")
    p.add_argument("--backend-set", action="append", default=[], metavar="KEY=VALUE",
                   help="ours: one more field of the backend config for ddp / fsdp / zero cases (repeatable; VALUE "
                        "parsed as YAML), e.g. --backend-set forward_prefetch=1 --backend-set reshard_after_forward=false")
    p.add_argument("--profile-dir", default=None, help="profile 3 timed steps per case (rank 0) into this folder")
    p.add_argument("--memory-peak", default=None,
                   help="CUDA: record the allocator history over the steps (rank 0) and write what is alive at the "
                        "peak, by call site, into this folder (IMPL_BACKEND.json; mem_peak.py); slower steps")
    p.add_argument("--profile-stack", action="store_true",
                   help="with --profile-dir: record Python stacks too and write the host time by call site "
                        "(IMPL_BACKEND_stacks.txt); slower profiled steps")
    p.add_argument("--out", default=None, help="JSON with every record and the markdown table")
    p.add_argument("--strict", action="store_true", help="exit 1 when a case failed")
    p.add_argument("--case-timeout", type=int, default=900)
    # one case (what the matrix launches)
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", choices=IMPLS)
    p.add_argument("--backend", default="single", choices=BACKENDS)
    p.add_argument("--result-file", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        return run_case(args)
    return run_matrix(args)


if __name__ == "__main__":
    sys.exit(main())
