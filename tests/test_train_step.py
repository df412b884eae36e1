"""The compiled train step: exact accumulation, sharding, on-policy ratio, masking, learning.

Every program here is compiled with FAST options: no LLVM optimisation and XLA:CPU's older
loop emitters, which cut the compile time of these tiny programs from ~10 s to ~1 s on 2 cores
(compile time is nearly all of these tests' time; the numerics are the same).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import grpo, optim, sampling, sharding
from grpo_jax import train_step as ts
from grpo_jax.models import ModelConfig, abstract_model, create_model
from grpo_jax.models.logprobs import loss_columns, sequence_logprobs, token_logprobs_at


def _fast_compiler_options():
    """The FAST options where this XLA knows them (an unknown option is an error in `jit`)."""
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options)(1.0)
        return options
    except Exception:  # an XLA without one of them: compile normally (slower, same results)
        return {}


FAST = _fast_compiler_options()
MODEL = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, max_position_embeddings=64)
TARGET, STOP, TAU = 7, 2, 0.7
# One sampling config (and prompt shape) for every test: the sampler compiles once.
SAMPLING = sampling.SamplingConfig(max_new_tokens=6, temperature=TAU, n=8, stop_token_ids=(STOP,),
                                   prompt_bucket=4, batch_bucket=4)

_sequence_logprobs = jax.jit(sequence_logprobs, static_argnames=("temperature",),
                             compiler_options=FAST)


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(_leaves(a), _leaves(b)))


def _synthetic_batch(seed=0, rows=8, length=14):
    """Rows = prompt (mask 0) + completion (1) + env turn (0) + completion (1) + padding.

    Row 3 is prompt-only (no trained token at all). Old log-probs are the log-probs of a
    slightly different policy (random offsets), so ratios differ from 1 and some tokens clip.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MODEL.vocab_size, (rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    segment_ids = np.zeros((rows, length), np.int32)
    for i in range(rows):
        prompt, first, env, second = 2 + i % 3, 3 + i % 2, 2, 1 + i % 3
        end = prompt + first + env + second
        segment_ids[i, :end] = 1
        tokens[i, end:] = 0
        if i == 3:
            continue
        mask[i, prompt:prompt + first] = 1
        mask[i, prompt + first + env:end] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    old_logps = np.where(mask > 0, -3.4 + 0.4 * rng.standard_normal((rows, length)), 0.0)
    advantages = rng.standard_normal(rows).astype(np.float32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
            "loss_mask": mask, "old_logps": old_logps.astype(np.float32), "advantages": advantages}


SGD = optax.sgd(1.0)  # the update *is* the gradient: compares gradients, not Adam's signs
ADAM = optim.make_optimizer(1e-2)
_STEPS = {}


def _compiled_step(cfg, optimizer=ADAM, mesh=None):
    """One step function per (config, optimizer, mesh), so equal programs compile once."""
    key = (cfg, id(optimizer), None if mesh is None else tuple(mesh.shape.items()))
    if key not in _STEPS:
        abstract = abstract_model(MODEL)
        _STEPS[key] = ts.make_train_step(abstract, optimizer, cfg, mesh=mesh, compiler_options=FAST)
    return _STEPS[key]


def _one_step(cfg, batch, optimizer=ADAM, mesh=None, seed=0, ref_params=None):
    model = create_model(MODEL, seed, mesh=mesh)
    state = ts.init_train_state(model, optimizer, jax.random.key(0), mesh=mesh)
    return _compiled_step(cfg, optimizer, mesh)(state, batch, ref_params)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_four_micro_batches_give_the_full_batch_update(loss_type):
    # grpo: the per-row 1/n_i weights and the count of non-empty rows must survive the split;
    # dapo: the token count of the whole batch.
    batch = _synthetic_batch()
    kwargs = dict(loss_type=loss_type, epsilon_high=0.28 if loss_type == "dapo" else None)
    full, m_full = _one_step(ts.TrainConfig(**kwargs), batch, SGD)
    accum, m_accum = _one_step(ts.TrainConfig(micro_batch_size=2, **kwargs), batch, SGD)
    assert _max_diff(full.params, accum.params) < 1e-6
    start = nnx.split(create_model(MODEL, 0), nnx.Param, ...)[1]
    assert _max_diff(full.params, start) > 1e-3  # the step did move the parameters
    for name in ("loss", "grad_norm", "entropy", "clip_ratio/region", "ratio/mean", "ratio/min"):
        np.testing.assert_allclose(m_accum[name], m_full[name], rtol=1e-5, err_msg=name)
    assert int(m_full["num_tokens"]) == int(batch["loss_mask"][:, 1:].sum())
    assert int(m_full["num_sequences"]) == 7
    assert float(m_full["clip_ratio/region"]) > 0  # off-policy batch: clipping is exercised
    # The reported loss is grpo.policy_loss of the same log-probs (computed here without the step).
    model = create_model(MODEL, 0)
    logps = _sequence_logprobs(model, batch["tokens"], batch["positions"], batch["segment_ids"])
    loss, _ = grpo.policy_loss(logps, batch["old_logps"][:, 1:], batch["advantages"],
                               batch["loss_mask"][:, 1:], **kwargs)
    np.testing.assert_allclose(m_full["loss"], loss, rtol=1e-5)


def test_fused_projections_give_the_same_update():
    batch = _synthetic_batch(seed=2)
    fused, m_fused = _one_step(ts.TrainConfig(fuse_projections=True), batch, SGD)
    plain, m_plain = _one_step(ts.TrainConfig(fuse_projections=False), batch, SGD)
    assert _max_diff(fused.params, plain.params) < 1e-6
    np.testing.assert_allclose(m_fused["grad_norm"], m_plain["grad_norm"], rtol=1e-5)
    assert not sharding.can_fuse_projections(sharding.make_mesh(data=1, fsdp=2, tp=4))
    assert sharding.can_fuse_projections(sharding.make_mesh(data=1, fsdp=8, tp=1))
    assert sharding.can_fuse_projections(None)


def test_head_at_loss_positions_only_gives_the_same_update():
    """max_loss_tokens: the output head runs at each row's loss positions only (7 of 13 columns
    here, rows with fewer filled up with other columns), reference log-probs too; the update,
    the loss and the metrics are those of the head at every position."""
    batch = _synthetic_batch(seed=4)
    most = int(batch["loss_mask"][:, 1:].sum(axis=1).max())
    assert most == 7 < batch["tokens"].shape[1] - 1
    ref_params = nnx.split(create_model(MODEL, seed=5), nnx.Param, ...)[1]
    for kwargs in (dict(), dict(beta=0.1, micro_batch_size=4)):
        every, m_every = _one_step(ts.TrainConfig(**kwargs), batch, SGD, ref_params=ref_params)
        loss_only, m_loss = _one_step(ts.TrainConfig(max_loss_tokens=most, **kwargs), batch, SGD,
                                      ref_params=ref_params)
        assert _max_diff(every.params, loss_only.params) < 1e-6
        for name in ("loss", "grad_norm", "entropy", "kl", "ratio/min", "ratio/max", "num_tokens"):
            if name in m_every:
                np.testing.assert_allclose(m_loss[name], m_every[name], rtol=1e-5, err_msg=name)
    # A row with more loss tokens than the bound would lose some: refused before the step runs.
    with pytest.raises(ValueError, match="max_loss_tokens"):
        _one_step(ts.TrainConfig(max_loss_tokens=most - 1), batch, SGD)
    with pytest.raises(ValueError, match="max_loss_tokens"):
        ts.TrainConfig(max_loss_tokens=0)


def test_logprobs_at_columns_equal_the_full_computation():
    hidden = jax.random.normal(jax.random.key(0), (3, 9, 16))
    unembed = jax.random.normal(jax.random.key(1), (40, 16))
    targets = jax.random.randint(jax.random.key(2), (3, 9), 0, 40)
    mask = np.zeros((3, 9), np.float32)
    mask[0, 2:5] = mask[1, 6:] = mask[2, [1, 4, 7]] = 1
    columns = loss_columns(jnp.asarray(mask), 4)
    np.testing.assert_array_equal(columns[0], [2, 3, 4, 0])  # loss positions first, in order
    weights = jax.random.normal(jax.random.key(3), (3, 9)) * mask

    def loss(h, w, cols):
        lp, ent = token_logprobs_at(h, w, targets, cols, chunk_size=16, return_entropy=True)
        return jnp.sum(lp * weights + 0.3 * ent * weights), (lp, ent)

    (_, (lp_all, ent_all)), g_all = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, unembed, None)
    (_, (lp_at, ent_at)), g_at = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, unembed, columns)
    selected = np.zeros((3, 9), bool)
    selected[np.arange(3)[:, None], np.asarray(columns)] = True
    np.testing.assert_allclose(lp_at, np.where(selected, lp_all, 0.0), atol=1e-6)
    np.testing.assert_allclose(ent_at, np.where(selected, ent_all, 0.0), atol=1e-6)
    for a, b in zip(g_at, g_all):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("max_loss_tokens", [None, 7])
