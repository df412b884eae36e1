"""The sampler against transformers' generate and against a teacher-forced forward."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import make_hf_model, save_hf_model

from grpo_jax import sampling, sharding
from grpo_jax.models import load_hf
from grpo_jax.models.logprobs import sequence_logprobs

PROMPT_LENGTHS = (5, 17, 9, 1)


_CACHE = {}


def _make_pair(family, tmp_path_factory):
    if family not in _CACHE:
        hf = make_hf_model(family, seed=11, tie=family == "qwen2")
        path = save_hf_model(hf, str(tmp_path_factory.mktemp(family)))
        _CACHE[family] = (hf, load_hf(path))
    return _CACHE[family]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def both(request, tmp_path_factory):
    """Both families: for the comparisons against transformers."""
    return _make_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One family: for the properties of the sampler itself (they do not depend on the family)."""
    return _make_pair("llama", tmp_path_factory)


def _prompts(seed=0, lengths=PROMPT_LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 97, size=n).tolist() for n in lengths]


def _hf_greedy(hf, prompts, max_new, eos):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                      eos_token_id=eos, pad_token_id=0)
    return out[:, width:].numpy()


GREEDY = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0, prompt_bucket=8, batch_bucket=4)


def test_greedy_matches_transformers_generate(both):
    hf, model = both
    prompts = _prompts()
    ref = _hf_greedy(hf, prompts, 10, eos=96)
    ours = sampling.generate(model, prompts, jax.random.key(0), GREEDY.__class__(
        **{**GREEDY.__dict__, "stop_token_ids": (96,)}))
    np.testing.assert_array_equal(ours.tokens, ref)  # both pad with 0 after a stop
    # Now stop on a token that row 0 emits mid-way: both must end that row there.
    stop = int(ref[0][4])
    ref = _hf_greedy(hf, prompts, 10, eos=stop)
    ours = sampling.generate(model, prompts, jax.random.key(0), GREEDY.__class__(
        **{**GREEDY.__dict__, "stop_token_ids": (stop,)}))
    for i in range(len(prompts)):
        n = ours.lengths[i]
        np.testing.assert_array_equal(ours.tokens[i, :n], ref[i, :n])
        if ours.stop_reason[i] == sampling.STOP_TOKEN:
            assert ours.tokens[i, n - 1] == stop and stop not in ours.tokens[i, : n - 1]
            assert (ours.tokens[i, n:] == 0).all() and (ours.logprobs[i, n:] == 0).all()
        else:
            assert n == 10 and stop not in ours.tokens[i]
    assert ours.stop_reason[0] == sampling.STOP_TOKEN and ours.lengths[0] <= 5


def _teacher_forced(model, prompts, samples, temperature):
    """Log-probs and logits of each sampled token under a plain forward over prompt + completion."""
    rows = []
    for i in range(len(samples.tokens)):
        p = prompts[samples.prompt_index[i]]
        rows.append(p + samples.completion(i))
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lp = np.asarray(jax.jit(sequence_logprobs, static_argnames="temperature")(
        model, jnp.asarray(tokens), temperature=temperature))
    logits = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    out_lp, out_logits = [], []
    for i, r in enumerate(rows):
        start = len(prompts[samples.prompt_index[i]])
        out_lp.append(lp[i, start - 1: len(r) - 1])
        out_logits.append(logits[i, start - 1: len(r) - 1])
    return out_lp, out_logits


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_forward(both, temperature):
    _, model = both
    prompts = _prompts(1)
    cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=temperature, n=3, stop_token_ids=(5, 6),
                                  prompt_bucket=8, batch_bucket=4)
    s = sampling.generate(model, prompts, jax.random.key(3), cfg)
    assert s.tokens.shape == (len(prompts) * 3, 12)
    np.testing.assert_array_equal(s.prompt_index, np.repeat(np.arange(len(prompts)), 3))
    ref, _ = _teacher_forced(model, prompts, s, temperature)
    for i in range(len(ref)):
        np.testing.assert_allclose(s.logprobs[i, : s.lengths[i]], ref[i], atol=1e-5)
    # Samples of one group differ (the group shares its prefill, not its randomness).
    assert len({tuple(s.completion(i)) for i in range(3)}) > 1


