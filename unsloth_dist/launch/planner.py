"""Per-GPU memory estimates for every backend and precision, and a recommendation.

All sizes are bytes per GPU. Notation: P = all parameters, T = trainable parameters (P for full
fine-tuning, the adapters for LoRA), N = GPUs, h / I / V / L = hidden, intermediate, vocab,
layers, kv = key/value width (kv_heads x head_dim), nh = attention heads, tokens = micro-batch x seq.

Precision semantics (what our backends do, see backends/base.py, fsdp.py, deepspeed.py):

    precision    weights          grads    fp32 master   Adam (exp_avg + exp_avg_sq)
    fp32         4 B/param        4 B      -             8 B
    bf16-mixed   4 B (autocast)   4 B      -             8 B
    bf16         2 B              2 B      4 B           8 B      (2 + 2 + 12 per trainable param)
    (ZeRO keeps an fp32 master partition, 4T/N, in every precision.)

Partitioning:
    single, ddp   everything on every GPU. DDP's gradient buckets are the grads
                  (gradient_as_bucket_view), so they stay allocated between steps.
    zero1         Adam + fp32 master partitioned (/N); weights and grads full.
    zero2         also grads partitioned (/N): DeepSpeed allocates the partition as backward starts
                  and keeps it through the step, which flattens it (w T/N) and, under bf16, copies
                  that to fp32 (4T/N); reduction buckets of reduce_bucket_size elements during backward
                  (x2 with overlap_comm, which the generated config sets on several ranks or with the
                  optimizer offloaded), and on several ranks each flush's flat copy and its fp32 cast.
    zero3         also weights partitioned (/N); the gradient partition buffer (w T/N) and the bucket
                  (communication dtype) live from setup on; gathered parameters during forward /
                  backward: whole copies kept while reused soon, up to stage3_max_live_parameters
                  elements (on several ranks, or with offload_param; at one rank with the parameters
                  on the GPU nothing is copied: ~2 layers); the step works per sub-group of at most 1e9 elements
                  (flattened gradients + their fp32 copy). DeepSpeed keeps an fp32 master partition
                  (4T/N) in every precision.
    fsdp          FSDP2 keeps fp32 sharded parameters, grads and Adam: (4 + 4 + 8) / N, plus in forward /
                  backward the unsharded (bf16 under precision bf16, else fp32) parameters of the layers in
                  flight: 2 layers + the root (final norm; tied embeddings and head; an untied head or
                  input embedding is a group of its own) with sharding full; all layers with grad_op. As
                  backward ends: the grads + the fp32 reduce-scatter input of the last group (the embedding).
    setup         zero3 moves the whole model to each GPU before DeepSpeed partitions it: a peak of
                  its own, on any number of GPUs (fsdp places and shards one layer at a time).
    offload       zero *_offload_opt: master + Adam + fp32 grads live on the CPU (zero1/2: two
                  buckets, overlap_comm being on, and a buffer the size of the largest parameter);
                  zero3 offload_param: weights too; fsdp cpu_offload: sharded params, grads, Adam.
    LoRA          the frozen base weights are stored like weights above (partitioned by zero3 /
                  fsdp), but have no grads, master or Adam state; T = r x (in + out) per adapted
                  linear (q, k, v, o, gate, up, down by default).
    QLoRA         LoRA on a base whose decoder-layer linears are NF4 with double quantization
                  (NF4_BYTES = 0.516 bytes per weight; embeddings, norms and head in the weight dtype),
                  plus one weight dequantized to bf16 per GEMM (two at a time) as a transient.
Optimizer step: no temporaries on a GPU: bf16 single / ddp run the fused master AdamW
(fused_master_adamw), which reads the bf16 grads in place; the other backends torch's fused AdamW
(the Trainer's optimizer) or DeepSpeed's step (its flattened / fp32 gradient copies are counted above).

Activations (bytes per token per decoder layer, checked by tests/test_planner.py against the tensors
autograd actually saves, and against peaks measured on an H200: benchmarks/RESULTS.md).
With unsloth_dist's kernels (`kernels=True`, the default: FastLanguageModel / patch_model):
    fp32        24h + 12I + 8kv + 4nh + 8
    bf16        12h +  6I + 4kv + 4nh + 8
    bf16-mixed  22h +  6I + 4kv + 4nh + 8   + autocast's bf16 copies of the layers' matmul weights
    + 2r (4r under fp32) per LoRA adapter; outside the layers the final norm's input, the loss's input
    gradient (computed in the forward), RoPE's cos / sin and the ids, and for a trained head its
    gradient (vocab x hidden, written by the fused cross-entropy in the forward). No logits.
As transformers builds the model (`kernels=False`; SDPA):
    fp32        32h + 16I + 8kv + 4(nh + 2)
    bf16        20h +  8I + 4kv + 4(nh + 2)     (RMSNorm computes in fp32)
    bf16-mixed  30h +  8I + 4kv + 4(nh + 2)     + the bf16 copies autocast makes of every matmul
                                                 weight (2 B/param), held until backward
    outside the layers: 12.5h (fp32) / 8.25h (bf16) / 10.5h (bf16-mixed) + 4V (fp32 log-softmax of
    the loss) + 20 per token.
fp32 with grouped-query attention runs torch's math attention on a GPU (no fused kernel takes it):
+ 4 x heads x seq + 12h per token per layer (the probabilities). Gradient checkpointing keeps only
each layer's input (4h, or 2h under bf16) and recomputes one layer at a time during backward; with
only the first K layers checkpointed (gradient_checkpointing_layers) the other L - K keep their full
activations; with activation offload the checkpointed inputs live in CPU memory, one at a time back
on the GPU (the next layer's, fetched ahead of its recompute).
Transients (`backward_transient`): unpatched, two fp32 [tokens, V] buffers of the loss; with the
kernels the first layer's gradient temporaries, or under bf16-mixed the loss's bf16 cast of the head.
Peak = max(static + backward, static + step, setup): static = weights + master + Adam (+ grads where
they live from setup on: ddp buckets, the zero3 partition buffer); backward = activations + transient
(+ zero1/2's gradient partition and buckets, zero3's gathered layers, fsdp's unsharded layers); step =
grads + the step's copies. `Estimate.phase` names the winner; its columns are what is alive then.
`allocated` is what torch.cuda.max_memory_allocated would report; `reserved` adds the allocator's
fragmentation (10%) and the CUDA context (0.75 GiB), and is what has to fit in the GPU.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, ZeroConfig

GiB = 2**30
# bitsandbytes NF4 with double quantization (QLoRA): 4 bits per weight, an 8-bit absmax per block of
# 64, an fp32 absmax per 256 of those
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CUDA_CONTEXT = 0.75 * GiB
FRAGMENTATION = 0.10
PRECISIONS = ("bf16", "bf16-mixed", "fp32")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q": (h, self.q_dim), "k": (h, self.kv_dim), "v": (h, self.kv_dim), "o": (self.q_dim, h),
                "gate": (h, i), "up": (h, i), "down": (i, h)}

    @property
    def layer_matmul_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.layer_matmul_params + bias + 2 * self.hidden  # + two RMSNorm weights

    @property
    def root_params(self) -> int:
        """Embeddings, final norm and (untied) head: the parameters outside the decoder layers."""
        emb = self.vocab * self.hidden
        return emb + self.hidden + (0 if self.tie_embeddings else emb)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def _shape(name, V, h, I, L, nh, nkv, tie=False, bias=False, head_dim=None) -> ModelShape:
    return ModelShape(name, V, h, I, L, nh, nkv, head_dim or h // nh, tie, bias)


# real shapes from the models' config.json files
PRESETS: dict[str, ModelShape] = {
    "llama-3.2-1b": _shape("llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, tie=True, head_dim=64),
    "llama-3.2-3b": _shape("llama-3.2-3b", 128256, 3072, 8192, 28, 24, 8, tie=True, head_dim=128),
    "llama-3.1-8b": _shape("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8),
    "qwen2.5-7b": _shape("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, bias=True),
    "mistral-7b": _shape("mistral-7b", 32768, 4096, 14336, 32, 32, 8),  # v0.3 vocabulary
}


def shape_from_hf_config(data: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a Hugging Face config.json dict (Llama / Qwen2 / Qwen3 / Mistral layout)."""
    moe = [k for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size") if data.get(k)]
    if moe:
        raise ConfigError(f"model config {name!r} is a mixture of experts ({moe[0]}: {data[moe[0]]}); the planner "
                          "models dense Llama / Qwen / Mistral layers only and would size it as one expert")
    if data.get("quantization_config"):
        raise ConfigError(f"model config {name!r} is a pre-quantized checkpoint (quantization_config); the planner "
                          "sizes bf16 weights only: give the unquantized model's config.json")
    try:
        h = int(data["hidden_size"])
        nh = int(data["num_attention_heads"])
        shape = ModelShape(
            name=name,
            vocab=int(data["vocab_size"]),
            hidden=h,
            intermediate=int(data["intermediate_size"]),
            layers=int(data["num_hidden_layers"]),
            heads=nh,
            kv_heads=int(data.get("num_key_value_heads") or nh),
            head_dim=int(data.get("head_dim") or h // nh),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            qkv_bias=bool(data.get("attention_bias", False)) or data.get("model_type") == "qwen2",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model config {name!r} lacks a field the planner needs ({exc}); give a Llama / Qwen / Mistral config.json") from None
    return shape


def resolve_model(spec: str) -> ModelShape:
    """A preset name, a config.json path, or a model directory holding config.json."""
    key = spec.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model directory"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {exc}") from None
    return shape_from_hf_config(data, name=spec)


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BackendVariant:
    name: str  # display name
    backend: str  # single | ddp | fsdp | zero1 | zero2 | zero3
    sharding: str = "full"  # fsdp
    offload_optimizer: bool = False
    offload_param: bool = False


VARIANTS: tuple[BackendVariant, ...] = (
    BackendVariant("single", "single"),
    BackendVariant("ddp", "ddp"),
    BackendVariant("zero1", "zero1"),
    BackendVariant("zero2", "zero2"),
    BackendVariant("zero2+offload_opt", "zero2", offload_optimizer=True),
    BackendVariant("fsdp(grad_op)", "fsdp", sharding="grad_op"),
    BackendVariant("fsdp", "fsdp"),
    BackendVariant("zero3", "zero3"),
    BackendVariant("zero3+offload_opt", "zero3", offload_optimizer=True),
    BackendVariant("zero3+offload_all", "zero3", offload_optimizer=True, offload_param=True),
    BackendVariant("fsdp+cpu_offload", "fsdp", offload_optimizer=True, offload_param=True),
)
# cheapest communication first, every CPU-offloading variant after every one that keeps the states
# on the GPU (offload costs the most time): the recommendation is the first variant that fits
PREFERENCE = [v.name for v in VARIANTS if not (v.offload_optimizer or v.offload_param)] + [
    v.name for v in VARIANTS if v.offload_optimizer or v.offload_param]


@dataclass
class Estimate:
    backend: str
    precision: str
    gpus: int
    micro_batch: int
    seq: int
    lora: bool
    gradient_checkpointing: bool
    weights: float
    grads: float
    optimizer: float  # Adam state + fp32 master
    activations: float
    transient: float  # the rest of the peak: loss / gradient temporaries, buckets, gathered layers, step copies
    allocated: float  # peak, like torch.cuda.max_memory_allocated
    reserved: float  # + fragmentation + CUDA context: what must fit
    parts: dict[str, float] = field(default_factory=dict)
    checkpoint_layers: Optional[int] = None  # with gradient checkpointing: the first K layers (None: all)
    activation_offload: bool = False  # with gradient checkpointing: the layer inputs in CPU memory
    host_offload: float = 0.0  # pinned host memory the offloaded inputs take per rank (offload_host_bytes)
    kernels: bool = True  # the model runs unsloth_dist's kernels (fused cross-entropy: no logits)
    qlora: bool = False  # the decoder layers' linears in 4-bit NF4 (LoRA on top)
    phase: str = "backward"  # where the peak is: backward (activations alive), step (optimizer) or setup

    def gib(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("weights", "grads", "optimizer", "activations", "transient", "allocated", "reserved", "host_offload"):
            d[k] = round(d[k] / GiB, 3)
        d["parts"] = {k: round(v / GiB, 3) for k, v in self.parts.items()}
        return d


def activation_bytes(m: ModelShape, precision: str, tokens: int, checkpointing: bool,
                     checkpoint_layers: Optional[int] = None, offload: bool = False, *,
                     kernels: bool = True, lora_r: int = 0) -> tuple[float, float]:
    """(saved activations, autocast weight copies) in bytes for `tokens` tokens on one GPU.
    `checkpoint_layers`: with checkpointing, how many layers (the first ones) are checkpointed
    (None: all); `offload`: their inputs are kept in CPU memory (activation_offload). `kernels`: the
    model runs unsloth_dist's kernels (patch_model / FastLanguageModel: fused cross-entropy, no logits);
    false: as transformers built it. `lora_r`: with kernels, each adapter keeps its [tokens, r] product.
    Not included: the gradient of a trained head, which the fused cross-entropy writes in the forward
    (see `estimate`)."""
    h, I, kv, nh, V = m.hidden, m.intermediate, m.kv_dim, m.heads, m.vocab
    if kernels:
        cw = 4 if precision == "fp32" else 2  # the dtype the linears compute in
        # per layer: gate + up (GLU), its output (down's input), the linears' inputs, q / k / v, the
        # attention's logsumexp (fp32) and the norms' inputs and rstd; bf16-mixed: the linears' bf16
        # input copies (one per q / k / v / gate / up call) beside the fp32 residual stream
        per_layer = {"fp32": 24 * h + 12 * I + 8 * kv, "bf16": 12 * h + 6 * I + 4 * kv,
                     "bf16-mixed": 22 * h + 6 * I + 4 * kv}[precision] + 4 * nh + 8
        per_layer += cw * lora_r * len(LORA_TARGETS)
        resid_w = 2 if precision == "bf16" else 4
        # the final norm's input, the loss's input gradient (computed in the forward), RoPE's
        # cos / sin (per position: at most one row per token), the token ids
        outside = resid_w * h + cw * h + 2 * m.head_dim * (4 if precision != "bf16" else 2) + 12
    else:
        per_layer = {"fp32": 32 * h + 16 * I + 8 * kv, "bf16": 20 * h + 8 * I + 4 * kv,
                     "bf16-mixed": 30 * h + 8 * I + 4 * kv}[precision] + 4 * (nh + 2)
        outside = {"fp32": 12.5 * h, "bf16": 8.25 * h, "bf16-mixed": 10.5 * h}[precision] + 4 * V + 20
    resid = 2 * h if precision == "bf16" else 4 * h
    k = (m.layers if checkpoint_layers is None else min(checkpoint_layers, m.layers)) if checkpointing else 0
    kept = m.layers - k + (1 if k else 0)  # un-checkpointed layers, + the one being recomputed
    held = min(k, 1) if offload else k  # offloaded: only the input fetched ahead of its recompute
    acts = tokens * (held * resid + kept * per_layer + outside)
    # autocast's bf16 copies of the matmul weights, held until backward (unpatched: the head's too;
    # the fused cross-entropy's cast of the head is not kept)
    head_copy = 0 if kernels else m.vocab * m.hidden
    copies = 2.0 * (kept * m.layer_matmul_params + head_copy) if precision == "bf16-mixed" else 0.0
    return float(acts), copies


def math_attention(m: ModelShape, precision: str) -> bool:
    """fp32 with grouped-query attention on a GPU: no fused SDPA kernel takes it (flash attention has no
    fp32, the memory-efficient one no GQA), so torch runs the math path, which keeps each layer's
    [heads, seq, seq] fp32 probabilities (measured: 1.12 GiB per 1B-shape layer at 2 x 2048 tokens)."""
    return precision == "fp32" and m.kv_heads < m.heads


def attention_matrix_bytes(m: ModelShape, precision: str, tokens: int, seq: int) -> float:
    """Per layer, what the math path of `math_attention` keeps beyond the fused kernels: the
    probabilities (4 x heads x seq per token), the scaled query and the key / value expanded to every
    head (12 h per token); 0 where a fused kernel runs."""
    if not math_attention(m, precision):
        return 0.0
    return float(tokens * (4 * m.heads * min(seq, tokens) + 12 * m.hidden))


def backward_transient(m: ModelShape, precision: str, tokens: int, kernels: bool = True, seq: Optional[int] = None) -> float:
    """Bytes alive beside the saved activations at the peak of the loss / the start of backward.
    Unpatched: the loss's two fp32 [tokens, vocab] buffers (log-softmax and its gradient). With the
    kernels the logits never exist (the fused cross-entropy works in chunks about the size of the
    hidden states); the largest is then the first layer's gradient temporaries (the GLU's gate / up
    gradients, an input gradient) or, under bf16-mixed, the cross-entropy's bf16 cast of the head
    while the loss runs. The math attention path adds three [heads, seq, seq] fp32 gradients."""
    seq = seq or tokens
    attn = 3.0 * 4 * m.heads * min(seq, tokens) * tokens if math_attention(m, precision) else 0.0
    if not kernels:
        return max(8.0 * tokens * m.vocab, attn)
    cw = 4 if precision == "fp32" else 2
    first_layer = tokens * cw * (2 * m.intermediate + 2 * m.hidden)
    loss = tokens * m.hidden * cw + (2 * m.vocab * m.hidden + 2 * tokens * m.hidden if precision == "bf16-mixed" else 0)
    return float(max(first_layer, loss, attn))


def offload_host_bytes(m: ModelShape, precision: str, tokens: int, checkpoint_layers: Optional[int] = None) -> float:
    """Pinned host memory activation offload holds per rank: one buffer per checkpointed layer, its
    input's bytes rounded up to a power of two (models/offload.HostPool; `tokens` the longest micro-batch:
    shorter ones reuse these buffers)."""
    k = m.layers if checkpoint_layers is None else min(checkpoint_layers, m.layers)
    per_input = tokens * (2 * m.hidden if precision == "bf16" else 4 * m.hidden)
    return float(k * (1 << (int(per_input) - 1).bit_length())) if k and per_input else 0.0


def estimate(
    m: ModelShape,
    variant: BackendVariant,
    precision: str = "bf16",
    *,
    gpus: int = 1,
    micro_batch: int = 1,
    seq: int = 2048,
    lora: bool = False,
    lora_r: int = 16,
    gradient_checkpointing: bool = False,
    checkpoint_layers: Optional[int] = None,
    activation_offload: bool = False,
    zero: Optional[ZeroConfig] = None,
    kernels: bool = True,
    qlora: bool = False,
) -> Estimate:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: the planner knows {', '.join(PRECISIONS)}")
    _check_checkpoint_layers(m, gradient_checkpointing, checkpoint_layers)
    lora = lora or qlora
    N = 1 if variant.backend == "single" else gpus
    P = float(m.params)
    T = float(m.lora_params(lora_r)) if lora else P
    if lora:
        P += T
    # QLoRA: the decoder layers' linears are NF4 (embeddings, norms and head stay in the weight dtype)
    Q = float(m.layers * m.layer_matmul_params) if qlora else 0.0

    def stored(wb: float, n: float, quantized: float = Q) -> float:
        """Bytes of `n` parameters at `wb` bytes each, of which `quantized` are NF4."""
        return wb * n - (wb - NF4_BYTES) * quantized
    zero = zero or ZeroConfig(name=variant.backend if variant.backend.startswith("zero") else "zero2")
    bf16 = precision == "bf16"
    parts: dict[str, float] = {}
    step_tmp = 0.0
    static_grads = False  # allocated for the whole run (DDP's buckets, ZeRO-3's partition buffer)
    grads_in_backward = False  # allocated whole as backward starts (ZeRO-1/2's partition)
    head_gathered = 0.0  # fsdp: an untied head in its own group, whole only around the loss
    backward_only = 0.0  # buffers alive in forward / backward only (ZeRO buckets, gathered layers)
    # the fused cross-entropy writes a trained head's gradient during the forward (kernels only)
    head_grad = (4 if precision == "fp32" else 2) * m.vocab * m.hidden if kernels and not lora else 0.0

    if variant.backend in ("single", "ddp"):
        w = 2 if bf16 else 4
        parts["weights"] = stored(w, P)
        parts["grads"] = w * T
        parts["master"] = 4 * T if bf16 else 0.0
        parts["adam"] = 8 * T
        # no step temporaries: bf16 runs the fused master AdamW (fused_master_adamw, on by default on a
        # GPU), which reads the bf16 gradients in place; the others torch's fused AdamW (Trainer)
        static_grads = variant.backend == "ddp"
    elif variant.backend == "fsdp":
        on_gpu = 0.0 if variant.offload_param else 1.0
        # trainable weights are fp32 shards; under bf16 a frozen base is kept in bf16 (backends/fsdp.py)
        parts["weights"] = on_gpu * (stored(2 if bf16 else 4, P - T) + 4 * T) / N
        parts["grads"] = on_gpu * 4 * T / N
        parts["master"] = 0.0
        parts["adam"] = on_gpu * 8 * T / N
        pb = 2 if bf16 else 4
        layer = m.layer_params + (m.lora_params(lora_r) / m.layers if lora else 0)
        if variant.sharding == "grad_op":
            unsharded = stored(pb, m.layers * layer) + pb * m.root_params
        else:
            # an untied input embedding and an untied head are groups of their own, each freed after
            # its forward (backends/fsdp.py): the root kept whole through the step is the final norm
            # (and, tied, the shared embedding / head)
            own_groups = 0 if m.tie_embeddings else 2 * m.vocab * m.hidden
            unsharded = 2 * stored(pb, layer, Q / m.layers) + pb * (m.root_params - own_groups)
            # ... but the untied head is gathered while the loss runs (its forward), the peak counted
            # below; a trained one also gets its gradient there (the fused CE writes it in the forward)
            if not m.tie_embeddings:
                head_gathered = pb * m.vocab * m.hidden * (1 if lora else 2)
                if not lora:  # its gradient's reduce-scatter: an fp32 input, and the fp32 shard it leaves
                    head_gathered += 4 * m.vocab * m.hidden * (1 + 1 / N)
                head_grad = 0.0
        unsharded += 4 * 2 * (layer if not lora else m.lora_params(lora_r) / m.layers)  # unsharded grads in flight
        # FSDP2 reshards every group after backward (the root too): gathered copies are not alive in the
        # step (torch's fused AdamW on the shards: no step temporaries either)
        parts["unsharded"] = unsharded
        backward_only = unsharded
        # as backward ends the sharded gradients are all there, beside the fp32 reduce-scatter input of
        # the last group reduced: the embedding (tied: the root; untied: its own group) when trained
        # (measured at one rank: 4.6 + 0.98 GiB on the 1B shape, 11.97 + 1.47 on the 3B)
        step_tmp = on_gpu * 4 * (max(m.vocab * m.hidden, layer) if not lora else m.lora_params(lora_r) / m.layers)
    else:  # zero1/2/3
        stage = int(variant.backend[-1])
        w = 2 if bf16 else 4
        off_opt = variant.offload_optimizer
        parts["weights"] = stored(w, P) / (N if stage == 3 and not variant.offload_param else 1) * (0 if variant.offload_param else 1)
        parts["master"] = 0.0 if off_opt else 4 * T / N
        parts["adam"] = 0.0 if off_opt else 8 * T / N
        # an unset bucket size is lowered to the trainable elements when fewer (backends/deepspeed.py)
        bucket = zero.reduce_bucket_size if "reduce_bucket_size" in zero.model_fields_set else min(zero.reduce_bucket_size, T)
        # ZeRO-3 allocates its bucket in the communication dtype: fp32 on several ranks under the
        # default reduce_dtype, the gradients' dtype on one (deepspeed_config.py)
        comm = 4 if (not bf16 or (N > 1 and zero.reduce_dtype == "fp32")) else 2
        if stage == 3:
            # the gradient partition buffer (gradient dtype) lives from setup on, on the GPU unless the
            # optimizer is offloaded (then pinned host memory); the bucket too
            parts["grads"] = 0.0 if off_opt else w * T / N
            parts["buckets"] = bucket * comm
            static_grads = True
            layer = m.layer_params
            if N > 1 or variant.offload_param:
                # gathered parameters are whole copies, kept while they will be used again soon
                # (stage3_max_reuse_distance): up to stage3_max_live_parameters elements at the turn
                # from forward to backward (measured with offload_param at one rank: 1.87 GiB = 1e9 bf16)
                parts["gathered"] = min(zero.stage3_max_live_parameters, P) / P * stored(w, P)
            else:
                # one rank, parameters on the GPU: the partition is the parameter, nothing is copied;
                # the layers in flight, and unpatched the head (gathered again for the logits'
                # backward; the fused cross-entropy computes its gradients in the forward)
                parts["gathered"] = 2 * stored(w, layer, Q / m.layers) + (0 if kernels else w * max(m.vocab * m.hidden, layer))
            backward_only = parts["gathered"]
            if N > 1:  # reduce_scatter_coalesced concatenates the bucket into one comm-dtype tensor
                backward_only += bucket * comm
            # the step, per sub-group of at most sub_group_size (DeepSpeed's 1e9) elements: the
            # flattened gradients and (bf16) their fp32 copy
            sub = min(1e9, T / N)
            step_tmp = 0.0 if off_opt else sub * (w + (4 if bf16 else 0))
        else:
            # the gradient partition (stage 1: every gradient) is allocated as backward starts and
            # kept through the step; the step flattens it and (bf16) copies that to fp32
            # (offloaded optimizer: the partition lives in pinned host memory; measured on the GPU
            # instead, at one rank, a buffer the size of the largest parameter in the gradient dtype)
            largest = (lora_r * max(m.intermediate, m.q_dim, m.hidden) if lora
                       else max(m.vocab * m.hidden, m.intermediate * m.hidden))  # the largest trainable parameter
            parts["grads"] = w * (largest if off_opt else T / (N if stage == 2 else 1))
            grads_in_backward = True
            rb = bucket * (4 if stage == 1 else w)
            # overlap_comm (two buckets) is set on several ranks or with the optimizer offloaded (deepspeed_config.py)
            parts["buckets"] = rb * (2 if zero.overlap_comm and (N > 1 or off_opt) else 1)
            backward_only = parts["buckets"]
            if N > 1:  # each flush flattens the bucket and casts it to the communication dtype (fp32 by default)
                backward_only += bucket * (w + (4 if (not bf16 or zero.reduce_dtype == "fp32") else 2))
            step_tmp = 0.0 if off_opt else w * T / N + (4 * T / N if bf16 else 0.0)

    tokens = micro_batch * seq
    acts, copies = activation_bytes(m, precision, tokens, gradient_checkpointing, checkpoint_layers,
                                    activation_offload and gradient_checkpointing, kernels=kernels,
                                    lora_r=lora_r if lora else 0)
    k = (m.layers if checkpoint_layers is None else min(checkpoint_layers, m.layers)) if gradient_checkpointing else 0
    acts += head_grad + (m.layers - k + (1 if k else 0)) * attention_matrix_bytes(m, precision, tokens, seq)
    if qlora:  # the 4-bit weights are dequantized per call, never cached by autocast
        copies = max(0.0, copies - 2.0 * (m.layers - k + (1 if k else 0)) * m.layer_matmul_params)
    parts["activations"] = acts
    parts["autocast_copies"] = copies
    host = (offload_host_bytes(m, precision, tokens, checkpoint_layers)
            if activation_offload and gradient_checkpointing else 0.0)
    loss_tmp = backward_transient(m, precision, tokens, kernels, seq)
    if qlora:  # a 4-bit weight dequantized to bf16 for its GEMM, forward and backward (two at a time)
        loss_tmp += 2 * 2 * m.intermediate * m.hidden
    extra = parts.get("buckets", 0.0) if static_grads else 0.0
    static = parts["weights"] + parts["master"] + parts["adam"] + extra + (parts["grads"] if static_grads else 0.0)
    if head_gathered:
        parts["head_gathered"] = head_gathered
    # an untied fsdp head is whole while the loss runs, then freed (the fused cross-entropy does not
    # need it in backward): it meets the loss's transient, not the first layer's gradient temporaries
    grads_b = parts["grads"] if grads_in_backward else 0.0
    backward = acts + copies + max(loss_tmp, head_gathered) + backward_only + grads_b
    step = (0.0 if static_grads else parts["grads"]) + step_tmp
    # setup: zero3 moves the whole model to the GPU before DeepSpeed partitions it (backends/deepspeed.py),
    # whatever the GPU count (fsdp places and shards one decoder layer at a time: no such peak)
    setup = stored(2 if bf16 else 4, P) if variant.backend == "zero3" else 0.0
    parts["setup"] = setup
    phases = {"backward": static + backward, "step": static + step, "setup": setup}
    phase = max(phases, key=phases.get)
    allocated = phases[phase]
    reserved = allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT
    # the columns: what is alive at the peak (they add up to `allocated`)
    if phase == "setup":
        col_w, col_g, col_o, col_a = setup, 0.0, 0.0, 0.0
    else:
        col_w, col_o = parts["weights"], parts["master"] + parts["adam"]
        col_g = parts["grads"] if (static_grads or phase == "step" or grads_in_backward) else 0.0
        col_a = acts + copies if phase == "backward" else 0.0
    return Estimate(
        backend=variant.name, precision=precision, gpus=N, micro_batch=micro_batch, seq=seq, lora=lora, qlora=qlora,
        gradient_checkpointing=gradient_checkpointing, weights=col_w, grads=col_g, optimizer=col_o, activations=col_a,
        transient=max(0.0, allocated - col_w - col_g - col_o - col_a), phase=phase,
        allocated=allocated, reserved=reserved, parts=parts,
        checkpoint_layers=checkpoint_layers if gradient_checkpointing else None,
        activation_offload=activation_offload and gradient_checkpointing, host_offload=host, kernels=kernels,
    )


def estimate_model(model: Any, backend: Any, precision: str, *, gpus: int, micro_batch: int, seq: int,
                   gradient_checkpointing: bool = False, checkpoint_layers: Optional[int] = None,
                   activation_offload: bool = False, gpus_per_node: Optional[int] = None) -> Optional[Estimate]:
    """The estimate for a model object about to be trained: its shape from its config, LoRA / QLoRA and
    the kernels from what is on it, the variant from `backend` (a resolved backend config: name,
    sharding / cpu_offload, offload_optimizer / offload_param). None where the planner cannot size
    it (not a dense Llama / Qwen / Mistral-style config)."""
    from ..models.patching import _causal_lm  # (torch / transformers: only where a model is at hand)

    causal = _causal_lm(model)  # inside peft's wrappers
    config = getattr(causal, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    try:
        shape = shape_from_hf_config(data, getattr(config, "_name_or_path", "") or type(causal).__name__)
    except ConfigError:
        return None
    qlora = any(type(mod).__name__ == "Linear4bit" for mod in causal.modules())
    peft_cfg = getattr(model, "peft_config", None)
    lora_r = 0
    if isinstance(peft_cfg, dict) and peft_cfg:
        active = getattr(model, "active_adapter", None)
        first = peft_cfg.get(active) if isinstance(active, str) else None
        lora_r = int(getattr(first or next(iter(peft_cfg.values())), "r", 0) or 0)
    name = getattr(backend, "name", backend)
    if name == "fsdp":
        cpu = bool(getattr(backend, "cpu_offload", False))
        sharding = getattr(backend, "sharding", "full")
        grad_op = sharding in ("grad_op", "none")
        variant = BackendVariant(name, "fsdp", "grad_op" if grad_op else "full", cpu, cpu)
        if sharding == "none":  # replicated on every GPU: sized as one
            gpus = 1
        elif sharding == "hybrid":  # sharded within a node, replicated across nodes
            gpus = min(gpus, gpus_per_node or gpus)
    elif str(name).startswith("zero"):
        variant = BackendVariant(name, name, offload_optimizer=getattr(backend, "offload_optimizer", "none") == "cpu",
                                 offload_param=getattr(backend, "offload_param", "none") == "cpu")
    elif name in ("single", "ddp"):
        variant = BackendVariant(name, name)
    else:
        return None
    if precision not in PRECISIONS:  # fp16-mixed: DeepSpeed's half weights under ZeRO, else autocast's sizes
        precision = "bf16" if str(name).startswith("zero") else "bf16-mixed"
    return estimate(shape, variant, precision, gpus=gpus, micro_batch=micro_batch, seq=max(int(seq), 1),
                    lora=lora_r > 0 or qlora, lora_r=lora_r or 16, qlora=qlora,
                    gradient_checkpointing=gradient_checkpointing, checkpoint_layers=checkpoint_layers,
                    activation_offload=activation_offload, kernels=bool(getattr(model, "unsloth_fused_loss", False)),
                    zero=backend if str(name).startswith("zero") else None)


def _check_checkpoint_layers(m: ModelShape, checkpointing: bool, k: Optional[int]) -> None:
    if k is None:
        return
    if not checkpointing:
        raise ConfigError("--checkpoint-layers needs --gradient-checkpointing (it says how many layers are checkpointed)")
    if not 0 <= k <= m.layers:
        raise ConfigError(f"--checkpoint-layers {k}: {m.name} has {m.layers} decoder layers; use 0..{m.layers}")


def max_micro_batch(m: ModelShape, variant: BackendVariant, precision: str, gpu_memory_gib: float,
                    limit: int = 256, **kw: Any) -> int:
    """The largest micro-batch (1..limit) whose estimate fits in `gpu_memory_gib`; 0 if none."""
    best = 0
    lo, hi = 1, limit
    while lo <= hi:  # reserved memory grows with the micro-batch
        mid = (lo + hi) // 2
        if estimate(m, variant, precision, micro_batch=mid, **kw).reserved <= gpu_memory_gib * GiB:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


@dataclass
class Plan:
    model: ModelShape
    gpus: int
    gpu_memory_gib: float
    rows: list[Estimate]
    max_micro: dict[tuple[str, str], int]
    recommended: Optional[Estimate]
    reason: str


def plan(m: ModelShape, gpus: int, gpu_memory_gib: float = 80.0, *, precisions: tuple[str, ...] = PRECISIONS,
         micro_batch: Optional[int] = None, seq: int = 2048, lora: bool = False, lora_r: int = 16,
         gradient_checkpointing: bool = False, checkpoint_layers: Optional[int] = None,
         activation_offload: bool = False, kernels: bool = True, qlora: bool = False) -> Plan:
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be at least 1")
    if gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory {gpu_memory_gib}: must be positive (GiB per GPU)")
    if seq < 1 or (micro_batch is not None and micro_batch < 1):
        raise ConfigError("--seq and --micro-batch must be at least 1")
    if gpus == 1:  # one GPU: plain, or DeepSpeed / FSDP only for their CPU offload
        variants = [v for v in VARIANTS if v.backend == "single" or v.offload_optimizer]
    else:
        variants = [v for v in VARIANTS if v.backend != "single"]
    _check_checkpoint_layers(m, gradient_checkpointing, checkpoint_layers)
    if activation_offload and not gradient_checkpointing:
        raise ConfigError("--activation-offload needs --gradient-checkpointing (it offloads the inputs checkpointing keeps)")
    kw = dict(gpus=gpus, seq=seq, lora=lora, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
              checkpoint_layers=checkpoint_layers, activation_offload=activation_offload, kernels=kernels, qlora=qlora)
    rows, fits = [], {}
    for p in precisions:
        for v in variants:
            mb = max_micro_batch(m, v, p, gpu_memory_gib, **kw)
            fits[(v.name, p)] = mb
            rows.append(estimate(m, v, p, micro_batch=micro_batch or 1, **kw))
    recommended, reason = None, ""
    want = micro_batch or 1
    for p in precisions:  # the first precision asked for wins, then the cheapest backend
        for name in PREFERENCE:
            if fits.get((name, p), 0) >= want:
                v = next(x for x in variants if x.name == name)
                mb = micro_batch or _pow2_floor(fits[(name, p)])
                recommended = estimate(m, v, p, micro_batch=mb, **kw)
                reason = (f"{name} is the cheapest backend (least communication) whose estimate fits "
                          f"{gpu_memory_gib:g} GiB at micro-batch {mb} with precision {p}")
                break
        if recommended is not None:
            break
    if recommended is None:
        tips = ([] if lora or qlora else ["--lora"]) + ([] if qlora else ["--qlora"]) + (
            ["--gradient-checkpointing"] if not gradient_checkpointing else
            ["--activation-offload"] if not activation_offload else []) + ["a shorter --seq", "more GPUs", "a bigger GPU"]
        reason = "nothing fits: try " + ", ".join(tips[:-1]) + " or " + tips[-1]
    return Plan(m, gpus, gpu_memory_gib, rows, fits, recommended, reason)


def _pow2_floor(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p
