#!/usr/bin/env bash
# GPU checks for one device session, run from the repository root on the device machine:
#   bash benchmarks/gpu_session.sh PART [PART ...]     PART = kernels | kbench | dequant | memory | models | examples | equivalence | qdiag | odiag | layer | train
# layer: env LAYER_ARGS (bench_layer.py arguments, e.g. "--variants ours,ours-compile --layers 8")
# train: env TRAIN_WORKLOAD (full-1b | lora-8b | qlora-8b | lora-qwen3-8b), TRAIN_GPUS (1), TRAIN_BACKENDS, TRAIN_IMPLS, TRAIN_STEPS, TRAIN_WARMUP, TRAIN_TAG,
#        TRAIN_TIMEOUT, TRAIN_PROFILE, TRAIN_PROFILE_STACK (with TRAIN_PROFILE: host time by Python call site), TRAIN_REDUCE (ours: backend.reduce_dtype),
#        TRAIN_SET (ours: space-separated backend fields, e.g. "forward_prefetch=1 backward_prefetch=2"),
#        TRAIN_FUSED_ADAMW=auto|on|off (ours, single / ddp: fused_master_adamw; default auto = on on a GPU), TRAIN_CKPT_LAYERS=K (ours: checkpoint the first K layers),
#        TRAIN_NO_FUSED_LORA=1 (ours: peft's LoRA forward instead of kernels.lora_delta),
#        TRAIN_NO_QLORA_LINEAR=1 (ours, qlora: bitsandbytes' Linear4bit forward instead of kernels.qlora_linear),
#        TRAIN_NO_STEP_BEFORE_READ=1 (ours, fsdp: optimizer step after the loss / norm read),
#        TRAIN_HEAD_IN_ROOT=1 (ours, fsdp: an untied head stays in the root group, as before NOTES 32),
#        TRAIN_OFFLOAD=1 (ours, checkpointed workloads: activation_offload), TRAIN_SEQ=N (sequence length; default the workload's),
#        TRAIN_PRECISION=bf16-mixed (ours under the baselines' autocast policy; default bf16),
#        TRAIN_SCALING=1 (with TRAIN_GPUS=N: each backend at one rank too, and the scaling efficiency table),
#        TRAIN_MEMPEAK=1 (what is alive at the peak of GPU memory, by call site: benchmarks/mem_peak.py)
# memory: env MEM_GPUS (2), MEM_CASES (bench_memory.py cases, e.g. "ddp:full ddp:full:plain zero3:lora:gc"), MEM_PARALLEL (cases at once),
#        MEM_PEAK=1 (what is alive at each case's peak), MEM_TIMEOUT (s, 420), MEM_TAIL (log lines shown, 12),
#        MEM_ARGS (more bench_memory.py arguments, e.g. "--model llama-3.2-3b --micro-batch 1"), MEM_TAG (names the JSON)
# kernels: env KERNELS_K (a pytest -k expression selecting tests of tests/test_gpu_kernels.py)
# Needs the wheels of .whl/ (pydantic, DeepSpeed sdist, bitsandbytes, liger-kernel, pytest-timeout, ...).
# Logs and JSON go to $OUT (the device tool brings that folder back).
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_CUDA_ARCH_LIST=9.0
export PYTHONPATH=/tmp/site
# a second invocation in the same command (other TRAIN_* settings) skips the installs
if [ ! -e /tmp/site/.gpu_session_installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site .whl/deepspeed-*.tar.gz > "$OUT/install_deepspeed.log" 2>&1 || echo "deepspeed install failed"
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . > "$OUT/install.log" 2>&1 || { echo "project install failed"; tail "$OUT/install.log"; exit 1; }
  touch /tmp/site/.gpu_session_installed
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"
# tests run from a copy: in the repository root `unsloth_dist` would shadow the installed package
rm -rf /tmp/t && mkdir -p /tmp/t && cp -r tests examples configs pyproject.toml /tmp/t/
step() {  # name timeout command...
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? ($(date +%T))"
  grep -v -i "warn" "$OUT/$name.log" | tail -n "${TAILN:-12}"
}
for part in "$@"; do
  case $part in
    kernels) (cd /tmp/t && step gpu_kernels 300 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_gpu_kernels.py ${KERNELS_K:+-k "$KERNELS_K"}) ;;
    kbench) TAILN=40 step bench_kernels 300 python3 benchmarks/bench_kernels.py --check --out "$OUT/bench_kernels.json" ;;
    memory) TAILN=${MEM_TAIL:-12} step bench_memory${MEM_TAG:+_$MEM_TAG} ${MEM_TIMEOUT:-420} python3 benchmarks/bench_memory.py --gpus ${MEM_GPUS:-2} ${MEM_CASES:+--cases $MEM_CASES} --parallel ${MEM_PARALLEL:-1} ${MEM_PEAK:+--memory-peak $OUT/mempeak_memory} ${MEM_ARGS:-} --out "$OUT/bench_memory${MEM_TAG:+_$MEM_TAG}.json" ;;
    models) (cd /tmp/t && TAILN=25 step gpu_models 420 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu_models.py) ;;
    examples) (cd /tmp/t && TAILN=15 step gpu_examples 420 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_examples.py) ;;
    equivalence) (cd /tmp/t && step gpu_equivalence 420 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu_equivalence.py) ;;
    layer) TAILN=20 step bench_layer 560 python3 benchmarks/bench_layer.py ${LAYER_ARGS:-} --out "$OUT/bench_layer.json" ;;
    dequant) TAILN=8 step bench_dequant 200 python3 benchmarks/bench_dequant.py --out "$OUT/bench_dequant.json" ;;
    qdiag) TAILN=12 step diag_qlora 300 python3 benchmarks/diag_qlora.py 4 ;;
    odiag) TAILN=12 step diag_offload 300 python3 benchmarks/diag_offload.py ${ODIAG_ARGS:-} ;;
    train) TAILN=30 step bench_train_${TRAIN_WORKLOAD:-full-1b}_${TRAIN_TAG:-run} ${TRAIN_TIMEOUT:-560} python3 benchmarks/bench_train.py --workload ${TRAIN_WORKLOAD:-full-1b} --gpus ${TRAIN_GPUS:-1} ${TRAIN_BACKENDS:+--backends $TRAIN_BACKENDS} ${TRAIN_IMPLS:+--impls $TRAIN_IMPLS} --steps ${TRAIN_STEPS:-12} --warmup ${TRAIN_WARMUP:-3} --out "$OUT/bench_train_${TRAIN_WORKLOAD:-full-1b}_${TRAIN_TAG:-run}.json" ${TRAIN_PROFILE:+--profile-dir $OUT/profile_${TRAIN_TAG:-run}} ${TRAIN_PROFILE_STACK:+--profile-stack} ${TRAIN_MEMPEAK:+--memory-peak $OUT/mempeak_${TRAIN_TAG:-run}} ${TRAIN_REDUCE:+--reduce-dtype $TRAIN_REDUCE} $(for kv in ${TRAIN_SET:-}; do printf -- "--backend-set %s " "$kv"; done) ${TRAIN_FUSED_ADAMW:+--fused-adamw $TRAIN_FUSED_ADAMW} ${TRAIN_CKPT_LAYERS:+--ckpt-layers $TRAIN_CKPT_LAYERS} ${TRAIN_NO_FUSED_LORA:+--no-fused-lora} ${TRAIN_NO_QLORA_LINEAR:+--no-qlora-linear} ${TRAIN_NO_STEP_BEFORE_READ:+--no-step-before-read} ${TRAIN_HEAD_IN_ROOT:+--fsdp-head-in-root} ${TRAIN_OFFLOAD:+--activation-offload} ${TRAIN_SEQ:+--seq $TRAIN_SEQ} ${TRAIN_PRECISION:+--precision $TRAIN_PRECISION} ${TRAIN_SCALING:+--scaling} ;;
    *) echo "unknown part $part" ;;
  esac
done