def test_sharded_step_matches_one_device(max_loss_tokens):
    batch = _synthetic_batch(seed=1)
    # Unfused on both sides (a tp-sharded step never fuses): the same computation, laid out
    # differently; fusion itself is checked in test_fused_projections_give_the_same_update.
    # max_loss_tokens=7: the head at the loss positions only (gathered per row), as the trainer runs it.
    cfg = ts.TrainConfig(loss_type="bnpo", micro_batch_size=4, num_iterations=2, beta=0.05,
                         fuse_projections=False, max_loss_tokens=max_loss_tokens)
    ref = nnx.split(create_model(MODEL, 5), nnx.Param, ...)[1]
    # SGD: the update is the gradient. (Adam's m / sqrt(v) turns float-rounding differences of
    # near-zero gradients into updates of up to the learning rate, so it cannot be compared tightly.)
    single, m_single = _one_step(cfg, batch, SGD, ref_params=ref)
    mesh = sharding.make_mesh(data=1, fsdp=2, tp=4)
    ref_sharded = nnx.split(create_model(MODEL, 5, mesh=mesh), nnx.Param, ...)[1]
    sharded, m_sharded = _one_step(cfg, batch, SGD, mesh=mesh, ref_params=ref_sharded)
    assert _max_diff(single.params, sharded.params) < 1e-6
    for name in m_single:
        np.testing.assert_allclose(m_sharded[name], m_single[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(m_single["kl"]) > 0
    # The state stays in its logical-axis sharding (w_gate: [layers, embed, mlp] -> fsdp, tp).
    spec = sharded.params["layers"]["w_gate"][...].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tp")
    adam, _ = _one_step(cfg, batch, mesh=mesh, ref_params=ref_sharded)
    mu = optax.tree_utils.tree_get(adam.opt_state, "mu")  # Adam's first moment: the same
    assert tuple(mu["layers"]["w_gate"][...].sharding.spec) == (None, "fsdp", "tp")


# ---------------------------------------------------------------------------------------------
# Batches from the real sampler.
# ---------------------------------------------------------------------------------------------
def _sample_batch(model, prompts, key, scfg):
    """Prompt + completion rows, right-padded, with the sampler's log-probs as old_logps."""
    samples = sampling.generate(model, prompts, key, scfg)
    width = max(map(len, prompts)) + scfg.max_new_tokens
    rows = len(samples.tokens)
    tokens = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.float32)
    old = np.zeros((rows, width), np.float32)
    segment_ids = np.zeros((rows, width), np.int32)
    for i in range(rows):
        prompt = prompts[samples.prompt_index[i]]
        p, n = len(prompt), int(samples.lengths[i])
        tokens[i, :p], tokens[i, p:p + n] = prompt, samples.tokens[i, :n]
        mask[i, p:p + n], old[i, p:p + n] = 1, samples.logprobs[i, :n]
        segment_ids[i, :p + n] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy()
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
             "loss_mask": mask, "old_logps": old}
    return batch, samples


