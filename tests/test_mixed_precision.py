"""Mixed precision: bfloat16 compute on float32 master weights.

The GSM8K config trains at lr 1e-6. Adam's first update is lr * g / (|g| + eps) ~ 1e-6 per
weight, below half a bfloat16 ulp of any weight with |w| > 2^8 * 1e-6 = 2.6e-4 (bfloat16 keeps
8 significant bits), so bfloat16 weights lose nearly every update; float32 masters keep them,
while the forward and backward still run in bfloat16.
"""

import importlib.util
import json
import os
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_hf_model, save_hf_model
from test_train_step import FAST  # XLA options that cut these tiny programs' compile time

from grpo_jax import components, config_utils, optim
from grpo_jax import train_step as ts
from grpo_jax.models import ModelConfig, create_model, load_hf, save_hf

LR = 1e-6
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _flat(params) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(params)])


def _weights(model) -> np.ndarray:
    return _flat(nnx.state(model, nnx.Param))


def _batch(vocab: int, rows: int = 8, length: int = 40, prompt: int = 8, seed: int = 0):
    """Every token id appears (so every embedding row gets a gradient); completions carry the
    loss, advantages are nonzero."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.permutation(vocab) for _ in range(-(-rows * length // vocab))])
    mask = np.zeros((rows, length), np.float32)
    mask[:, prompt:] = 1
    return {"tokens": ids[:rows * length].reshape(rows, length).astype(np.int32), "loss_mask": mask,
            "advantages": rng.standard_normal(rows).astype(np.float32)}


def _one_update(dtype: str, param_dtype: str):
    """(old, new) weights, flat in float32, of one AdamW step at lr 1e-6 from the same init."""
    model = create_model(ModelConfig(dtype=dtype, param_dtype=param_dtype), seed=0)
    optimizer = optim.make_optimizer(LR, max_grad_norm=None)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    old = _flat(state.params)
    # On-policy (old log-probs recomputed in-step): ratio 1 in every run, no clipping to differ.
    step = ts.make_train_step(model, optimizer, ts.TrainConfig(use_sampler_logps_as_old=False),
                              compiler_options=FAST)
    state, metrics = step(state, _batch(model.config.vocab_size))
    assert all(x.dtype == jnp.dtype(param_dtype) for x in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    return old, _flat(state.params)


def test_float32_masters_keep_an_update_of_lr_1e6_that_bfloat16_weights_lose():
    old32, new32 = _one_update("float32", "float32")
    old, new = _one_update("bfloat16", "float32")
    old16, new16 = _one_update("bfloat16", "bfloat16")
    np.testing.assert_array_equal(old, old32)  # float32 init does not depend on the compute dtype

    assert np.mean(new != old) >= 0.9
    # The contrast, the fault masters fix: bfloat16 weights keep only the updates of weights
    # near 0 (|w| < 2^8 lr).
    assert np.mean(new16 != old16) < 0.1

    # Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g), insensitive to the bfloat16
    # rounding of |g|: an element can only differ where its gradient is within that rounding
    # (relative 2^-8 a bfloat16 op) of 0 or of eps. Agreement: within bfloat16's relative rounding
    # of the update (2^-8 lr) plus float32's of w + update (2^-23 |w|).
    d32, d, d16 = new32 - old32, new - old, new16 - old16
    tol = 2.0 ** -8 * LR + 2.0 ** -23 * np.abs(old32)
    agree = lambda u: np.mean(np.abs(u - d32) <= tol)  # noqa: E731
    rel_error = lambda u: np.linalg.norm(u - d32) / np.linalg.norm(d32)  # noqa: E731
    assert agree(d) >= 0.98
    # |update| <= lr, so 2% of elements differing by at most 2 lr give at most 2 sqrt(0.02).
    assert rel_error(d) <= 2 * np.sqrt(0.02)
    assert agree(d16) < 0.1 and rel_error(d16) > 0.9


def _safetensors_dtypes(directory: str) -> set[str]:
    """The dtypes recorded in the safetensors headers of a checkpoint directory."""
    found = set()
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


@pytest.fixture(scope="module")
def float32_checkpoint(tmp_path_factory):
    return save_hf_model(make_hf_model("qwen2", seed=3), str(tmp_path_factory.mktemp("qwen2")))


def test_load_hf_bfloat16_compute_keeps_float32_masters_and_save_hf_round_trips(float32_checkpoint, tmp_path):
    reference = load_hf(float32_checkpoint)  # float32 compute and weights
    model = load_hf(float32_checkpoint, dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "float32"
    # The masters hold the float32 checkpoint exactly (nothing rounded to bfloat16 on load).
    np.testing.assert_array_equal(_weights(model), _weights(reference))
    no_masters = load_hf(float32_checkpoint, dtype="bfloat16", param_dtype="bfloat16")
    assert no_masters.layers.wq[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(_batch(97, rows=2, length=12)["tokens"])
    logits = np.asarray(model(tokens))
    assert np.abs(logits - np.asarray(reference(tokens))).max() < 0.1  # bfloat16 compute

    # Default export: the compute dtype (bfloat16), config.json saying so; it loads back as
    # float32 masters holding the bfloat16 rounding of ours, and computes the same logits.
    out = str(tmp_path / "bf16")
    save_hf(model, out)
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf_cfg["torch_dtype"] == hf_cfg["dtype"] == "bfloat16"
    assert _safetensors_dtypes(out) == {"BF16"}
    back = load_hf(out, dtype=None)  # the checkpoint's dtype: bfloat16 compute
    assert back.config.dtype == "bfloat16" and back.layers.wq[...].dtype == jnp.float32
    rounded = _flat(jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    np.testing.assert_array_equal(_weights(back), rounded)
    np.testing.assert_array_equal(np.asarray(back(tokens)), logits)

    # dtype="float32" exports the masters themselves: an exact round trip.
    out = str(tmp_path / "f32")
    save_hf(model, out, dtype="float32")
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    assert _safetensors_dtypes(out) == {"F32"}
    exact = load_hf(out, dtype="bfloat16")
    np.testing.assert_array_equal(_weights(exact), _weights(model))


def _load_config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_config_param_dtype_reaches_the_model():
    c = config_utils.default_config()
    assert c.model.param_dtype == "float32" and c.sampling.gather_weights is True
    c.model.dtype = "bfloat16"
    tokenizer = types.SimpleNamespace(vocab_size=64, eos_id=2, bos_id=1, pad_id=0)
    cfg = components.model_config(c, tokenizer)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    c.model.param_dtype = "float16"
    with pytest.raises(config_utils.ConfigError, match="model.param_dtype"):
        config_utils.validate(c)

    gsm8k = _load_config("gsm8k_qwen2_5_0_5b")
    assert (gsm8k.model.dtype, gsm8k.model.param_dtype) == ("bfloat16", "float32")
    local = _load_config("gsm8k_qwen2_5_0_5b", "runlocal")
    assert (local.model.dtype, local.model.param_dtype) == ("float32", "float32")


def test_checkpoint_restores_float32_masters(tmp_path):
    # The trainer restores into `abstract_like(init_state())`: the dtypes of the run's own state.
    from grpo_jax.checkpoint import Checkpointer, abstract_like

    model = create_model(ModelConfig(dtype="bfloat16", param_dtype="float32"), seed=1)
    optimizer = optim.make_optimizer(LR)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    # Master bits below bfloat16's resolution, which a bfloat16 round trip would lose.
    params = jax.tree.map(lambda x: x + 1e-6, state.params)
    state = state._replace(params=params)
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, {"train": state}, {"step": 1})
    checkpointer.wait()
    _, restored, _ = checkpointer.restore({"train": abstract_like(state)})
    checkpointer.close()
    restored = restored["train"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(restored.params))
    np.testing.assert_array_equal(_flat(restored.params), _flat(params))
