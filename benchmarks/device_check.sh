#!/usr/bin/env bash
# The accelerator check, one prepared script (made for one H200, 16 cores, no network; under
# 8 minutes there). JSON lines in OUT_DIR, one file per part, and OUT_DIR/summary.jsonl with
# each part's exit code and seconds:
#
#   bash benchmarks/device_check.sh OUT_DIR            # on the accelerator machine
#   DEVICE_CHECK_TINY=1 bash benchmarks/device_check.sh OUT_DIR   # tiny shapes, any CPU (the test)
#   bash benchmarks/device_check.sh --fetch-wheels     # here, with PyPI: wheels of what it lacks
#
# Parts (DEVICE_CHECK_PARTS, comma-separated, picks some; default all, in this order):
#   train_step  benchmarks/train_step.py: the GSM8K train step (512 rows x 768 tokens in
#               micro-batches of 64, beta > 0, full remat) on Qwen2.5-0.5B's shape, bfloat16
#               compute on float32 weights; MFU over the datasheet peak (989 TFLOP/s) and over a
#               bfloat16 8192^3 matmul measured in the same run.
#   sampler     benchmarks/sampler.py: the GSM8K rollout (64 prompts x 8 samples, 256 + 512
#               tokens: 512 rows x 768 cache slots) in bfloat16; tokens/s and the fraction of the
#               memory roofline (datasheet and measured bandwidth).
#   gsm8k       benchmarks/gsm8k_random_steps.py: 3 steps of configs/gsm8k_qwen2_5_0_5b.py on
#               random 0.5B-shaped weights, a tiny tokenizer and generated GSM8K files.
#   roofline    benchmarks/roofline.py compiled by the accelerator's own XLA (its bytes, not
#               the CPU's upper bound) for the 0.5B shape.
# Each part gets at most its own cap and what is left of DEVICE_CHECK_BUDGET_S (default 450 s);
# a failed or timed-out part is recorded and the next one runs; the exit code is 1 if any failed.
#
# The machine needs what setup.py's INSTALL_REQUIRES names; the H200 image lacks ml-collections,
# tensorflow-datasets (and some of its needs), array-record and tensorboardX. `--fetch-wheels`
# downloads them (Python 3.12 manylinux wheels, no dependencies; promise is built from its
# pure-Python sdist) into .whl/ (git-ignored), to copy to the machine with the checkout; this script installs
# them into /tmp/grpo_site when an import fails. The package itself is used from the checkout
# (PYTHONPATH), never installed. WHEEL_DIR: where the wheels are (default .whl). PYTHON is the interpreter (default: python3, else python).
set -uo pipefail
cd "$(dirname "$0")/.."

# Versions that this project's CPU environment runs with (pip show there).
WHEELS=(ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6 tensorboardX==2.6.5
        dm-tree==0.1.10 immutabledict==4.3.1 promise==2.3 simple-parsing==0.1.9 docstring-parser==0.18.0
        tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2)
py="${PYTHON:-$(command -v python3 || command -v python)}"

wheels="${WHEEL_DIR:-.whl}"
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$wheels"
  for wheel in "${WHEELS[@]}"; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$wheels" "$wheel" \
      || "$py" -m pip wheel -q --no-deps -w "$wheels" "$wheel" `# a pure-Python sdist (promise)` \
      || { echo "could not fetch $wheel" >&2; exit 1; }
  done
  du -sh "$wheels"
  exit 0
fi

out="${1:?usage: device_check.sh OUT_DIR | --fetch-wheels}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
tiny="${DEVICE_CHECK_TINY:-0}"
parts="${DEVICE_CHECK_PARTS:-train_step,sampler,gsm8k,roofline}"
budget="${DEVICE_CHECK_BUDGET_S:-$([ "$tiny" = "1" ] && echo 1800 || echo 450)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

needs='import grpo_jax.trainer, grpo_jax.envs.gsm8k, tensorboardX'
if ! "$py" -c "$needs" 2>/dev/null; then
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/grpo_site "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/grpo_site"
  fi
  "$py" -c "$needs" || echo "missing packages: the gsm8k part will fail (see --fetch-wheels)" >&2
fi

"$py" -c 'import json, jax; d = jax.devices()[0]
print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "device": d.device_kind,
                  "num_devices": jax.device_count()}))' | tee "$out/env.json"
nominal="$("$py" -c 'import jax; k = jax.devices()[0].device_kind
print("989" if "H200" in k or "H100 80GB HBM3" in k or "H100 SXM" in k else "")')"

: > "$out/summary.jsonl"
failed=0
# run_part NAME CAP_S COMMAND...: stdout to OUT/NAME.jsonl, stderr to OUT/NAME.log.
run_part() {
  local name="$1" cap="$2"; shift 2
  [ "$tiny" = "1" ] && cap=$(( cap * 4 ))  # a loaded CPU: the caps are for the accelerator
  case ",$parts," in *",$name,"*) ;; *) return 0 ;; esac
  local left=$(( budget - SECONDS ))
  local limit=$(( cap < left ? cap : left ))
  local rc=124 start=$SECONDS
  if [ "$limit" -gt 0 ]; then
    echo "== $name (at most ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.jsonl" 2> "$out/$name.log"
    rc=$?
    tail -n 3 "$out/$name.log" >&2
    cat "$out/$name.jsonl"
  fi
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( SECONDS - start )), \"limit_s\": $limit}" \
    | tee -a "$out/summary.jsonl"
  [ "$rc" -eq 0 ] || failed=1
}

if [ "$tiny" = "1" ]; then
  train_args=(--quick --vocab-size 512 --rows 4 --length 16 --prompt 8 --micro-batch-size 2 --repeats 1
              --peak-size 256)
  sampler_args=(--quick --vocab-size 512 --prompts 2 --samples 2 --prompt-len 16 --new-tokens 8 --repeats 1)
  gsm8k_args=(--tiny --steps 3)
  roofline_args=(--quick)
else
  train_args=(--rows 512 --length 768 --prompt 256 --micro-batch-size 64 --repeats 3)
  sampler_args=(--prompts 64 --samples 8 --prompt-len 256 --new-tokens 512 --repeats 3)
  gsm8k_args=(--steps 3)
  roofline_args=()
fi
if [ -n "$nominal" ]; then train_args+=(--nominal-peak-tflops "$nominal"); fi

run_part train_step 180 "$py" benchmarks/train_step.py --preset qwen2.5-0.5b --dtype bfloat16 \
  --param-dtype float32 --remat full --only policy+ref "${train_args[@]}"
run_part sampler 120 "$py" benchmarks/sampler.py --preset qwen2.5-0.5b --dtype bfloat16 --no-peer \
  "${sampler_args[@]}"
run_part gsm8k 240 "$py" benchmarks/gsm8k_random_steps.py --workdir "$(mktemp -d)" "${gsm8k_args[@]}"
# The accelerator's compiler (JAX_PLATFORMS unset there: its default backend), without autotuning.
run_part roofline 150 env JAX_PLATFORMS="${ROOFLINE_PLATFORMS:-}" \
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$([ "$tiny" = "1" ] || echo --xla_gpu_autotune_level=0)" \
  "$py" benchmarks/roofline.py --presets qwen2.5-0.5b "${roofline_args[@]}"
exit "$failed"