def test_on_policy_ratio_is_one_and_nothing_clips():
    model = create_model(MODEL, 3)
    tau = TAU
    prompts = [[5, 9, 11], [7, 3, 12, 30]]
    batch, samples = _sample_batch(model, prompts, jax.random.key(4), SAMPLING)
    batch["advantages"] = np.linspace(-1, 1, len(samples.tokens)).astype(np.float32)
    # The sampler's log-probs as old: equal to the step's up to rounding.
    state, metrics = _one_step(ts.TrainConfig(temperature=tau, epsilon=1e-3), batch, seed=3)
    assert abs(float(metrics["ratio/min"]) - 1) < 1e-5 and abs(float(metrics["ratio/max"]) - 1) < 1e-5
    assert float(metrics["clip_ratio/region"]) == 0.0
    assert int(metrics["num_tokens"]) == int(samples.lengths.sum())
    # Old log-probs recomputed in-step, with TIS against the sampler: ratio exactly 1, weight ~1.
    cfg = ts.TrainConfig(temperature=tau, use_sampler_logps_as_old=False, tis_cap=2.0)
    _, metrics = _one_step(cfg, batch, seed=3)
    assert float(metrics["ratio/min"]) == 1.0 and float(metrics["ratio/max"]) == 1.0
    assert abs(float(metrics["tis/weight_mean"]) - 1) < 1e-5
    # Scored at another temperature the same tokens are far from the sampler's log-probs.
    other = _sequence_logprobs(create_model(MODEL, 3), batch["tokens"], batch["positions"],
                              batch["segment_ids"], temperature=1.0)
    gap = np.abs(np.asarray(other) - batch["old_logps"][:, 1:])[batch["loss_mask"][:, 1:] > 0]
    assert gap.max() > 1e-2


