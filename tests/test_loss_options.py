"""Tests of the loss options beyond the clipped family (test_grpo.py): KL estimators, the
sampler/trainer importance correction (truncated or masked, token or sequence level), the
entropy bonus and its top-entropy token mask, and the mismatch metrics. Hand-computed values on
test_grpo.py's batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import grpo
from test_grpo import ADVANTAGES, LOGPS, MASK, OLD_LOGPS, SAMPLER_LOGPS, TIS_CAP, assert_metrics_close, case_kwargs


def test_kl_estimators_by_hand():
    """k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1 with d = log pi_ref - log pi_theta (Schulman 2020);
    the loss adds beta times the chosen one, and its gradient flows through log pi_theta."""
    logps = jnp.asarray([[-1.0, -2.0]])
    ref = jnp.asarray([[-1.5, -1.0]])
    d = np.array([-0.5, 1.0])
    want = {"k1": -d, "k2": 0.5 * d ** 2, "k3": np.exp(d) - d - 1}
    for name, values in want.items():
        np.testing.assert_allclose(grpo.kl_estimate(logps, ref, name)[0], values, rtol=1e-6)
        mask = jnp.ones((1, 2))
        base, _ = grpo.policy_loss(logps, logps, jnp.zeros(1), mask, ref_logps=ref, beta=0.0, kl_estimator=name)
        loss, metrics = grpo.policy_loss(logps, logps, jnp.zeros(1), mask, ref_logps=ref, beta=0.1, kl_estimator=name)
        # zero advantage: the loss is beta x the row's mean estimate (grpo: mean over its tokens)
        np.testing.assert_allclose(loss - base, 0.1 * values.mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["kl"], values.mean(), rtol=1e-5)
    grad = jax.grad(lambda lp: grpo.kl_estimate(lp, ref, "k2").sum())(logps)
    np.testing.assert_allclose(grad[0], -d, rtol=1e-6)  # d(d^2/2)/dlogp = -d
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo.kl_estimate(logps, ref, "k4")
    from grpo_jax.train_inputs import TrainConfig
    with pytest.raises(ValueError, match="kl_estimator"):
        TrainConfig(kl_estimator="k4")


# ----------------------------------------------------------------------------
# Importance weights by hand, entropy bonus, top-entropy tokens, sampler/trainer gap
# ----------------------------------------------------------------------------

def test_importance_weights_by_hand():
    """Row 0's trained offsets old - sampler are 0.2, 0, 1, 0.2 (summing to 1.4): token weights
    e^0.2, 1, e^1 (> C = 2), e^0.2; its sequence weight e^1.4 > 2 on all four tokens."""
    kwargs = case_kwargs("dapo", sampler_logps=SAMPLER_LOGPS[:1], tis_cap=TIS_CAP)
    row = lambda **kw: grpo.policy_loss(LOGPS[:1], OLD_LOGPS[:1], ADVANTAGES[:1], MASK[:1],  # noqa: E731
                                        **{**kwargs, **kw})[1]
    e = math.exp
    want = {("truncate", "token"): [e(0.2), 1, 2, e(0.2)], ("mask", "token"): [e(0.2), 1, 0, e(0.2)],
            ("truncate", "sequence"): [2] * 4, ("mask", "sequence"): [0] * 4}
    for (mode, level), weights in want.items():
        metrics = row(tis_mode=mode, tis_level=level)
        np.testing.assert_allclose(metrics["tis/weight_mean"], np.mean(weights), rtol=1e-6)
        capped = 0.25 if level == "token" else 1.0
        np.testing.assert_allclose(metrics["tis/frac_capped"], capped)
        assert ("tis/frac_masked" in metrics) == (mode == "mask")


def test_entropy_bonus_value_by_hand():
    """- coef H_it per token, aggregated like the loss: grpo per-sequence means, dapo token mean."""
    entropy = 0.5 + 0.1 * np.arange(20, dtype=np.float64).reshape(4, 5)
    coef = 0.3
    rows = [entropy[i][MASK[i] > 0] for i in range(4)]
    want = {"grpo": -coef * np.mean([r.mean() for r in rows]),
            "dapo": -coef * np.concatenate(rows).mean()}
    for loss_type, bonus in want.items():
        kwargs = case_kwargs(loss_type, entropy=np.where(MASK > 0, entropy, np.nan))
        base, _ = grpo.policy_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, **kwargs)
        loss, metrics = grpo.policy_loss(LOGPS, OLD_LOGPS, ADVANTAGES, MASK, entropy_coef=coef, **kwargs)
        np.testing.assert_allclose(loss - base, bonus, rtol=1e-5)
        np.testing.assert_allclose(metrics["entropy"], np.concatenate(rows).mean(), rtol=1e-6)


def test_entropy_bonus_gradient_matches_direct_reference():
    """Through the chunked log-prob/entropy kernel (its custom VJP) = jax.grad of plain softmax."""
    from grpo_jax.models.logprobs import token_logprobs
    hidden = jax.random.normal(jax.random.key(0), (4, 5, 8))
    unembed = jax.random.normal(jax.random.key(1), (19, 8))
    targets = jax.random.randint(jax.random.key(2), (4, 5), 0, 19)
    tau, coef = 0.8, 0.2

    def direct(h, w):
        logp_all = jax.nn.log_softmax(h @ w.T / tau, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0], entropy

    def chunked(h, w):
        return token_logprobs(h, w, targets, temperature=tau, chunk_size=8, return_entropy=True)

    def loss(score, h, w, c):
        logps, entropy = score(h, w)
        return grpo.policy_loss(logps, OLD_LOGPS, ADVANTAGES, MASK, loss_type="grpo", entropy=entropy,
                                entropy_coef=c)[0]

    @jax.jit
    def grads(h, w):  # one program: op-by-op, the kernel's scans would each compile
        return [jax.grad(lambda h, w: loss(score, h, w, c), (0, 1))(h, w)
                for score, c in ((chunked, coef), (direct, coef), (direct, 0.0))]

    got, want, no_bonus = grads(hidden, unembed)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(want[0]) - np.asarray(no_bonus[0])).max() > 1e-4  # the bonus has a gradient


def test_high_entropy_tokens_carry_the_policy_gradient():
    """rho = 0.25 of 17 trained tokens: threshold = the 0.75 quantile (numpy's linear one); on
    policy each kept token's loss is -A_i, the others 0, the normaliser unchanged (grpo: 4 rows)."""
    entropy = np.random.default_rng(0).permutation(20).reshape(4, 5).astype(np.float64)
    threshold = np.quantile(entropy[MASK > 0], 0.75)
    keep = (MASK > 0) & (entropy >= threshold)
    n = MASK.sum(axis=1)
    want = np.sum(-ADVANTAGES * keep.sum(axis=1) / n) / 4
    kwargs = dict(entropy=np.where(MASK > 0, entropy, np.inf), high_entropy_fraction=0.25)
    loss_fn = lambda lp: grpo.policy_loss(lp, LOGPS, ADVANTAGES, MASK, **kwargs)  # noqa: E731
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["entropy/kept_frac"], keep.sum() / MASK.sum(), rtol=1e-6)
    grads = np.asarray(grads)
    assert np.all(grads[~keep] == 0) and np.all(grads[keep] != 0)
    # An exact order statistic as the threshold (0.8 x 10 = 8): ties at it are kept.
    h = jnp.arange(11.0)[None]
    assert int(grpo.high_entropy_mask(h, jnp.ones((1, 11), bool), 0.2).sum()) == 3
    assert int(grpo.high_entropy_mask(h, jnp.ones((1, 11), bool), 1.0).sum()) == 11


