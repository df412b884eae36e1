"""Tests for the pure GRPO math: the loss family and its (sum, count) normalisation
(group advantages: test_advantages.py).

Reference values come from plain-Python loops over the published formulas
(``reference_loss``), written independently of the vectorised implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import grpo

CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")
EPS, EPS_HIGH, DELTA, BETA, MAX_LEN = 0.2, 0.28, 3.0, 0.05, 7
GSPO_EPS, GSPO_EPS_HIGH = 0.01, 0.02  # GSPO clips the sequence ratio much tighter

# The loss tests run op by op: every configuration shares the same few shapes, so the
# per-operation compilations are reused, where a jit per configuration would recompile.


def x64():
    """Context enabling float64 (jax.enable_x64 on new jax, jax.experimental on old)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover
    return enable_x64()


# ----------------------------------------------------------------------------
# A small batch chosen to hit every region: B=4 rows, T=5 positions.
# ----------------------------------------------------------------------------

MASK = np.array([[0, 1, 1, 1, 1],    # prompt token first, n=4
                 [1, 1, 1, 0, 0],    # padding after, n=3
                 [0, 0, 1, 1, 0],    # n=2
                 [1, 1, 1, 1, 1]],   # n=5
                dtype=np.float32)
ADVANTAGES = np.array([1.0, -1.0, 0.5, -2.0])
# logp - old_logp. Row 0 (A>0): 0.5 -> r=1.65 (high clip), -0.5 (A>0: not clipped).
# Row 1 (A<0): -0.5 -> r=0.61 (low clip), 0.3 -> 1.35 (above 1+eps_high but A<0:
# unclipped), 1.5 -> 4.48 (> delta). Row 2: 0.2 -> 1.22 (inside [0.8, 1.28]).
# Row 3 (A<0): -0.3 -> 0.74 (low clip).
LOG_RATIO = np.array([[9.0, 0.0, 0.1, 0.5, -0.5],
                      [-0.5, 0.3, 1.5, 9.0, 9.0],
                      [9.0, 9.0, 0.2, -0.05, 9.0],
                      [0.05, -0.3, -0.1, 0.0, 0.25]])
LOGPS = -1.0 - 0.1 * np.arange(20, dtype=np.float64).reshape(4, 5)
OLD_LOGPS = LOGPS - LOG_RATIO
REF_LOGPS = LOGPS + np.array([[0.0, 0.3, -0.2, 0.1, 0.4]] * 4) * np.array([[1], [-1], [0.5], [2]])
# old - sampler = offset, so the TIS weight exp(offset) is 0.74, 1.22, 1 or 2.72 (capped at 2).
SAMPLER_LOGPS = OLD_LOGPS - np.array([[-0.3, 0.2, 0.0, 1.0, 0.2]] * 4)
TIS_CAP = 2.0


def case_kwargs(loss_type, **overrides):
    """Keyword arguments of a representative configuration of ``loss_type``."""
    kwargs = dict(loss_type=loss_type, epsilon=EPS, epsilon_high=EPS_HIGH,
                  max_completion_length=MAX_LEN)
    if loss_type == "gspo":
        kwargs.update(epsilon=GSPO_EPS, epsilon_high=GSPO_EPS_HIGH)
    kwargs.update(overrides)
    return kwargs


