"""Smoke tests of the benchmark scripts (`--quick`: 2 layers, few tokens): they run end to end,
print one JSON line per configuration with the fields the README's table is built from, and the
figures are positive and consistent with each other. Speed itself is never asserted here.

The GRPO-step benchmark needs TRL (the `bench` extra), which the test extra does not install.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", *args],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_sampler_benchmark_prints_both_shapes():
    rows = run_benchmark("sampler.py", "--repeats", "1")
    assert [r["shape"] for r in rows] == ["32x128", "4x8x128"]
    for r in rows:
        assert r["grpo_jax_s"] > 0 and r["transformers_s"] > 0
        assert r["speedup_vs_transformers"] == pytest.approx(r["transformers_s"] / r["grpo_jax_s"], rel=0.02)
        assert r["roofline_fraction"] == pytest.approx(
            r["grpo_jax_gflops"] / r["matmul_peak_gflops"], rel=0.02)
        assert r["prompts"] * r["samples_per_prompt"] == 32


def test_train_step_benchmark_prints_every_runner():
    rows = run_benchmark("train_step.py", "--repeats", "1", "--micro-batch-size", "4")
    by_name = {r["config"]: r for r in rows}
    assert set(by_name) == {"plain", "policy", "policy+ref"}
    assert by_name["policy"]["micro_batch_size"] == 4 and by_name["plain"]["micro_batch_size"] is None
    # The reference forward adds one forward's FLOPs (a third of forward + backward).
    ratio = by_name["policy+ref"]["model_tflops"] / by_name["policy"]["model_tflops"]
    assert ratio == pytest.approx(4 / 3, rel=1e-3)
    for r in rows:
        assert r["step_time_s"] > 0 and 0 < r["mfu"]
        # Both MFUs are over the best of the matmul's measured rates (per wall / per CPU second).
        measured = r["matmul_peak_gflops_measured"]
        assert r["matmul_peak_gflops"] == max(measured.values())
        by_cpu = r["model_tflops"] * 1e3 / r["process_cpu_s"] / r["matmul_peak_gflops_per_cpu_s"]
        assert r["mfu_by_cpu_time"] == pytest.approx(by_cpu, rel=0.02, abs=2e-3)


def test_train_step_benchmark_takes_a_shape_and_a_dtype():
    rows = run_benchmark("train_step.py", "--repeats", "1", "--only", "policy", "--dtype", "bfloat16",
                         "--param-dtype", "float32", "--rows", "4", "--length", "24", "--prompt", "8",
                         "--nominal-peak-tflops", "0.5")
    (r,) = rows
    assert r["batch"] == "4x24" and r["prompt_tokens"] == 8
    assert r["model"].endswith("bfloat16 (weights float32)") and r["matmul_peak_problem"] == "2048^3 bfloat16"
    assert r["mfu_nominal"] == pytest.approx(r["model_tflops"] / r["step_time_s"] / 0.5, rel=0.02)


def test_gpu_check_script_runs_end_to_end(tmp_path):
    # On CPU with a tiny shape: the script the accelerator check runs must not fail there.
    tiny = "--quick --vocab-size 512 --rows 2 --length 16 --prompt 8 --repeats 1 --peak-size 256"
    env = dict(os.environ, EXTRA_ARGS=tiny, PYTHON=sys.executable)
    env.pop("NOMINAL_TFLOPS", None)  # the script looks the device up: no datasheet peak for a CPU
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    first = [json.loads(line) for line in (tmp_path / "train_step_qwen2.5-0.5b_bf16.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in
              (tmp_path / "train_step_qwen2.5-0.5b_bf16_f32_weights.jsonl").read_text().splitlines()]
    assert {r["config"] for r in first} == {"plain", "policy", "policy+ref"}
    assert {r["config"] for r in second} == {"policy", "policy+ref"}
    assert all(r["model"].startswith("qwen2 d896 L2") and "V512 bfloat16" in r["model"] for r in first + second)
    assert all(r["mfu_nominal"] is None and r["backend"] == "cpu" for r in first + second)