def test_same_key_same_samples_and_padding_invariance(pair):
    _, model = pair
    prompts = _prompts(2)
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, prompt_bucket=8, batch_bucket=4)
    a = sampling.generate(model, prompts, jax.random.key(7), cfg)
    b = sampling.generate(model, prompts, jax.random.key(7), cfg)
    c = sampling.generate(model, prompts, jax.random.key(8), cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    # A prompt's greedy output does not depend on its padding or its place in the batch.
    alone = sampling.generate(model, [prompts[2]], jax.random.key(0), GREEDY)
    wide = sampling.generate(model, [prompts[2]], jax.random.key(0),
                             sampling.SamplingConfig(**{**GREEDY.__dict__, "prompt_bucket": 32}))
    mixed = sampling.generate(model, [prompts[0], prompts[1], prompts[2]], jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(alone.tokens[0], wide.tokens[0])
    np.testing.assert_array_equal(alone.tokens[0], mixed.tokens[2])


@pytest.mark.parametrize("kw", [{"top_k": 3}, {"top_p": 0.3}, {"min_p": 0.3}, {"top_k": 5, "top_p": 0.5}])
def test_filters_never_emit_outside_their_set(pair, kw):
    _, model = pair
    prompts = _prompts(3, lengths=(4, 6))
    cfg = sampling.SamplingConfig(max_new_tokens=10, temperature=1.3, n=4, prompt_bucket=8, batch_bucket=2,
                                  **kw)
    s = sampling.generate(model, prompts, jax.random.key(1), cfg)
    _, logits = _teacher_forced(model, prompts, s, 1.3)
    for i in range(len(logits)):
        z = logits[i] / 1.3
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        for t, token in enumerate(s.tokens[i, : s.lengths[i]]):
            allowed = np.ones_like(p[t], bool)
            if "top_k" in kw:
                allowed &= z[t] >= np.sort(z[t])[-kw["top_k"]]
            if "min_p" in kw:
                allowed &= p[t] >= kw["min_p"] * p[t].max()
            if "top_p" in kw:
                order = np.argsort(-np.where(allowed, z[t], -np.inf))
                q = np.where(allowed, p[t], 0) / np.where(allowed, p[t], 0).sum()
                before = np.cumsum(q[order]) - q[order]
                nucleus = order[before < kw["top_p"] - 1e-6]
                allowed &= np.isin(np.arange(len(z[t])), order[: len(nucleus) + 1])
            assert allowed[token], (kw, i, t)


def test_filter_logits_sets():
    z = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(z, **kw))) & (
        np.asarray(sampling.filter_logits(z, **kw)) > -1e30)
    np.testing.assert_array_equal(keep(top_k=2), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(keep(top_p=0.5), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(keep(top_p=0.6), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(keep(top_p=0.9), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(keep(min_p=0.5), [[1, 1, 0, 0]])


def _compiled() -> tuple[int, int]:
    """Programs jax has compiled for the sampler's prefill and decode (one per shape bucket)."""
    return sampling._prefill._cache_size(), sampling._decode._cache_size()


def test_same_bucket_does_not_recompile_and_bad_input_fails_early(pair):
    _, model = pair
    cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, prompt_bucket=16, batch_bucket=4,
                                  stop_token_ids=(2,))
    sampling.generate(model, _prompts(4, lengths=(3, 10)), jax.random.key(0), cfg)
    before = _compiled()
    assert min(before) >= 1  # the counts see this test's programs
    sampling.generate(model, _prompts(5, lengths=(12, 2, 7)), jax.random.key(1), cfg)
    sampling.generate(model, _prompts(6, lengths=(16,)), jax.random.key(2), cfg)
    assert _compiled() == before
    for prompts, match in [([[3] * 251], "context of 256"), ([[]], "empty"), ([[3, 97]], "97, outside"),
                           ([[3, -1]], "-1, outside"), ([], "no prompts"),
                           ([[3, 1.5]], "1.5 \\(float\\)"), ([[3, "7"]], "'7' \\(str\\)"),
                           (["hello"], "tokenize it first"), ([[3, True]], "bool")]:
        with pytest.raises(sampling.SamplingError, match=match):
            sampling.generate(model, prompts, jax.random.key(0), cfg)
    with pytest.raises(sampling.SamplingError, match="unknown fields"):
        sampling.generate(model, [[3]], jax.random.key(0), {"max_new_token": 3})
    with pytest.raises(sampling.SamplingError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
    assert _compiled() == before


def test_generate_on_a_mesh_matches_one_device(pair, tmp_path):
    hf, model = pair
    path = save_hf_model(hf, str(tmp_path / "m"))
    mesh = sharding.make_mesh(data=2, fsdp=2, tp=2)
    sharded = load_hf(path, mesh=mesh)
    prompts = _prompts(7, lengths=(3, 8, 5, 11, 2, 6, 9, 4))
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, n=2, prompt_bucket=8, batch_bucket=8)
    ref = sampling.generate(model, prompts, jax.random.key(0), cfg)
    got = sampling.generate(sharded, prompts, jax.random.key(0), cfg)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


def test_categorical_draws_follow_the_distribution():
    probs = np.array([0.5, 0.25, 0.125, 0.0, 0.125], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs, (20_000, 1))))
    draws = np.asarray(jax.jit(sampling.categorical)(jax.random.key(0), logits))
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert freq[3] == 0  # probability 0 is never drawn
    np.testing.assert_allclose(freq, probs, atol=0.015)  # ~4 standard errors


def test_categorical_over_many_blocks_follows_the_distribution():
    """The two-level inversion (block, then token) over a vocabulary that is not a multiple of
    the block: the zero-probability tokens, including a whole zero block and the block edges,
    are never drawn, and frequencies match."""
    v = 300
    probs = np.zeros(v, np.float32)
    probs[[0, 127, 128, 255, 299]] = [0.1, 0.2, 0.3, 0.15, 0.25]   # tokens 256..298 all zero
    logits = jnp.log(jnp.asarray(np.tile(probs, (40_000, 1))))
    draws = np.asarray(jax.jit(sampling.categorical, static_argnames="block")(
        jax.random.key(3), logits, block=128))
    freq = np.bincount(draws, minlength=v) / len(draws)
    assert freq[probs == 0].sum() == 0
    np.testing.assert_allclose(freq, probs, atol=0.01)


def test_a_row_samples_the_same_in_any_batch(pair):
    """Random draws depend on (key, row id) only: a slice of a batch, sampled alone with its row
    ids, gives the rows the whole batch gave (what a multi-host split relies on)."""
    _, model = pair
    prompts = _prompts(9, lengths=(6, 6, 6, 6))
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, prompt_bucket=8, batch_bucket=4)
    whole = sampling.generate(model, prompts, jax.random.key(5), cfg)
    half = sampling.generate(model, prompts[2:], jax.random.key(5), cfg, row_ids=np.arange(4, 8))
    np.testing.assert_array_equal(half.tokens, whole.tokens[4:])
    np.testing.assert_allclose(half.logprobs, whole.logprobs[4:], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2])