def reference_loss(logps, old_logps, advantages, mask, *, loss_type, epsilon, epsilon_high,
                   max_completion_length=None, delta=None, beta=0.0, ref_logps=None,
                   importance_sampling_level="token", sampler_logps=None, tis_cap=None,
                   cispo_clip_low=False, tis_mode="truncate", tis_level="token"):
    """Loss and metrics from the published formulas, one token at a time."""
    B, T = len(logps), len(logps[0])
    sequence_level = loss_type == "gspo" or importance_sampling_level == "sequence"
    row_losses, tokens = [], []   # tokens: (ratio, advantage, kl, tis weight, raw tis)
    for i in range(B):
        positions = [t for t in range(T) if mask[i][t]]
        if sequence_level and positions:
            mean_log_ratio = sum(logps[i][t] - old_logps[i][t] for t in positions) / len(positions)
            seq_ratio = math.exp(mean_log_ratio)
        losses = []
        for t in positions:
            a = advantages[i]
            r = seq_ratio if sequence_level else math.exp(logps[i][t] - old_logps[i][t])
            raw_tis = tis = 1.0
            if tis_cap is not None:
                steps = positions if tis_level == "sequence" else [t]
                raw_tis = math.exp(sum(old_logps[i][s] - sampler_logps[i][s] for s in steps))
                tis = min(raw_tis, tis_cap) if tis_mode == "truncate" else raw_tis * (raw_tis <= tis_cap)
            if loss_type == "cispo":
                lower = 1 - epsilon if cispo_clip_low else -math.inf
                weight = min(max(r, lower), 1 + epsilon_high)
                objective = weight * a * logps[i][t]
            else:
                unclipped = (r if delta is None else min(r, delta)) * a
                clipped = min(max(r, 1 - epsilon), 1 + epsilon_high) * a
                objective = min(unclipped, clipped)
            loss = -tis * objective
            kl = None
            if ref_logps is not None:
                d = ref_logps[i][t] - logps[i][t]
                kl = math.exp(d) - d - 1
                loss += beta * kl
            losses.append(loss)
            tokens.append((r, a, kl, tis, raw_tis))
        row_losses.append(losses)

    if loss_type in ("grpo", "gspo"):
        rows = [sum(l) / len(l) for l in row_losses if l]
        loss = sum(rows) / len(rows)
    elif loss_type == "dr_grpo":
        loss = sum(sum(l) for l in row_losses) / (B * max_completion_length)
    else:
        loss = sum(sum(l) for l in row_losses) / sum(len(l) for l in row_losses)

    n = len(tokens)
    if loss_type == "cispo":
        low = [cispo_clip_low and r < 1 - epsilon for r, *_ in tokens]
        high = [r > 1 + epsilon_high for r, *_ in tokens]
    else:
        low = [r < 1 - epsilon and a < 0 for r, a, *_ in tokens]
        high = [r > 1 + epsilon_high and a > 0 for r, a, *_ in tokens]
    metrics = {
        "clip_ratio/low": sum(low) / n,
        "clip_ratio/high": sum(high) / n,
        "clip_ratio/region": sum(l or h for l, h in zip(low, high)) / n,
        "ratio/mean": sum(tok[0] for tok in tokens) / n,
        "ratio/min": min(tok[0] for tok in tokens),
        "ratio/max": max(tok[0] for tok in tokens),
        "num_tokens": n,
        "num_sequences": sum(1 for l in row_losses if l),
    }
    if ref_logps is not None:
        metrics["kl"] = sum(tok[2] for tok in tokens) / n
    if delta is not None:
        metrics["clip_ratio/delta"] = sum(r > delta and a < 0 for r, a, *_ in tokens) / n
    if tis_cap is not None:
        metrics["tis/weight_mean"] = sum(tok[3] for tok in tokens) / n
        metrics["tis/frac_capped"] = sum(tok[4] > tis_cap for tok in tokens) / n
        if tis_mode == "mask":
            metrics["tis/frac_masked"] = sum(tok[3] == 0 for tok in tokens) / n
    return loss, metrics


def assert_metrics_close(metrics, expected, rtol=1e-5, atol=1e-6):
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(metrics[name]), value, rtol=rtol, atol=atol,
                                   err_msg=name)


# ----------------------------------------------------------------------------
# Loss values against the published formulas
# ----------------------------------------------------------------------------

LOSS_CASES = [
    *[(t, {}) for t in grpo.LOSS_TYPES],
    *[(t, {"delta": DELTA}) for t in CLIPPED_TYPES],
    *[(t, {"ref_logps": REF_LOGPS, "beta": BETA}) for t in grpo.LOSS_TYPES],
    *[(t, {"sampler_logps": SAMPLER_LOGPS, "tis_cap": TIS_CAP}) for t in grpo.LOSS_TYPES],
    *[(t, {"importance_sampling_level": "sequence", "epsilon": GSPO_EPS,
           "epsilon_high": GSPO_EPS_HIGH}) for t in ("grpo", "bnpo", "dr_grpo", "cispo")],
    ("cispo", {"cispo_clip_low": True}),
    ("grpo", {"ref_logps": REF_LOGPS}),  # kl reported with beta = 0
    # Truncated / masked importance sampling, per token / per sequence (TIS, MIS).
    *[(t, {"sampler_logps": SAMPLER_LOGPS, "tis_cap": TIS_CAP, "tis_mode": mode, "tis_level": level})
      for t in ("grpo", "dapo", "cispo") for mode in grpo.TIS_MODES for level in grpo.TIS_LEVELS],
]


