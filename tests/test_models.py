"""The NNX decoder against transformers' PyTorch models, on tiny random checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_fixtures import hf_config, hf_logits, left_padded_batch, make_hf_model, save_hf_model

from grpo_jax.models import (CheckpointError, ConfigError, ModelConfig, create_model, from_hf_config,
                             load_hf, save_hf)
from grpo_jax.models.config import rope_inv_freq
from grpo_jax.models.dense import dense
from grpo_jax.models.logprobs import sequence_logprobs, token_logprobs

FAMILIES = ["llama", "qwen2", "qwen3"]
LENGTHS = [9, 40, 3, 23]  # mixed lengths, left-padded to 40


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    family = request.param
    hf_model = make_hf_model(family, seed=FAMILIES.index(family))
    path = save_hf_model(hf_model, str(tmp_path_factory.mktemp(family)))
    return family, hf_model, path


@jax.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions, segment_ids)


def _ours(model, tokens, mask, positions):
    return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


def test_logits_match_transformers(checkpoint):
    family, hf_model, path = checkpoint
    model = load_hf(path, dtype="float32")
    tokens, mask, positions = left_padded_batch(LENGTHS, 40, seed=1)
    ref = hf_logits(hf_model, tokens, mask, positions)
    got = _ours(model, tokens, mask, positions)
    valid = mask.astype(bool)
    assert got.shape == ref.shape
    assert np.abs(got - ref)[valid].max() < 1e-4, family
    # The check can fail: a different model gives different logits.
    assert np.abs(got - ref)[valid].max() < 0.1 * np.abs(ref).max()


def test_config_mapping(checkpoint):
    family, hf_model, path = checkpoint
    cfg = load_hf(path).config
    assert cfg.model_type == family
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.tie_embeddings == (family == "qwen2")
    assert cfg.head_dim == (24 if family == "qwen3" else 16)


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = hf_config("llama")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = from_hf_config(hf_cfg.to_dict())
    assert cfg.rope_scaling_dict["rope_type"] == "llama3"
    got = np.asarray(rope_inv_freq(cfg))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
    # Scaling really changes the low frequencies (all three bands present).
    plain = np.asarray(rope_inv_freq(cfg.replace(rope_scaling=None)))
    assert (got < plain).any() and (got == plain).any()


def test_kv_cache_decoding_matches_full_forward(checkpoint):
    family, _, path = checkpoint
    model = load_hf(path)
    prompt_len, new = 12, 6
    lengths = [5, 12, 8]
    tokens, mask, positions = left_padded_batch(lengths, prompt_len, seed=2)
    rng = np.random.default_rng(3)
    cont = rng.integers(3, 97, size=(len(lengths), new)).astype(np.int32)
    full_tokens = np.concatenate([tokens, cont], 1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], 1)
    full_pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0).astype(np.int32)
    full = _ours(model, full_tokens, full_mask, full_pos)

    @jax.jit
    def step(model, tok, pos, valid, cache):
        hidden, cache = model.decode(tok, pos, valid, cache)
        return model.logits_from_hidden(hidden), cache

    cache = model.init_cache(len(lengths), prompt_len + new + 2)
    logits, cache = step(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask) > 0, cache)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits) - full[:, :prompt_len])[valid].max() < 1e-4
    for t in range(new):
        col = prompt_len + t
        logits, cache = step(model, jnp.asarray(full_tokens[:, col:col + 1]),
                             jnp.asarray(full_pos[:, col:col + 1]), jnp.ones((len(lengths), 1), bool), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, col], atol=1e-4)
    assert int(cache.index) == prompt_len + new


def test_save_hf_loads_in_transformers(tmp_path):
    for family in FAMILIES:
        cfg = from_hf_config(hf_config(family, tie=family == "llama").to_dict())
        model = create_model(cfg, seed=5)
        # Non-trivial norms and biases so a swapped tensor cannot go unnoticed.
        for name in ("attn_norm", "mlp_norm") + (("bq", "bk") if cfg.qkv_bias else ()):
            var = getattr(model.layers, name)
            var[...] = var[...] + 0.3 * jax.random.normal(jax.random.key(1), var.shape)
        out = str(tmp_path / family)
        save_hf(model, out)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        tokens, mask, positions = left_padded_batch([6, 10], 10, seed=4)
        ref = hf_logits(hf_model, tokens, mask, positions)
        got = _ours(model, tokens, mask, positions)
        assert np.abs(got - ref)[mask > 0].max() < 1e-4, family
        reloaded = load_hf(out)
        np.testing.assert_array_equal(_ours(reloaded, tokens, mask, positions), got)


def test_sharded_and_bf16_checkpoints(tmp_path, checkpoint):
    family, hf_model, path = checkpoint
    model = load_hf(path)
    # Sharded save (index file) in bfloat16, read back by us and by transformers.
    out = str(tmp_path / "sharded")
    save_hf(model, out, dtype="bfloat16", max_shard_bytes=20_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    ours_bf16 = load_hf(out, dtype="bfloat16", param_dtype="bfloat16")  # no float32 masters
    assert ours_bf16.layers.wq[...].dtype == jnp.bfloat16
    ours_f32 = load_hf(out, dtype="float32")
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask, positions = left_padded_batch([5, 8], 8)
    np.testing.assert_allclose(_ours(ours_f32, tokens, mask, positions)[mask > 0],
                               hf_logits(hf_bf16, tokens, mask, positions)[mask > 0], atol=1e-4)
    bf16_logits = _ours(ours_bf16, tokens, mask, positions)
    assert np.isfinite(bf16_logits).all()
    assert np.abs(bf16_logits - _ours(ours_f32, tokens, mask, positions))[mask > 0].max() < 0.1


def test_chunked_logprobs_equal_log_softmax():
    cfg = ModelConfig(vocab_size=250, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    model = create_model(cfg, seed=3)
    tokens = jax.random.randint(jax.random.key(0), (3, 11), 0, 250)
    logits = _forward(model, tokens, None, None)[:, :-1]
    scored = jax.jit(sequence_logprobs, static_argnames=("temperature", "chunk_size", "return_entropy"))
    # 100 does not divide 250: the last chunk overlaps the previous one.
    for temperature, chunk in ((1.0, 64), (1.0, 250), (0.7, 100)):
        ref = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature), tokens[:, 1:, None], -1)[..., 0]
        p = jax.nn.softmax(logits / temperature)
        ref_entropy = -jnp.sum(p * jnp.log(p), -1)
        got, entropy = scored(model, tokens, temperature=temperature, chunk_size=chunk, return_entropy=True)
        np.testing.assert_allclose(got, ref, atol=2e-5)
        np.testing.assert_allclose(entropy, ref_entropy, atol=2e-5)

    # Gradients agree too (the hand-written backward pass), for log-probs and entropy together,
    # with a temperature and with chunks that do / do not divide the vocabulary.
    hidden = jax.jit(lambda m, t: m.hidden_states(t))(model, tokens)[:, :-1]
    w = model.unembedding()
    targets = tokens[:, 1:]
    g_logp, g_entropy = jax.random.normal(jax.random.key(1), (2,) + targets.shape)

    def full(h, w, temperature):
        lp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, w) / temperature)
        entropy = -jnp.sum(jnp.exp(lp) * lp, -1)
        return jnp.sum(jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] * g_logp + entropy * g_entropy)

    def chunked(h, w, temperature, chunk):
        lp, entropy = token_logprobs(h, w, targets, temperature=temperature, chunk_size=chunk,
                                     return_entropy=True)
        return jnp.sum(lp * g_logp + entropy * g_entropy)

    for temperature, chunk in ((1.0, 100), (0.7, 64), (0.7, 250)):
        g_ref = jax.grad(full, argnums=(0, 1))(hidden, w, temperature)
        g_got = jax.jit(jax.grad(chunked, argnums=(0, 1)), static_argnums=(2, 3))(hidden, w, temperature, chunk)
        for a, b in zip(g_got, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-4)
    # Log-probs alone (no entropy output): the same gradient as the full softmax.
    g_ref = jax.grad(lambda h, w: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(
        jnp.einsum("btd,vd->btv", h, w)), targets[..., None], -1)[..., 0] * g_logp), argnums=(0, 1))(hidden, w)
    g_got = jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=100) * g_logp),
                     argnums=(0, 1))(hidden, w)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_remat_modes_give_the_same_gradients():
    """What a layer keeps for the backward pass changes memory and speed, never the result."""
    assert ModelConfig(remat=True).remat == "full" and ModelConfig(remat=False).remat == "none"
    with pytest.raises(ConfigError, match="remat"):
        ModelConfig(remat="everything")
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 250)
    grads, saved, weight_matmuls = {}, {}, {}
    for mode in ("none", "dots", "full"):
        cfg = ModelConfig(vocab_size=250, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, remat=mode)
        graphdef, params = nnx.split(create_model(cfg, seed=3))

        def loss(params):
            logps = sequence_logprobs(nnx.merge(graphdef, params), tokens, chunk_size=64)
            return jnp.sum(logps * jnp.linspace(-1.0, 1.0, logps.shape[1]))

        grads[mode] = jax.jit(jax.grad(loss))(params)
        weight_matmuls[mode] = _count_dots(jax.make_jaxpr(jax.grad(loss))(params), batched=False)
        # Residuals the forward keeps for the backward (jax.linearize's constants).
        saved[mode] = sum(x.size for x in jax.tree.leaves(jax.linearize(loss, params)[1]))
    for mode in ("dots", "full"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads[mode], grads["none"])
    assert saved["none"] > saved["dots"] > saved["full"]
    # "dots" keeps every weight matmul's output: its backward recomputes none of them ("full"
    # recomputes all), only attention's batched products.
    assert weight_matmuls["dots"] == weight_matmuls["none"] < weight_matmuls["full"]


def _count_dots(jaxpr, batched: bool) -> int:
    """dot_general equations in a jaxpr and all its sub-jaxprs (a scan body counted once), with
    or without batch dimensions."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    own = sum(bool(e.params["dimension_numbers"][1][0]) == batched
              for e in jaxpr.eqns if e.primitive.name == "dot_general")
    return own + sum(_count_dots(sub, batched) for sub in jax.extend.core.subjaxprs(jaxpr))