def test_masked_tokens_get_no_gradient():
    batch = _synthetic_batch(seed=2)
    cfg = ts.TrainConfig(loss_type="grpo")
    model = create_model(MODEL, 0)
    data = ts.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()}, cfg)
    normalizer = grpo.loss_normalizer(data["mask"], cfg.loss_type)
    hidden = jax.jit(lambda m, d: m.hidden_states(d["tokens"], d["positions"], d["segment_ids"]),
                     compiler_options=FAST)(model, data)

    def loss(h):  # on-policy (old = sg(logps)): no token is clipped, every trained one has gradient
        return ts.loss_from_hidden(h, model.unembedding(), data, cfg, normalizer=normalizer)[0]

    grad_BTD = np.asarray(jax.jit(jax.grad(loss), compiler_options=FAST)(hidden))
    # hidden[:, t] scores token t + 1: it gets gradient iff loss_mask[:, t + 1] is set.
    scored = np.zeros(batch["loss_mask"].shape, bool)
    scored[:, :-1] = batch["loss_mask"][:, 1:] > 0
    row_norm = np.abs(grad_BTD).sum(-1)
    assert (row_norm[~scored] == 0).all()
    assert (row_norm[scored] > 0).all()

    # Through the whole step: garbage where the mask is 0 (old log-probs, a prompt-only row's
    # tokens, trailing padding) leaves the update unchanged to the last bit.
    base, _ = _one_step(cfg, batch, SGD)
    garbage = {k: v.copy() for k, v in batch.items()}
    garbage["old_logps"][batch["loss_mask"] == 0] = np.nan
    garbage["tokens"][3] = np.arange(batch["tokens"].shape[1]) % MODEL.vocab_size
    garbage["tokens"][batch["segment_ids"] == 0] = 17
    garbage["advantages"][3] = 1e6
    changed, _ = _one_step(cfg, garbage, SGD)
    assert _max_diff(base.params, changed.params) == 0.0
    # ... while changing one trained token does change it (the check can fail).
    trained = {k: v.copy() for k, v in batch.items()}
    trained["tokens"][0, 4] = (trained["tokens"][0, 4] + 1) % MODEL.vocab_size
    assert batch["loss_mask"][0, 4] == 1
    moved, _ = _one_step(cfg, trained, SGD)
    assert _max_diff(base.params, moved.params) > 1e-6