@pytest.mark.parametrize("loss_type,overrides", LOSS_CASES)
def test_loss_matches_published_formula(loss_type, overrides):
    kwargs = case_kwargs(loss_type, **overrides)
    expected_loss, expected_metrics = reference_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, **kwargs)
    # Masked positions hold garbage: it must not matter.
    logps = np.where(MASK > 0, LOGPS, -np.inf).astype(np.float32)
    old = np.where(MASK > 0, OLD_LOGPS, np.nan).astype(np.float32)
    loss, metrics = grpo.policy_loss(logps, old, ADVANTAGES.astype(np.float32), MASK, **kwargs)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, expected_metrics)


def test_chosen_inputs_hit_every_region():
    """The reference itself confirms the batch exercises each clipping branch."""
    _, m = reference_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, **case_kwargs("grpo", delta=DELTA))
    assert m["clip_ratio/low"] > 0 and m["clip_ratio/high"] > 0 and m["clip_ratio/delta"] > 0
    _, m = reference_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, **case_kwargs("gspo"))
    assert m["clip_ratio/low"] > 0 and m["clip_ratio/high"] > 0
    _, m = reference_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, **case_kwargs(
        "grpo", sampler_logps=SAMPLER_LOGPS, tis_cap=TIS_CAP))
    assert 0 < m["tis/frac_capped"] < 1


def test_delta_bounds_negative_advantage_update():
    kwargs = case_kwargs("grpo")
    without, _ = grpo.policy_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, **kwargs)
    with_delta, _ = grpo.policy_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, delta=DELTA, **kwargs)
    # Row 1 (A=-1, n=3) has r = e^1.5 > delta: its token loss drops from e^1.5 to delta.
    np.testing.assert_allclose(without - with_delta, (math.exp(1.5) - DELTA) / 3 / 4, rtol=1e-5)


def test_equivalent_formulations():
    args = (LOGPS, OLD_LOGPS, ADVANTAGES, MASK)
    dapo = grpo.policy_loss(*args, loss_type="dapo", epsilon_high=0.28)[0]
    bnpo = grpo.policy_loss(*args, loss_type="bnpo", epsilon_high=0.28)[0]
    np.testing.assert_allclose(dapo, bnpo, rtol=1e-7)
    gspo = grpo.policy_loss(*args, loss_type="gspo")[0]
    grpo_seq = grpo.policy_loss(*args, loss_type="grpo", importance_sampling_level="sequence")[0]
    np.testing.assert_allclose(gspo, grpo_seq, rtol=1e-7)