def test_bucket_padding_rows_do_not_keep_the_loop_running(pair, n):
    # 3 prompts in a batch bucket of 8: 5 filler prompts (x n rows). Stop tokens = the tokens the
    # real rows draw first, so every real row stops at once; the filler rows' output is dropped
    # and must not keep the decode loop going to max_new_tokens.
    _, model = pair
    prompts = _prompts(seed=3, lengths=(4, 7, 2))
    cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, n=n, prompt_bucket=8, batch_bucket=8)
    free = sampling.generate(model, prompts, jax.random.key(5), cfg)
    assert free.decode_steps == 12 and (free.lengths == 12).all()
    stops = tuple(sorted(set(free.tokens[:, 0].tolist())))
    stopped = sampling.generate(model, prompts, jax.random.key(5),
                                dataclasses.replace(cfg, stop_token_ids=stops))
    np.testing.assert_array_equal(stopped.tokens[:, 0], free.tokens[:, 0])  # same draws
    assert (stopped.lengths == 1).all() and (stopped.stop_reason == sampling.STOP_TOKEN).all()
    assert stopped.decode_steps == 1


def test_geometric_batch_buckets():
    def rows(count, geometric):
        cfg = sampling.SamplingConfig(batch_bucket=4, geometric_batch_buckets=geometric, prompt_bucket=8)
        tokens, valid, n = sampling.pad_prompts([[5, 6]] * count, cfg)
        assert n == count and valid[:count, -2:].all() and valid[count:, -1].all()
        return tokens.shape[0]

    assert sorted({rows(c, False) for c in range(1, 21)}) == [4, 8, 12, 16, 20]
    assert sorted({rows(c, True) for c in range(1, 21)}) == [4, 8, 16, 32]
    assert [rows(c, True) for c in (4, 5, 9, 16, 17)] == [4, 8, 16, 16, 32]


def test_bfloat16_weights_sample_close_to_the_teacher_forced_forward(pair, tmp_path):
    # The accelerator configs run the sampler in bfloat16 (a copy of float32 master weights). Its log-probs are float32 but come
    # from bfloat16 activations, whose rounding differs between the one-token decode and the
    # full forward: close, not equal (the train step's importance-sampling correction exists
    # for this gap).
    hf, _ = pair
    model = load_hf(save_hf_model(hf, str(tmp_path)), dtype="bfloat16")  # float32 masters
    assert model.layers.wq[...].dtype == jnp.float32
    assert sampling.sampling_model(model).layers.wq[...].dtype == jnp.bfloat16  # what decode reads
    misses = sampling._cast_program.cache_info().misses
    sampling.sampling_model(model)  # the next rollout's copy: the same compiled cast
    assert sampling._cast_program.cache_info().misses == misses
    prompts = _prompts(2)
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, prompt_bucket=8, batch_bucket=4)
    s = sampling.generate(model, prompts, jax.random.key(5), cfg)
    assert s.logprobs.dtype == np.float32 and np.isfinite(s.logprobs).all()
    ref, _ = _teacher_forced(model, prompts, s, 1.0)
    diffs = [np.abs(s.logprobs[i, : s.lengths[i]] - ref[i]).max() for i in range(len(ref))]
    print("max |decode - teacher-forced| log-prob, bfloat16:", max(diffs))
    assert max(diffs) < 0.1