def test_more_inner_iterations_move_further_off_policy():
    batch = _synthetic_batch(seed=3)
    start = nnx.split(create_model(MODEL, 0), nnx.Param, ...)[1]
    one, m_one = _one_step(ts.TrainConfig(use_sampler_logps_as_old=False), batch)
    two, m_two = _one_step(ts.TrainConfig(use_sampler_logps_as_old=False, num_iterations=2), batch)
    assert float(m_one["ratio/min"]) == 1.0 and float(m_one["ratio/max"]) == 1.0
    # The second update sees the first one's policy against the kept old log-probs.
    assert float(m_two["ratio/min"]) < 1.0 < float(m_two["ratio/max"])
    assert _max_diff(two.params, start) > 1.5 * _max_diff(one.params, start)
    assert int(two.step) == 1
    counts = optax.tree_utils.tree_get_all_with_path(two.opt_state, "count")
    assert counts and all(int(c) == 2 for _, c in counts)  # mu optimizer updates


def test_kl_against_the_reference():
    batch = _synthetic_batch(seed=4)
    cfg = ts.TrainConfig(beta=0.1, loss_type="dr_grpo", max_completion_length=8)
    model = create_model(MODEL, 0)
    ref = nnx.split(create_model(MODEL, 0), nnx.Param, ...)[1]
    state = ts.init_train_state(model, ADAM, jax.random.key(0))
    step = _compiled_step(cfg)
    with pytest.raises(ValueError, match="ref_params"):
        step(state, batch)
    state, metrics = step(state, batch, ref)
    assert float(metrics["kl"]) == 0.0  # the policy still equals the reference
    state, metrics = step(state, batch, ref)
    assert float(metrics["kl"]) > 1e-4  # one update away from the reference
    # Another model as the reference: a larger KL (the reference really is used).
    far = nnx.split(create_model(MODEL, 9), nnx.Param, ...)[1]
    _, metrics_far = step(state, batch, far)
    assert float(metrics_far["kl"]) > 2 * float(metrics["kl"])


# ---------------------------------------------------------------------------------------------
# Learning a toy reward with the real sampler, for every loss type.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_learns_a_toy_reward(loss_type):
    """Reward = share of the completion's tokens equal to TARGET; chance is about 1/32."""
    cfg, scfg = MODEL, SAMPLING
    group, new = scfg.n, scfg.max_new_tokens
    model = create_model(cfg, 0)
    optimizer = optim.make_optimizer(3e-2, max_grad_norm=1.0)
    tcfg = ts.TrainConfig(loss_type=loss_type, max_completion_length=new, temperature=TAU,
                          epsilon_high=0.28 if loss_type in ("dapo", "cispo") else None)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    step = ts.make_train_step(model, optimizer, tcfg, compiler_options=FAST)
    graphdef, _, rest = ts.split_params(model)
    rng = np.random.default_rng(0)
    rewards = []
    for k in range(12):
        prompts = rng.integers(8, cfg.vocab_size, (4, 4)).tolist()
        policy = nnx.merge(graphdef, state.params, rest)
        batch, samples = _sample_batch(policy, prompts, jax.random.key(k), scfg)
        reward = np.array([np.mean(np.asarray(samples.completion(i)) == TARGET)
                           for i in range(len(samples.tokens))], np.float32)
        batch["advantages"] = grpo.group_advantages(jnp.asarray(reward), group)
        state, metrics = step(state, batch)
        rewards.append(reward.mean())
    assert np.mean(rewards[:2]) < 0.15
    assert np.mean(rewards[-3:]) > 0.8, (loss_type, np.round(rewards, 2))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["entropy"]) < np.log(cfg.vocab_size)