def test_on_policy_ratio_is_one_and_kl_zero():
    for loss_type in grpo.LOSS_TYPES:
        loss_fn = lambda lp: grpo.policy_loss(lp, LOGPS, ADVANTAGES, MASK, ref_logps=LOGPS,
                                              beta=BETA, **case_kwargs(loss_type))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)
        for name in ("ratio/mean", "ratio/min", "ratio/max"):
            assert float(metrics[name]) == 1.0, (loss_type, name)
        for name in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "kl"):
            assert float(metrics[name]) == 0.0, (loss_type, name)
        if loss_type == "grpo":
            # On-policy the gradient is the plain policy gradient -A_i / (n_i * rows).
            n = MASK.sum(axis=1, keepdims=True)
            expected = -ADVANTAGES[:, None] * MASK / n / 4
            np.testing.assert_allclose(grads, expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------

EVERY_OPTION = {"delta": DELTA, "ref_logps": REF_LOGPS, "beta": BETA,
                "sampler_logps": SAMPLER_LOGPS, "tis_cap": TIS_CAP}
GRADIENT_CASES = [
    ("grpo", {}),
    *[(t, EVERY_OPTION) for t in ("grpo", "bnpo", "dr_grpo", "dapo")],
    # Sequence level: without TIS the GSPO-token gradient is the derivative of the value.
    ("gspo", {"delta": DELTA, "ref_logps": REF_LOGPS, "beta": BETA}),
    ("bnpo", {"importance_sampling_level": "sequence", "epsilon": GSPO_EPS,
              "epsilon_high": GSPO_EPS_HIGH}),
]


@pytest.mark.parametrize("loss_type,overrides", GRADIENT_CASES)
def test_gradient_matches_finite_differences(loss_type, overrides):
    with x64():
        kwargs = case_kwargs(loss_type, **overrides)
        kwargs = {k: jnp.asarray(v, jnp.float64) if isinstance(v, np.ndarray) else v
                  for k, v in kwargs.items()}
        old, adv, mask = (jnp.asarray(x, jnp.float64) for x in (OLD_LOGPS, ADVANTAGES, MASK))
        loss_fn = lambda lp: grpo.policy_loss(lp, old, adv, mask, **kwargs)[0]
        logps = jnp.asarray(LOGPS, jnp.float64)
        grads = np.asarray(jax.grad(loss_fn)(logps))
        h = 1e-6
        numeric = np.zeros(logps.shape)
        for index in np.ndindex(*logps.shape):   # masked positions too: expect 0 there
            step = np.zeros(logps.shape)
            step[index] = h
            numeric[index] = (loss_fn(logps + step) - loss_fn(logps - step)) / (2 * h)
        np.testing.assert_allclose(grads, numeric, rtol=1e-6, atol=1e-8)
        assert np.any(grads != 0)


@pytest.mark.parametrize("overrides", [{}, {"ref_logps": REF_LOGPS, "beta": BETA},
                                       {"sampler_logps": SAMPLER_LOGPS, "tis_cap": TIS_CAP}])
def test_cispo_gradient_is_truncated_reinforce(overrides):
    """CISPO's weight is stop-gradient, so finite differences of the value do not apply:
    the gradient is -sg(min(r, 1+eps_high)) A / N (+ beta dk3/dlogp / N)."""
    kwargs = case_kwargs("cispo", **overrides)
    with x64():
        grads = jax.grad(lambda lp: grpo.policy_loss(
            lp, OLD_LOGPS, ADVANTAGES, MASK, **kwargs)[0])(jnp.asarray(LOGPS))
    expected = np.zeros_like(LOGPS)
    num_tokens = MASK.sum()
    for i in range(4):
        for t in range(5):
            if not MASK[i, t]:
                continue
            weight = min(math.exp(LOG_RATIO[i, t]), 1 + EPS_HIGH)
            tis = 1.0
            if "tis_cap" in overrides:
                tis = min(math.exp(OLD_LOGPS[i, t] - SAMPLER_LOGPS[i, t]), TIS_CAP)
            g = -tis * weight * ADVANTAGES[i]
            if "beta" in overrides:
                g += BETA * (1 - math.exp(REF_LOGPS[i, t] - LOGPS[i, t]))
            expected[i, t] = g / num_tokens
    np.testing.assert_allclose(grads, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_SAMPLING_LEVELS)
def test_masked_tokens_get_exactly_zero_gradient(loss_type, level):
    logps = np.where(MASK > 0, LOGPS, np.nan).astype(np.float32)
    old = np.where(MASK > 0, OLD_LOGPS, -np.inf).astype(np.float32)
    ref = np.where(MASK > 0, REF_LOGPS, np.inf).astype(np.float32)
    sampler = np.where(MASK > 0, SAMPLER_LOGPS, np.nan).astype(np.float32)
    kwargs = case_kwargs(loss_type, delta=None if loss_type == "cispo" else DELTA,
                         ref_logps=ref, beta=BETA, sampler_logps=sampler, tis_cap=TIS_CAP,
                         importance_sampling_level=level)
    loss_fn = lambda lp: grpo.policy_loss(lp, old, ADVANTAGES, MASK.astype(bool), **kwargs)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(logps)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    grads = np.asarray(grads)
    assert np.all(grads[MASK == 0] == 0.0)
    assert np.all(np.isfinite(grads)) and np.any(grads[MASK > 0] != 0.0)


# ----------------------------------------------------------------------------
# (sum, count) accumulation over micro-batches
# ----------------------------------------------------------------------------

def random_batch(seed=0, B=8, T=5):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[5] = 0.0   # a row with no tokens: excluded from grpo's row count
    logps = (-rng.random((B, T)) * 2).astype(np.float32)
    old = (logps + rng.normal(size=(B, T)) * 0.4).astype(np.float32)
    ref = (logps + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    sampler = (old + rng.normal(size=(B, T)) * 0.5).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return logps, old, adv, mask, ref, sampler


ACCUMULATION_CASES = [
    *[(t, {"delta": DELTA}) for t in CLIPPED_TYPES],
    ("cispo", {}),
    ("grpo", {"importance_sampling_level": "sequence"}),
]


def pad_rows(x, rows):
    """Append rows of zeros (empty rows when x is a mask) up to ``rows``."""
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


@pytest.mark.parametrize("loss_type,overrides", ACCUMULATION_CASES)
def test_micro_batch_accumulation_equals_full_batch(loss_type, overrides):
    """Uneven row splits, each padded with empty rows to a fixed micro-batch of 4 rows
    (as a trainer with a fixed micro-batch shape would): padding must not count."""
    logps, old, adv, mask, ref, sampler = random_batch()
    splits = [(0, 4), (4, 5), (5, 6), (6, 8)]   # row 5 has no tokens

    full_kwargs = case_kwargs(loss_type, ref_logps=ref, beta=BETA, sampler_logps=sampler,
                              tis_cap=TIS_CAP, **overrides)
    full_fn = lambda lp: grpo.policy_loss(lp, old, adv, mask, **full_kwargs)
    (full_loss, full_metrics), full_grads = jax.value_and_grad(full_fn, has_aux=True)(logps)

    normalizer = grpo.loss_normalizer(mask, loss_type, max_completion_length=MAX_LEN)
    assert float(normalizer) == sum(float(grpo.loss_normalizer(mask[lo:hi], loss_type, MAX_LEN))
                                    for lo, hi in splits)
    loss_sum, grads, metric_sums = 0.0, [], None
    for lo, hi in splits:
        part = [pad_rows(x[lo:hi], 4) for x in (logps, old, adv, mask, ref, sampler)]
        part_kwargs = case_kwargs(loss_type, ref_logps=part[4], beta=BETA,
                                  sampler_logps=part[5], tis_cap=TIS_CAP, **overrides)
        part_fn = lambda lp: grpo.policy_loss_sum(lp, *part[1:4], **part_kwargs)
        (part_sum, part_metrics), part_grads = jax.value_and_grad(part_fn, has_aux=True)(part[0])
        assert np.all(np.asarray(part_grads)[hi - lo:] == 0.0)
        loss_sum += part_sum
        grads.append(part_grads[:hi - lo] / normalizer)
        metric_sums = part_metrics if metric_sums is None else grpo.combine_metric_sums(
            metric_sums, part_metrics)
    np.testing.assert_allclose(grpo.finalize_loss(loss_sum, normalizer), full_loss, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), full_grads, rtol=1e-5, atol=1e-8)
    assert np.any(np.asarray(full_grads) != 0)
    assert_metrics_close(grpo.finalize_metrics(metric_sums),
                         {k: np.asarray(v) for k, v in full_metrics.items()})
    assert int(full_metrics["num_sequences"]) == 7


def test_grpo_normalizer_counts_non_empty_rows():
    mask = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]])
    assert float(grpo.loss_normalizer(mask, "grpo")) == 2.0
    assert float(grpo.loss_normalizer(mask, "gspo")) == 2.0
    assert float(grpo.loss_normalizer(mask, "dapo")) == 3.0
    assert float(grpo.loss_normalizer(mask, "dr_grpo", max_completion_length=10)) == 30.0
    empty = np.zeros((4, 5), np.float32)
    loss, metrics = grpo.policy_loss(empty - 1, empty, ADVANTAGES, empty)
    assert float(loss) == 0.0 and float(metrics["ratio/min"]) == 0.0