def test_mismatch_metrics_by_hand():
    trainer = np.array([[-1.0, -2.0, -0.5, 9.0]])
    mask = np.array([[1, 1, 1, 0]])
    zero = grpo.mismatch_metrics(trainer, trainer, mask)
    assert float(zero["mismatch/logp_abs_diff"]) == 0.0 and float(zero["mismatch/kl"]) == 0.0
    sampler = trainer - np.array([[0.5, -0.2, 0.0, np.nan]])   # d = trainer - sampler
    d = np.array([0.5, -0.2, 0.0])
    got = grpo.mismatch_metrics(trainer, sampler, mask)
    np.testing.assert_allclose(got["mismatch/logp_abs_diff"], np.abs(d).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["mismatch/kl"], np.mean(np.exp(d) - d - 1), rtol=1e-5)


def test_new_option_validation_errors():
    args = (LOGPS, OLD_LOGPS, ADVANTAGES, MASK)
    with pytest.raises(ValueError, match="grpo.tis_mode"):
        grpo.policy_loss(*args, sampler_logps=SAMPLER_LOGPS, tis_cap=2.0, tis_mode="clip")
    with pytest.raises(ValueError, match="grpo.tis_level"):
        grpo.policy_loss(*args, sampler_logps=SAMPLER_LOGPS, tis_cap=2.0, tis_level="row")
    with pytest.raises(ValueError, match="entropy"):
        grpo.policy_loss(*args, entropy_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        grpo.policy_loss(*args, high_entropy_fraction=0.2)
    from grpo_jax.train_inputs import TrainConfig
    for bad in ({"high_entropy_fraction": 0.0}, {"high_entropy_fraction": 1.5}):
        with pytest.raises(ValueError, match="grpo.high_entropy_fraction"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="grpo.entropy_coef"):
        TrainConfig(entropy_coef=-0.1)
    with pytest.raises(ValueError, match="grpo.tis_mode"):
        TrainConfig(tis_mode="clip")
    with pytest.raises(ValueError, match="num_mini_batches"):
        TrainConfig(num_mini_batches=0)


def test_sequence_level_weights_per_packed_sequence():
    """Rows 0 and 1 packed into one row (sequence ids 1 and 2): each keeps its own sequence
    weight, so loss and metrics equal the unpacked ones."""
    kwargs = case_kwargs("grpo", tis_cap=TIS_CAP, tis_mode="mask", tis_level="sequence")
    unpacked = grpo.policy_loss(LOGPS[:2], OLD_LOGPS[:2], ADVANTAGES[:2], MASK[:2],
                                sampler_logps=SAMPLER_LOGPS[:2], **kwargs)
    join = lambda x: x[:2].reshape(1, 10)  # noqa: E731
    ids = np.repeat([[1, 2]], 5, axis=1)
    packed = grpo.policy_loss(join(LOGPS), join(OLD_LOGPS), np.repeat(ADVANTAGES[None, :2], 5, axis=1),
                              join(MASK), sampler_logps=join(SAMPLER_LOGPS), sequence_ids=ids, **kwargs)
    np.testing.assert_allclose(packed[0], unpacked[0], rtol=1e-6)
    assert_metrics_close(packed[1], {k: np.asarray(v) for k, v in unpacked[1].items()})
    assert 0 < float(unpacked[1]["tis/frac_masked"]) < 1   # row 0 masked (e^1.4 > 2), row 1 not