# ---------------------------------------------------------------------------------------------
# Optimizer and config.
# ---------------------------------------------------------------------------------------------
def test_schedules_and_reported_learning_rate():
    cos = optim.make_schedule(1.0, schedule="cosine", warmup_steps=10, total_steps=110, end_fraction=0.1)
    assert float(cos(0)) == 0.0 and abs(float(cos(5)) - 0.5) < 1e-6 and abs(float(cos(10)) - 1) < 1e-6
    assert abs(float(cos(60)) - 0.55) < 1e-6 and abs(float(cos(110)) - 0.1) < 1e-6
    lin = optim.make_schedule(2.0, schedule="linear", total_steps=4)
    assert [round(float(lin(s)), 6) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(1.0, schedule="cosine", warmup_steps=5, total_steps=5)
    # The step reports the learning rate of its update: warm-up 0.1, 0.2 for mu = 2 updates.
    optimizer = optim.make_optimizer(1.0, schedule="constant", warmup_steps=10, weight_decay=0.1)
    model = create_model(MODEL, 0)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    step = ts.make_train_step(model, optimizer, ts.TrainConfig(num_iterations=2), compiler_options=FAST)
    state, metrics = step(state, _synthetic_batch())
    assert abs(float(metrics["lr"]) - 0.1) < 1e-7
    # Weight decay: projection matrices and embeddings, not norms.
    mask = optim.decay_mask(state.params)
    assert mask["layers"]["wq"] and mask["embed"] and mask["lm_head"]
    assert not mask["final_norm"] and not mask["layers"]["attn_norm"]


def test_config_checks():
    with pytest.raises(ValueError, match="tis_cap"):
        ts.TrainConfig(tis_cap=2.0)
    with pytest.raises(ValueError, match="loss_type"):
        ts.TrainConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="unknown fields"):
        ts.TrainConfig.from_any({"bta": 0.1})
    assert ts.TrainConfig.from_any({"beta": 0.1}).beta == 0.1
    model = create_model(MODEL, 0)
    state = ts.init_train_state(model, SGD, jax.random.key(0))
    step = _compiled_step(ts.TrainConfig(micro_batch_size=3), SGD)
    with pytest.raises(ValueError, match="micro_batch_size"):
        step(state, _synthetic_batch())
    batch = _synthetic_batch()
    del batch["old_logps"]
    with pytest.raises(ValueError, match="old_logps"):
        step(state, batch)


@pytest.mark.parametrize("optimizer", [ADAM, optax.adam(1e-2)], ids=["make_optimizer", "optax.adam"])
def test_low_precision_weights_keep_the_state_dtypes_and_compile_once(optimizer):
    # optax's Adam creates its moments in the parameter dtype and promotes them to the float32
    # gradients on the first update: without care the second step recompiles (and cannot
    # donate). make_optimizer keeps the moments in float32 from the start; any other
    # transformation keeps the dtypes it was initialised with.
    cfg = MODEL.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = create_model(cfg, 0)
    state = ts.init_train_state(model, optimizer, jax.random.key(0))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    want = jnp.float32 if optimizer is ADAM else jnp.bfloat16
    assert moments and all(x.dtype == want for x in moments)
    signature = lambda tree: jax.tree.map(lambda x: (x.dtype, x.shape), tree)  # noqa: E731
    before = signature(state)
    step = ts.make_train_step(model, optimizer, ts.TrainConfig(micro_batch_size=4), compiler_options=FAST)
    for _ in range(2):
        state, metrics = step(state, _synthetic_batch())
    assert signature(state) == before
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    assert step.jitted._cache_size() == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


# ---------------------------------------------------------------------------------------------
# Mini-batches, the sampler/trainer gap, entropy options.
# ---------------------------------------------------------------------------------------------
def _with_policy_old_logps(batch, offset=0.0):
    """The batch with old_logps = log pi_theta_0 (+ offset) on its trained tokens."""
    lp = np.asarray(_sequence_logprobs(create_model(MODEL, 0), batch["tokens"], batch["positions"],
                                       batch["segment_ids"]))
    out = {k: v.copy() for k, v in batch.items()}
    out["old_logps"][:, 1:] = np.where(batch["loss_mask"][:, 1:] > 0, lp + offset, 0.0)
    return out