@pytest.mark.parametrize("batch_shape", [(6,), (2, 3)])
@pytest.mark.parametrize("k,n", [(8, 20), (20, 8)])
def test_dense_gradients_equal_the_plain_matmul(batch_shape, k, n):
    """The CPU weight-gradient form (transposed copy of the narrower operand) gives the plain
    matmul's values and gradients, with either operand the narrower one."""
    x = jax.random.normal(jax.random.key(0), (*batch_shape, k))
    w = jax.random.normal(jax.random.key(1), (k, n))
    g = jax.random.normal(jax.random.key(2), (*batch_shape, n))
    results = {}
    for cpu_form in (True, False):
        f = lambda x, w: jnp.sum(dense(x, w, cpu_weight_grad=cpu_form) * g)  # noqa: E731
        results[cpu_form] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    plain = jax.value_and_grad(lambda x, w: jnp.sum(jnp.einsum("...k,kn->...n", x, w) * g), argnums=(0, 1))(x, w)
    for got in results.values():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, plain)


def test_errors_name_the_problem(tmp_path, checkpoint):
    family, hf_model, path = checkpoint
    from grpo_jax.models.safetensors_io import SafetensorsFile, write_safetensors

    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))

    def clone(name, drop=None, config=None, truncate=False):
        d = tmp_path / name
        d.mkdir()
        json.dump(config or cfg, open(d / "config.json", "w"))
        keys = [k for k in f.keys() if k != drop]
        write_safetensors(str(d / "model.safetensors"),
                          {k: (f.shape(k), f.get(k).dtype) for k in keys}, lambda k: f.get(k))
        if truncate:
            size = os.path.getsize(d / "model.safetensors")
            with open(d / "model.safetensors", "r+b") as fh:
                fh.truncate(size // 2)
        return str(d)

    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(clone("missing", drop="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight. has shape \(\d+, \d+\), the config implies"):
        load_hf(clone("shape", config={**cfg, "intermediate_size": 100}))
    with pytest.raises(ConfigError, match="gpt2"):
        load_hf(clone("arch", config={**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf(clone("truncated", truncate=True))
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(str(tmp_path))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    for field, value in (("num_attention_heads", 0), ("hidden_size", -8), ("vocab_size", "64")):
        with pytest.raises(ConfigError, match=f"{field}={value!r} must be a positive integer"):
            load_hf(clone(f"bad-{field}", config={**cfg, field: value}))

    def poison(k):
        a = np.array(f.get(k))
        if k == "model.layers.0.self_attn.q_proj.weight":
            a.reshape(-1)[3] = np.nan
        return a
    d = tmp_path / "nan"
    d.mkdir()
    json.dump(cfg, open(d / "config.json", "w"))
    write_safetensors(str(d / "model.safetensors"), {k: (f.shape(k), f.get(k).dtype) for k in f.keys()}, poison)
    with pytest.raises(CheckpointError, match="q_proj.weight' holds NaN or inf"):
        load_hf(str(d))
    assert np.isnan(np.asarray(load_hf(str(d), allow_nonfinite=True).layers.wq[...])).any()
