"""LoRA adapters (`grpo_jax.models.lora`): a new adapter changes nothing, gradients reach the
adapters only, adapters off is the base (the reference), the sampler's merged copy computes what
the unmerged adapters do, a warm start trains the base only, and the trainer runs with them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from config_fixtures import load_config
from flax import nnx

from grpo_jax import config_utils, sampling, trainer
from grpo_jax import train_step as ts
from grpo_jax.metrics import read_metrics
from grpo_jax.models import ModelConfig, create_model, lora
from grpo_jax.models.logprobs import sequence_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ModelConfig(model_type="qwen2", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   d_ff=64, qkv_bias=True, max_position_embeddings=128)
LORA = BASE.replace(lora_rank=4, lora_alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 120, size=(2, 12)), jnp.int32)


def _randomised(model, seed=1):
    """The model with every adapter matrix random (B non-zero: the adapters act)."""
    state = nnx.state(model, lora.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)]))
    return model


def test_a_new_adapter_changes_nothing_and_trained_ones_do():
    base, adapted = create_model(BASE, seed=0), create_model(LORA, seed=0)
    np.testing.assert_array_equal(adapted(TOKENS), base(TOKENS))  # B = 0 at initialisation
    assert not np.allclose(_randomised(adapted)(TOKENS), base(TOKENS), atol=1e-3)


@pytest.mark.parametrize("targets", [LORA.lora_targets, ("wq", "wv")])
def test_the_merged_copy_computes_the_adapters(targets):
    model = _randomised(create_model(LORA.replace(lora_targets=targets), seed=0))
    merged = lora.merged(model)
    assert merged.config.lora_rank == 0 and not nnx.state(merged, lora.LoRAParam)
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), atol=1e-5)
    copy = sampling.sampling_model(model)  # the sampler's per-rollout copy merges them
    np.testing.assert_allclose(copy(TOKENS), model(TOKENS), atol=1e-5)


def test_adapters_off_is_the_base_policy():
    base = create_model(BASE, seed=0)
    model = _randomised(create_model(LORA, seed=0))
    nnx.update(model, lora.adapters_off(nnx.state(model, lora.LoRAParam)))
    positions, segments = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
    np.testing.assert_allclose(sequence_logprobs(model, TOKENS, positions, segments),
                               sequence_logprobs(base, TOKENS, positions, segments), atol=1e-6)


def _batch(rows=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, t), np.float32)
    mask[:, 6:] = 1
    return {"tokens": rng.integers(4, 120, size=(rows, t)).astype(np.int32), "loss_mask": mask,
            "old_logps": np.where(mask > 0, -4.0, 0.0).astype(np.float32),
            "advantages": np.asarray([1.0, -1.0, 0.5, -0.5], np.float32)}


def test_a_train_step_updates_the_adapters_only():
    model = create_model(LORA, seed=0)
    base_before = jax.tree.map(np.asarray, nnx.state(model, lora.BASE))
    optimizer = optax.adam(1e-2)
    step = ts.make_train_step(model, optimizer, ts.TrainConfig(beta=0.1))
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    names = {str(k[-1]) for k, _ in nnx.to_flat_state(state.params)}
    assert names and all(n.startswith("lora_") for n in names)  # the state, moments, checkpoints: adapters
    ref = lora.adapters_off(state.params)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, _batch(), ref)
    assert float(metrics["grad_norm"]) > 0
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.tree.map(np.asarray, state.params))
    assert any(jax.tree.leaves(changed))
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, nnx.state(model, lora.BASE)))
    # At the base (B = 0 before the update), the reference's KL is exactly 0.
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-7)


def test_a_warm_start_trains_the_base_only():
    from grpo_jax.sft import SFTConfig, run_sft
    model = create_model(LORA, seed=0)
    adapters = jax.tree.map(np.asarray, nnx.state(model, lora.LoRAParam))
    base = jax.tree.map(np.asarray, nnx.state(model, lora.BASE))
    b = _batch()
    data = {"tokens": b["tokens"], "loss_mask": b["loss_mask"], "positions": np.broadcast_to(np.arange(12), (4, 12)),
            "segment_ids": np.ones((4, 12), np.int32)}
    run_sft(model, data, SFTConfig(steps=2, batch_size=4, learning_rate=1e-2, warmup_steps=0))
    jax.tree.map(np.testing.assert_array_equal, adapters, jax.tree.map(np.asarray, nnx.state(model, lora.LoRAParam)))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), base, jax.tree.map(np.asarray, nnx.state(model, lora.BASE)))
    assert any(jax.tree.leaves(changed))


def _config(name="calculator_tiny"):
    return load_config(name)


def test_the_trainer_checkpoints_adapters_and_resumes_exactly(tmp_path):
    """With adapters (and a warm start of the base, and a reference): the checkpoint's train
    state and reference hold adapters only, the warm-started base is saved beside them, and a
    stopped-and-resumed run equals an uninterrupted one."""
    import json
    import math
    config = _config()
    with config.unlocked():
        config.lora.rank, config.grpo.beta = 4, 0.04
        config.train.num_steps, config.checkpoint.every = 3, 1
    whole = str(tmp_path / "whole")
    trainer.run(config, whole)
    with open(os.path.join(whole, "checkpoints", "3", "state", "_METADATA")) as f:
        keys = list(json.load(f)["tree_metadata"])
    trained = [k for k in keys if k.startswith(("('train'", "('ref'")) and "'layers'" in k]
    assert trained and all("lora_" in k for k in trained)
    assert any(k.startswith("('base'") and "'wq'" in k for k in keys)
    split = str(tmp_path / "split")
    trainer.run(config, split, stop_after=1)
    trainer.run(config, split)
    rows = [[{k: v for k, v in r.items() if not k.startswith(trainer.TIMING_PREFIXES)} for r in read_metrics(d)]
            for d in (whole, split)]
    assert len(rows[0]) == len(rows[1])
    for x, y in zip(*rows):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])), (x["step"], k)


def test_lora_dropout_is_refused():
    config = _config()
    config.lora.rank, config.lora.dropout = 4, 0.1
    with pytest.raises(config_utils.ConfigError, match="lora.dropout"):
        config_utils.model_platform_fields(config)


def test_lora_sampling_benchmark_runs_both_forms():
    """`benchmarks/lora_sampling.py --quick`: merged and unmerged sample the same tokens."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lora_sampling.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["form"] for r in rows] == ["merged", "unmerged"]
    assert all(r["same_tokens"] and r["wall_s"] > 0 for r in rows)