# ----------------------------------------------------------------------------
# jit, traced hyper-parameters, validation
# ----------------------------------------------------------------------------

def test_everything_matches_eager_under_jit():
    """One compiled program with every loss type (value, gradient, sum/normalizer) and
    every advantage scale, against the op-by-op results."""
    logps, old, adv, mask, ref, sampler = random_batch(seed=1)
    rewards = np.random.default_rng(3).normal(size=8).astype(np.float32)
    rewards[2] = np.nan

    def everything(logps, old, adv, mask, ref, sampler, rewards):
        out = {}
        for loss_type in grpo.LOSS_TYPES:
            kwargs = case_kwargs(loss_type, ref_logps=ref, beta=BETA, sampler_logps=sampler,
                                 tis_cap=TIS_CAP)
            loss_fn = lambda lp: grpo.policy_loss(lp, old, adv, mask, **kwargs)
            out[loss_type] = jax.value_and_grad(loss_fn, has_aux=True)(logps)
            loss_sum, _ = grpo.policy_loss_sum(logps, old, adv, mask, **kwargs)
            normalizer = grpo.loss_normalizer(mask, loss_type, MAX_LEN)
            out[loss_type + "/from_sum"] = grpo.finalize_loss(loss_sum, normalizer)
        for scale in grpo.ADVANTAGE_SCALES:
            out[scale] = grpo.group_advantages(rewards, 4, scale=scale, return_info=True)
        return out

    args = (logps, old, adv, mask, ref, sampler, rewards)
    jitted = jax.jit(everything)(*args)
    eager = everything(*args)
    for name in eager:
        flat_jit, flat_eager = jax.tree.leaves(jitted[name]), jax.tree.leaves(eager[name])
        assert len(flat_jit) == len(flat_eager)
        for a, b in zip(flat_jit, flat_eager):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
    for loss_type in grpo.LOSS_TYPES:
        np.testing.assert_allclose(jitted[loss_type + "/from_sum"], jitted[loss_type][0][0],
                                   rtol=1e-6)


