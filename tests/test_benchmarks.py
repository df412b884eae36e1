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
    # Both figures are printed rounded (3 decimals): compare within that rounding, whatever the speed.
    assert r["mfu_nominal"] == pytest.approx(r["model_tflops"] / r["step_time_s"] / 0.5, rel=0.02, abs=2e-3)


def test_roofline_prints_every_program_with_its_floors():
    rows = run_benchmark("roofline.py", "--presets", "qwen2.5-0.5b", "--table")
    assert [r["program"] for r in rows] == ["attention_layer", "train_step", "prefill", "decode_step"]
    by_name = {r["program"]: r for r in rows}
    train = by_name["train_step"]
    # Every scan was unrolled (a while body would be counted once), on the accelerator's choices,
    # attention in its XLA form (the flash kernels have no CPU backend; they are modelled).
    assert train["loops_left"] == 0 and "bilinearly" in train["counted_by"]
    assert train["platform_choices"]["cpu_weight_grad"] is False
    assert train["platform_choices"]["attention"].startswith("xla")
    assert train["platform_choices"]["decode_attention"].startswith("full")
    assert train["compiled_for"] == "cpu" and "upper bound" in train["bytes_xla_note"]
    for r in rows:
        # The compiled program does at least the model's work (remat recomputes, chunks overlap).
        assert r["flops_xla"] >= 0.99 * r["model_flops"] > 0
        assert r["bytes_xla"] > r["bytes_min"] > 0
        assert r["flops_xla_over_model"] == pytest.approx(r["flops_xla"] / r["model_flops"], rel=1e-2)
        assert set(r["devices"]) == {"h100", "h200", "tpu_v5e"}
        for device in r["devices"].values():
            floor = max(device["compute_floor_s"], device["memory_floor_s"])
            peak = r["flops_xla"] / device["compute_floor_s"]
            assert device["projected_mfu"] == pytest.approx(r["model_flops"] / (floor * peak), rel=1e-2)
            assert device["projected_mfu"] <= device["projected_mfu_best"] <= 1
            assert device["bound"] in ("compute", "memory", "compute or memory")
    # One layer's attention: the flash kernel moves less than the XLA form, forward and backward,
    # and never holds the [B, H, T, S] float32 scores (--quick: 4 rows, 4 heads, 32 tokens).
    att = by_name["attention_layer"]
    assert att["loops_left"] == 0 and "Dao 2023" in att["counted_by"] and "block_q 128" in att["flash_assumption"]
    assert att["bytes_flash_fwd"] < att["bytes_flash_fwd_bwd"] == att["bytes_min"] < att["bytes_xla"]
    assert att["bytes_flash_fwd"] < att["bytes_xla_fwd"] < att["bytes_xla"]
    assert att["flops_xla_fwd"] < att["flops_xla"]
    assert att["bytes_xla_over_flash_fwd_bwd"] == pytest.approx(att["bytes_xla"] / att["bytes_flash_fwd_bwd"], rel=1e-2)
    assert att["bytes_xla_over_flash_fwd"] == pytest.approx(att["bytes_xla_fwd"] / att["bytes_flash_fwd"], rel=1e-2)
    assert att["scores_bytes_removed"] == 4 * 4 * 32 * 32 * 4
    # The train step with flash attention: its bytes less, per layer and micro-batch (2 x 2 here),
    # the XLA form's excess over the flash kernel's for 2 forwards (policy, reference) and one
    # forward-backward (remat recompute + backward).
    assert "2 attention forward + 1 forward-backward" in train["counted_by"]
    removed = 2 * 2 * (2 * (att["bytes_xla_fwd"] - att["bytes_flash_fwd"]) + att["bytes_xla"] - att["bytes_flash_fwd_bwd"])
    assert train["attention_bytes_removed"] == pytest.approx(removed, rel=1e-2)
    assert train["bytes_xla_flash"] == pytest.approx(train["bytes_xla"] - train["attention_bytes_removed"], rel=1e-2)
    assert train["bytes_min"] < train["bytes_xla_flash"] < train["bytes_xla"]
    for device in train["devices"].values():
        assert device["projected_mfu"] <= device["projected_mfu_flash"] <= device["projected_mfu_best"]
        assert device["memory_floor_min_s"] < device["memory_floor_flash_s"] < device["memory_floor_s"]
    # Decode: the live part of the cache (--decode-fill 0.6: 19.2 of 32 slots, blocks of 8 -> 24).
    decode = by_name["decode_step"]
    assert decode["bytes_kv_live"] == pytest.approx(decode["bytes_kv_full"] * 24 / 32, rel=1e-3)
    assert decode["bytes_kv_full"] < decode["bytes_min"]
    h100 = decode["devices"]["h100"]
    assert 0 < h100["tokens_per_s_ceiling"] <= h100["tokens_per_s_ceiling_live"]
    assert h100["tokens_per_s_ceiling_best"] <= h100["tokens_per_s_ceiling_live_best"]
    # Beside the 1- and 2-layer points: the train step grows with its micro-batches' work.
    assert train["model_flops"] > by_name["prefill"]["model_flops"] > decode["model_flops"]