@pytest.mark.parametrize("chunk", [4, 5])
def test_decode_in_chunks_samples_the_same_tokens(pair, chunk):
    """Stop checks once a chunk of decode steps (the GPU setting) change nothing but the steps
    the loop runs after every row stopped, which stay below the chunk and are reported."""
    _, model = pair
    prompts = _prompts(seed=4, lengths=(4, 7, 2, 9))
    cfg = sampling.SamplingConfig(max_new_tokens=11, temperature=1.0, n=2, prompt_bucket=8, batch_bucket=4)
    free = sampling.generate(model, prompts, jax.random.key(2), cfg)
    stops = tuple(sorted(set(free.tokens[:, 3].tolist()))[:2])  # some rows stop early, some never
    for stop_ids in ((), stops):
        step_cfg = dataclasses.replace(cfg, stop_token_ids=stop_ids)
        ref = sampling.generate(model, prompts, jax.random.key(2), step_cfg)
        got = sampling.generate(model, prompts, jax.random.key(2), dataclasses.replace(step_cfg, decode_chunk=chunk))
        for field in ("tokens", "lengths", "stop_reason"):
            np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)  # another program's rounding
        assert ref.idle_steps == 0 and 0 <= got.idle_steps < chunk
        assert got.decode_steps == int(ref.lengths.max()) + got.idle_steps
        assert got.tokens.shape == (8, 11)
    assert 0 < (ref.lengths < 11).sum() < len(ref.lengths)  # the stops did stop some rows


def _collective_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """Result shapes of the collectives of a compiled program's HLO."""
    ops = r"(?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|collective-broadcast)"
    shapes = []
    for line in hlo_text.splitlines():
        m = re.search(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? " + ops + r"(?:-start)?\(", line)
        if m:
            shapes.append(tuple(int(d) for d in m.group(2).split(",") if d))
    return shapes


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, tp=1), dict(data=1, fsdp=1, tp=8)])
def test_sampler_splits_rows_and_cache_over_the_mesh(mesh_shape):
    """fsdp=8: prompts, samples and the KV cache split by rows; tp=8: the cache split by KV
    heads (every tp device needs every row's sampled token). Either way no collective of the
    decode program carries the cache (no array with the cache's length), and the tokens are
    one device's."""
    from grpo_jax.models import ModelConfig, create_model

    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=16, d_ff=128,
                      max_position_embeddings=128)
    prompts = _prompts(seed=6, lengths=(3, 11, 6, 8, 2, 9))
    scfg = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, n=2, prompt_bucket=8, batch_bucket=4,
                                   stop_token_ids=(5,), decode_chunk=4)
    ref = sampling.generate(create_model(cfg, seed=0), prompts, jax.random.key(0), scfg)

    mesh = sharding.make_mesh(**mesh_shape)
    model = sampling.sampling_model(create_model(cfg, seed=0, mesh=mesh))
    assert sampling.sampling_model(model) is model  # already in the sampling form: no copy
    got = sampling.generate(model, prompts, jax.random.key(0), scfg)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)

    progs = sampling.programs(model, len(prompts), 16, scfg)
    prefill_fn, prefill_args = progs["prefill"]
    loop = prefill_fn.lower(*prefill_args).compile().output_shardings  # a _LoopState of shardings
    shapes = jax.eval_shape(prefill_fn, *prefill_args)
    cache_len = shapes.cache.kv_valid.shape[1]
    k_shard = loop.cache.k[0].shard_shape(shapes.cache.k[0].shape)
    if mesh_shape["fsdp"] == 8:
        assert loop.tokens.spec[0] == "fsdp" and loop.cache.kv_valid.spec[0] == "fsdp"
        assert k_shard[0] == shapes.cache.k[0].shape[0] // 8
    else:
        assert k_shard[1] == 1 and k_shard[0] == shapes.cache.k[0].shape[0]  # one KV head a device
    decode_fn, decode_args = progs["decode"]
    hlo = decode_fn.lower(*decode_args).compile().as_text()
    shapes = _collective_shapes(hlo)
    assert not [s for s in shapes if cache_len in s], shapes
    biggest = max((int(np.prod(s)) for s in shapes), default=0)
    assert biggest <= 16 * cfg.vocab_size  # at most the [rows, V] logits' reductions