def test_traced_hyper_parameters_can_be_vmapped():
    logps, old, adv, mask, ref, _ = random_batch(seed=2)

    def loss_at(epsilon, beta):
        return grpo.policy_loss(logps, old, adv, mask, ref_logps=ref, epsilon=epsilon,
                                beta=beta, delta=4.0)[0]

    epsilons, betas = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.0, 0.04, 0.1])
    swept = jax.jit(jax.vmap(loss_at))(epsilons, betas)
    for e, b, value in zip([0.1, 0.2, 0.3], [0.0, 0.04, 0.1], swept):
        np.testing.assert_allclose(value, loss_at(e, b), rtol=1e-6)


def test_validation_errors():
    args = (LOGPS, OLD_LOGPS, ADVANTAGES, MASK)
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo', 'dapo', 'gspo', 'cispo'"):
        grpo.policy_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        grpo.policy_loss(*args, importance_sampling_level="tokens")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.policy_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.loss_normalizer(MASK, "dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo.policy_loss(*args, beta=0.1)
    with pytest.raises(ValueError, match="epsilon_high"):
        grpo.policy_loss(*args, loss_type="cispo")
    with pytest.raises(ValueError, match="sampler_logps"):
        grpo.policy_loss(*args, tis_cap=2.0)
    with pytest.raises(ValueError, match="delta must exceed"):
        grpo.policy_loss(*args, delta=1.1)
    with pytest.raises(ValueError, match="cispo"):
        grpo.policy_loss(*args, loss_type="cispo", epsilon_high=1.0, delta=4.0)
    with pytest.raises(ValueError, match="old_logps"):
        grpo.policy_loss(LOGPS, OLD_LOGPS[:, :4], ADVANTAGES, MASK)
    with pytest.raises(ValueError, match="mask"):
        grpo.policy_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK[:3])
    with pytest.raises(ValueError, match="ref_logps"):
        grpo.policy_loss(*args, ref_logps=REF_LOGPS.T)
    with pytest.raises(ValueError, match="advantages"):
        grpo.policy_loss(LOGPS, OLD_LOGPS, ADVANTAGES[:, None], MASK)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo.policy_loss(LOGPS[0], OLD_LOGPS[0], ADVANTAGES, MASK[0])
    with pytest.raises(ValueError, match="different keys"):
        grpo.combine_metric_sums({"num_tokens": 1}, {"num_tokens": 1, "kl": 0.0})
    # errors are raised at trace time under jit, too
    with pytest.raises(ValueError, match="old_logps"):
        jax.jit(grpo.policy_loss)(LOGPS, OLD_LOGPS[:, :4], ADVANTAGES, MASK)


def test_metric_reduction_names():
    assert grpo.metric_reduction("ratio/min") == "min"
    assert grpo.metric_reduction("ratio/max") == "max"
    assert grpo.metric_reduction("clip_ratio/low") == "sum"