def test_device_check_script_runs_tiny_on_cpu(tmp_path):
    # The accelerator check's script, with tiny shapes on the CPU (the roofline part has its own
    # test above): every part runs and writes its JSON lines.
    env = dict(os.environ, DEVICE_CHECK_TINY="1", PYTHON=sys.executable,
               DEVICE_CHECK_PARTS="train_step,sampler,gsm8k")
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert [(p["part"], p["rc"]) for p in read("summary.jsonl")] == [
        ("train_step", 0), ("sampler", 0), ("gsm8k", 0)]
    (train,) = read("train_step.jsonl")
    assert train["config"] == "policy+ref" and train["remat"] == "full"
    assert train["model"].endswith("bfloat16 (weights float32)") and train["mfu"] > 0
    (sampler,) = read("sampler.jsonl")
    assert sampler["transformers_s"] is None and sampler["grpo_jax_tokens_per_s"] > 0
    assert sampler["memory_roofline_fraction_measured"] > 0 and sampler["memory_roofline_fraction"] is None
    (gsm8k,) = read("gsm8k.jsonl")
    assert gsm8k["steps"] == 3 and len(gsm8k["step_time_s"]) == 3 and gsm8k["kl"] is not None
    assert read("env.json")[0]["backend"] == "cpu"


def test_rollout_benchmark_runs_every_runner():
    rows = run_benchmark("rollout.py", "--repeats", "1")
    by_runner = {r["runner"]: r for r in rows}
    assert sorted(by_runner) == ["engine", "lockstep", "transformers"] and len(rows) == 3
    for r in rows:
        assert r["wall_s"] > 0 and r["episodes_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["episodes_per_s"] == pytest.approx(r["episodes"] / r["wall_s"], rel=0.02)
        assert r["tokens_per_s"] == pytest.approx(r["kept_tokens"] / r["wall_s"], rel=0.02)
    engine = by_runner["engine"]
    for peer in ("lockstep", "transformers"):
        ratio = engine["episodes_per_s"] / by_runner[peer]["episodes_per_s"]
        assert engine[f"speedup_vs_{peer}"] == pytest.approx(ratio, rel=0.02)
    # No stop token: the engine samples exactly the kept targets, every turn of every episode.
    assert engine["sampled_tokens"] == engine["kept_tokens"]
    assert engine["slot_steps"] == engine["decode_steps_run"] * engine["slots"]
    assert 0 < engine["slot_utilisation"] <= 1
    assert engine["slot_utilisation"] == pytest.approx(engine["sampled_tokens"] / engine["slot_steps"], rel=0.02)
    assert engine["decode_steps_run"] <= engine["decode_calls"] * engine["decode_steps"]
    assert engine["prefill_tokens"] > 0 and 0 < engine["device_s"] <= engine["wall_s"]
    # Same keys, same draws: the engine and the lockstep sampler keep the same tokens (a float
    # difference between their programs may flip a rare draw, hence not every episode).
    assert engine["episodes_same_as_lockstep"] >= engine["episodes"] // 2


def test_serve_benchmark_runs_both_paths():
    rows = run_benchmark("serve.py", "--repeats", "1")
    by_runner = {r["runner"]: r for r in rows}
    assert sorted(by_runner) == ["direct", "server", "summary"] and len(rows) == 3
    for name in ("server", "direct"):
        r = by_runner[name]
        assert r["wall_s"] > 0 and r["episodes_per_s"] > 0 and r["completion_tokens"] > 0
        assert r["episodes_per_s"] == pytest.approx(r["clients"] / r["wall_s"], rel=0.02)
        assert r["sampled_tokens"] == r["completion_tokens"]  # every request's tokens, counted by the engine
    summary = by_runner["summary"]
    eps = {name: by_runner[name]["episodes_per_s"] for name in ("server", "direct")}
    assert summary["server_overhead"] == pytest.approx(1 - eps["server"] / eps["direct"], abs=2e-3)
    # Same prompts and seeds: both paths sample the same number of tokens (the same tokens, bar a
    # float difference between batchings flipping a rare draw).
    assert summary["completion_tokens_server"] == by_runner["server"]["completion_tokens"]
    assert summary["completion_tokens_direct"] == by_runner["direct"]["completion_tokens"]
    assert summary["episodes_same"] >= summary["clients"] // 2


def test_packing_benchmark_prints_padded_and_packed():
    rows = run_benchmark("packing.py", "--repeats", "1")
    by_name = {r["config"]: r for r in rows}
    assert sorted(by_name) == ["packed", "padded"]
    padded, packed = by_name["padded"], by_name["packed"]
    assert padded["useful_tokens"] == packed["useful_tokens"] > 0  # the same episodes
    assert int(packed["batch"].split("x")[0]) < int(padded["batch"].split("x")[0])
    assert packed["padding_frac"] < packed["padding_frac_unpacked"] == padded["padding_frac"]
    for r in rows:
        assert r["step_time_s"] > 0
        assert r["useful_tokens_per_s"] == pytest.approx(r["useful_tokens"] / r["step_time_s"], rel=0.02)
    ratio = packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"]
    assert packed["speedup"] == pytest.approx(ratio, rel=0.02)
