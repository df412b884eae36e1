#!/usr/bin/env bash
# The accelerator check of the train step: Qwen2.5-0.5B's shape (random weights), 32 rows of
# 192 tokens, in bfloat16 (weights and compute), then with float32 weights and bfloat16 compute.
# MFU is over a bfloat16 8192^3 matmul measured in the same run, and also over the device's
# datasheet dense bfloat16 peak (`mfu_nominal`) when it is known: NOMINAL_TFLOPS, or 989 for an
# H100 SXM / H200 (NVIDIA's H100 / H200 datasheets, dense, without sparsity).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # JSON lines in OUT_DIR (default: $OUT or .)
#
# EXTRA_ARGS are appended to every benchmark command (the test suite passes a tiny shape);
# PYTHON is the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python}"

nominal="${NOMINAL_TFLOPS:-$("$py" -c '
import jax
kind = jax.devices()[0].device_kind
print("989" if "H200" in kind or "H100 80GB HBM3" in kind or "H100 SXM" in kind else "")
')}"
"$py" -c 'import jax; print("jax", jax.__version__, jax.devices())'
args=(--preset qwen2.5-0.5b --dtype bfloat16 --repeats 5)
if [ -n "$nominal" ]; then args+=(--nominal-peak-tflops "$nominal"); fi
read -r -a extra <<< "${EXTRA_ARGS:-}"

"$py" benchmarks/train_step.py "${args[@]}" ${extra[@]+"${extra[@]}"} \
  | tee "$out/train_step_qwen2.5-0.5b_bf16.jsonl"
"$py" benchmarks/train_step.py "${args[@]}" --param-dtype float32 --only policy,policy+ref \
  ${extra[@]+"${extra[@]}"} | tee "$out/train_step_qwen2.5-0.5b_bf16_f32_weights.jsonl"