@pytest.mark.parametrize("recompute", [False, True])
def test_mini_batches_are_sequential_updates(recompute):
    """M = 2: two SGD updates, on rows 0, 2, 4, 6 then 1, 3, 5, 7, each normalised alone; the
    recomputed old log-probs are pi_theta_0's for both (here given as the batch's old_logps)."""
    batch = _synthetic_batch(seed=5)
    cfg = ts.TrainConfig(num_mini_batches=2, use_sampler_logps_as_old=not recompute,
                         micro_batch_size=2 if recompute else None)
    got, metrics = _one_step(cfg, batch, SGD)
    by_hand = _with_policy_old_logps(batch) if recompute else batch
    state = ts.init_train_state(create_model(MODEL, 0), SGD, jax.random.key(0))
    steps = []
    for m in range(2):
        state, step_metrics = _compiled_step(ts.TrainConfig(), SGD)(state, {k: v[m::2] for k, v in by_hand.items()})
        steps.append(step_metrics)
    assert _max_diff(got.params, state.params) < 1e-6
    for name in ("loss", "grad_norm", "ratio/mean"):
        np.testing.assert_allclose(metrics[name], np.mean([s[name] for s in steps]), rtol=1e-5, err_msg=name)
    assert int(metrics["num_tokens"]) == int(batch["loss_mask"][:, 1:].sum())
    if recompute:   # the second update's policy has moved away from theta_0
        assert float(metrics["ratio/min"]) < 1.0 < float(metrics["ratio/max"])
    with pytest.raises(ValueError, match="num_mini_batches x micro_batch_size"):
        _one_step(ts.TrainConfig(num_mini_batches=2, micro_batch_size=3), batch, SGD)


def test_sampler_trainer_gap_metrics():
    """mismatch/*: log pi_trainer (theta_0) vs the batch's sampler log-probs, from the first
    forward (M = 1, either old) or the step's up-front one (M = 2)."""
    batch = _synthetic_batch(seed=6)
    _, metrics = _one_step(ts.TrainConfig(), _with_policy_old_logps(batch), SGD)
    assert float(metrics["mismatch/logp_abs_diff"]) < 1e-6 and float(metrics["mismatch/kl"]) < 1e-9
    offset = 0.1 * (np.arange(13) % 3 - 1.0)   # sampler = trainer + offset
    d = -np.broadcast_to(offset, (8, 13))[batch["loss_mask"][:, 1:] > 0]
    gapped = _with_policy_old_logps(batch, offset)
    for cfg in (ts.TrainConfig(), ts.TrainConfig(num_mini_batches=2),
                ts.TrainConfig(use_sampler_logps_as_old=False, tis_cap=2.0, tis_mode="mask",
                               tis_level="sequence", num_iterations=2)):
        _, metrics = _one_step(cfg, gapped, SGD)
        assert ("tis/frac_masked" in metrics) == (cfg.tis_mode == "mask" and cfg.tis_cap is not None)
        np.testing.assert_allclose(metrics["mismatch/logp_abs_diff"], np.abs(d).mean(), rtol=1e-4)
        np.testing.assert_allclose(metrics["mismatch/kl"], np.mean(np.exp(d) - d - 1), rtol=1e-3)


def test_entropy_bonus_and_top_entropy_tokens_in_the_step():
    batch = _synthetic_batch(seed=7)
    base, _ = _one_step(ts.TrainConfig(micro_batch_size=4), batch, SGD)
    cfg = ts.TrainConfig(micro_batch_size=4, entropy_coef=0.05, high_entropy_fraction=0.5)
    moved, metrics = _one_step(cfg, batch, SGD)
    assert 0.45 < float(metrics["entropy/kept_frac"]) < 0.6   # the top half of each micro-batch
    assert _max_diff(base.params, moved.params) > 1e-5 and np.isfinite(float(metrics["loss"]))
