"""GRPO math: the clipped policy-gradient loss family and its exact normalisation.

Pure functions of arrays (jax.numpy only, no model code); all of them jit. Shapes:
``B`` rows, ``T`` token positions. A row holds one completion (episode), or several
when the batch is packed (``grpo_jax.packing``): then ``sequence_ids`` [B, T] numbers
them, ``k > 0`` on the tokens of the row's k-th sequence (ids in 1..T) and 0 on
padding; absent, each row is one sequence. A *sequence*'s tokens are its positions
where ``mask_BT`` is non-zero (and, packed, its id is > 0): the model's own completion
tokens, never prompt, padding or environment tokens. ``n_i`` is the number of tokens of
sequence ``i``. Advantages are ``[B]`` (one per row) or ``[B, T]`` (per token: a packed
row's sequences each carry their own, constant over the sequence's tokens).

Static vs traced arguments: ``loss_type``, ``importance_sampling_level``,
``max_completion_length``, ``cispo_clip_low``, ``tis_mode``, ``tis_level``,
``high_entropy_fraction`` and whether ``ref_logps``, ``delta``, ``tis_cap``, ``entropy``
are given choose the computation and must be Python values under ``jax.jit``.
``epsilon``, ``epsilon_high``, ``delta``, ``beta``, ``tis_cap`` and ``entropy_coef`` may
be traced arrays (e.g. vmapped over in a hyper-parameter sweep); their range checks then
cannot run, and a traced ``beta`` (``entropy_coef``) always adds the KL (entropy) term.

Normalisation as (sum, count)
-----------------------------
Every loss type is ``loss = loss_sum / max(normalizer, 1)`` where

* ``loss_sum = sum_i c_i sum_t m_it l_it`` is a sum over sequences, with a
  per-sequence weight ``c_i`` that depends on that sequence alone (``1/n_i`` for grpo
  and gspo, ``1`` otherwise), and
* ``normalizer`` (``loss_normalizer``) is a count that adds up over rows: the
  number of non-empty sequences (grpo, gspo), of tokens (bnpo, dapo, cispo), or
  ``sequences * max_completion_length`` (dr_grpo; sequences: the rows, or packed, the
  (row, id > 0) pairs present, empty ones included).

Every per-sequence quantity (``n_i``, GSPO's sequence ratio, the counts) is a
segment sum over the sequence ids inside each row, so packing episodes into rows
changes nothing (``tests/test_packing.py``). Both sums are additive over any split of
the batch into row micro-batches or data shards, so
``sum_k policy_loss_sum(micro_k) / loss_normalizer(full_mask)`` equals
``policy_loss(full)`` (and so do its gradients): gradient accumulation and sharding
reproduce the full-batch objective exactly. For grpo this is the
full-batch "mean over each completion's tokens, then mean over completions",
with completions that have no tokens left out of the count. Metrics follow the
same pattern: ``policy_loss_sum`` returns sums (and a min and a max), combined
with ``combine_metric_sums`` (or ``psum``/``pmin``/``pmax`` per
``metric_reduction``) and turned into averages by ``finalize_metrics`` (all three in
``grpo_jax.loss_metrics``, re-exported here). Two options are *not* additive over
micro-batches: ``high_entropy_fraction``'s quantile is that of the batch passed in.

Group-relative advantages live in ``grpo_jax.advantages`` and are re-exported
here: ``group_advantages``, ``ADVANTAGE_SCALES``; the argument checks in
``grpo_jax.loss_checks`` (``check_settings`` re-exported).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax.advantages import ADVANTAGE_SCALES, group_advantages  # noqa: F401 (re-export)
from grpo_jax import loss_checks, loss_metrics
from grpo_jax.loss_checks import (_check_choice, _check_max_completion_length, _check_shapes,
                                  _resolve_settings)

LOSS_TYPES = loss_checks.LOSS_TYPES
IMPORTANCE_SAMPLING_LEVELS = loss_checks.IMPORTANCE_SAMPLING_LEVELS
TIS_MODES, TIS_LEVELS = loss_checks.TIS_MODES, loss_checks.TIS_LEVELS
check_settings = loss_checks.check_settings  # the checks `TrainConfig` runs when it is made
metric_reduction = loss_metrics.metric_reduction  # re-exports: the metric sums' algebra
combine_metric_sums = loss_metrics.combine_metric_sums
finalize_metrics = loss_metrics.finalize_metrics

# Loss types whose sequences are averaged over their own tokens first (weight 1/n_i).
_PER_SEQUENCE_MEAN = ("grpo", "gspo")
# Loss types normalised by the number of tokens in the batch.
_TOKEN_MEAN = ("bnpo", "dapo", "cispo")


def k3_kl(logps, ref_logps):
    """Per-token k3 estimator of KL(pi_theta || pi_ref).

    From Schulman (2020), "Approximating KL divergence".

    With ``d = log pi_ref(y_t) - log pi_theta(y_t)`` and tokens sampled from pi_theta:

        k3 = exp(d) - d - 1   (>= 0, unbiased for KL, and 0 exactly when ref == logps)

    Elementwise on arrays of any shape; the gradient flows through ``logps``.
    """
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps, ref_logps, estimator: str = "k3"):
    """Per-token estimator of KL(pi_theta || pi_ref) from tokens sampled from pi_theta
    (Schulman 2020, "Approximating KL divergence"), with ``d = log pi_ref - log pi_theta``:

        k1 = -d               unbiased, high variance, can be negative
        k2 = d^2 / 2          biased, low variance, >= 0 (its gradient is the reverse-KL gradient)
        k3 = exp(d) - d - 1   unbiased, low variance, >= 0 (`k3_kl`)

    All are 0 exactly when ref == logps; the gradient flows through ``logps``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    d = ref_logps - logps
    return -d if estimator == "k1" else 0.5 * d * d


def loss_normalizer(mask, loss_type, max_completion_length=None, *, sequence_ids=None):
    """The denominator of the loss, computed from a ``[B, T]`` mask (and ``sequence_ids``) alone.

    * grpo, gspo: number of sequences with at least one token (the ``1/n_i``
      per-sequence weighting is in the numerator, ``policy_loss_sum``);
    * bnpo, dapo, cispo: number of tokens, ``sum_it m_it``;
    * dr_grpo: ``sequences * max_completion_length``, a constant per sequence: the
      sequences are the rows (``B``), or with ``sequence_ids`` the (row, id > 0) pairs
      present, tokens or not, so a packed batch counts its episodes as the unpacked
      batch counts its rows.

    The value is a float32 count (an exact integer), additive over any split of the
    rows, so the normaliser of a full batch is the sum of those of its micro-batches or
    shards. Divide with ``finalize_loss`` (which guards against a zero count).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if jnp.ndim(mask) != 2:
        raise ValueError(f"mask must be [B, T], got shape {jnp.shape(mask)}")
    if sequence_ids is not None and jnp.shape(sequence_ids) != jnp.shape(mask):
        raise ValueError(f"sequence_ids must have the shape of mask {jnp.shape(mask)}, "
                         f"got {jnp.shape(sequence_ids)}")
    segments = _segments(sequence_ids, jnp.shape(mask))
    present_BT = _present(mask, sequence_ids)
    if loss_type in _PER_SEQUENCE_MEAN:
        count = jnp.sum(_sequence_totals(present_BT.astype(jnp.int32), segments) > 0)
    elif loss_type in _TOKEN_MEAN:
        count = jnp.sum(present_BT)
    else:  # dr_grpo
        _check_max_completion_length(max_completion_length)
        if segments is None:
            sequences = jnp.shape(mask)[0]
        else:
            sequences = jnp.sum(_sequence_totals((jnp.asarray(sequence_ids) > 0).astype(jnp.int32),
                                                 segments) > 0)
        count = sequences * max_completion_length
    return jnp.asarray(count, jnp.float32)


def _present(mask, sequence_ids):
    """[B, T] bool: the trained tokens (mask non-zero; packed, also a sequence id > 0)."""
    present_BT = jnp.asarray(mask) != 0
    return present_BT if sequence_ids is None else present_BT & (jnp.asarray(sequence_ids) > 0)


def _segments(sequence_ids, shape):
    """``(ids_BT, T + 1)``: each token's sequence id within its row (clipped to 0..T) and the
    number of ids a row can hold; None without ``sequence_ids`` (each row is one sequence:
    plain row reductions)."""
    if sequence_ids is None:
        return None
    t = shape[1]
    return jnp.clip(jnp.asarray(sequence_ids).astype(jnp.int32), 0, t), t + 1


def _sequence_totals(x_BT, segments):
    """The sum of ``x`` over each sequence: [B] (rows), or [B, T + 1] (row, sequence id), a
    segment sum within each row (so rows stay where the batch's sharding puts them)."""
    if segments is None:
        return jnp.sum(x_BT, axis=-1)
    ids_BT, count = segments
    return jax.vmap(lambda x, ids: jax.ops.segment_sum(x, ids, num_segments=count))(x_BT, ids_BT)


def _per_token(totals, segments):
    """Per-sequence values back on their tokens: [B, 1] (rows) or [B, T]."""
    return totals[:, None] if segments is None else jnp.take_along_axis(totals, segments[0], axis=1)


def finalize_loss(loss_sum, normalizer):
    """``loss_sum / max(normalizer, 1)``: a batch with no tokens has loss 0, not NaN."""
    return loss_sum / jnp.maximum(normalizer, 1.0)


def policy_loss(logps, old_logps, advantages, mask, *, ref_logps=None, loss_type="grpo",
                epsilon=0.2, epsilon_high=None, delta=None, beta=0.0,
                max_completion_length=None, importance_sampling_level="token",
                sampler_logps=None, tis_cap=None, cispo_clip_low=False, sequence_ids=None,
                kl_estimator="k3", tis_mode="truncate", tis_level="token", entropy=None,
                entropy_coef=0.0, high_entropy_fraction=None):
    """The GRPO-family policy loss of one batch, and its metrics.

    Args:
      logps: ``[B, T]`` log pi_theta of the sampled tokens (the differentiated input).
      old_logps: ``[B, T]`` log pi_old of the same tokens (the policy that sampled
        them, as recomputed by the trainer); treated as constant.
      advantages: ``[B]`` one advantage per row (``group_advantages``), or ``[B, T]``
        per token (constant over each sequence's tokens: a packed batch).
      mask: ``[B, T]`` float or bool; non-zero exactly on the model's own
        completion tokens. Masked positions may hold anything (even NaN or
        -inf): they are replaced before any arithmetic and get zero gradient.
      ref_logps: ``[B, T]`` log pi_ref, for the KL penalty and the ``kl`` metric.
      loss_type: one of ``LOSS_TYPES``, see below.
      epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]``;
        ``epsilon_high=None`` means ``epsilon`` (DAPO's clip-higher sets it above
        ``epsilon``, e.g. 0.28). For cispo ``epsilon_high`` is required.
      delta: INTELLECT-2 two-sided clipping (Prime Intellect 2025): the ratio in
        the unclipped term is capped, ``min(r, delta)``, so a token with a
        negative advantage and a huge ratio cannot produce an unbounded update.
        Needs ``delta > 1 + epsilon_high``; not used by cispo (its weight is
        already capped).
      beta: weight of the per-token KL penalty (``kl_estimator``: k1, k2 or k3 of
        ``kl_estimate``, k3 by default); needs ``ref_logps`` when positive.
      max_completion_length: the constant ``L`` of dr_grpo (required there).
      importance_sampling_level: "token" (PPO/GRPO ratio per token) or
        "sequence" (GSPO's length-normalised sequence ratio, for any loss type).
        loss_type="gspo" always uses "sequence".
      sampler_logps: ``[B, T]`` log-probs reported by the sampler (inference
        engine) for the same tokens.
      tis_cap: the cap ``C`` of the importance weight that corrects the sampler/trainer
        mismatch: with it, the policy-gradient term of each token is multiplied by ``w_it``
        (``importance_weights``; ``tis_mode``, ``tis_level``). ``sampler_logps`` without
        ``tis_cap`` changes nothing (correction off); ``tis_cap`` without it is an error.
      tis_mode: "truncate": truncated importance sampling (TIS; Yao et al. 2025, "Your
        efficient RL framework secretly brings you off-policy RL training"),
        ``w = sg(min(rho, C))``; "mask": masked importance sampling (MIS; Liu et al. 2025,
        "When speed kills stability"), ``w = sg(rho 1[rho <= C])``: no policy-gradient term
        where the weight exceeds the cap.
      tis_level: "token": ``rho_it = exp(old_it - sampler_it)``; "sequence":
        ``rho_i = exp(sum_t m_it (old_it - sampler_it))``, on every token of sequence ``i``.
      entropy: ``[B, T]`` the policy's entropy ``H_it`` at each scored position (at the
        temperature; differentiable), needed by the two options below; gives the
        ``entropy`` metric.
      entropy_coef: entropy bonus: each token's loss gets ``- entropy_coef H_it`` (gradient
        through ``entropy``), aggregated with the loss type's normalisation.
      high_entropy_fraction: ``rho`` in (0, 1] (Wang et al. 2025, "Beyond the 80/20 rule:
        high-entropy minority tokens drive effective RL for LLM reasoning"): only tokens
        whose ``sg(H_it)`` is at or above the ``1 - rho`` quantile of the trained tokens'
        entropies *in this batch* (in the train step: the micro-batch's; the batch's with one
        micro-batch) carry the policy-gradient term (``high_entropy_mask``); the others
        contribute 0 and the normaliser is unchanged. The KL and entropy terms stay on.
      cispo_clip_low: cispo only; also clip its weight below at ``1 - epsilon``
        (MiniMax-M1 allows this but trained without a lower bound).
      sequence_ids: ``[B, T]`` int, the sequence of each token within its row (k > 0:
        the row's k-th sequence, ids in 1..T; 0: padding, never trained) for rows that
        hold several episodes; None: each row is one sequence. Every ``i`` below is then
        a (row, sequence) pair.

    Objective. With ``r_it`` the ratio, ``A_i`` the advantage, ``m_it`` the mask,
    ``w_it`` the importance weight (1 without ``tis_cap``), ``k_it`` the high-entropy mask
    (1 without ``high_entropy_fraction``) and ``H_it`` the entropy, each token's loss is

        l_it = k_it pg_it + beta kl_it - entropy_coef H_it     (kl: ``kl_estimator``)

        clipped surrogates (grpo, bnpo, dr_grpo, dapo, gspo; PPO, Schulman 2017):
          pg_it = -w_it min(min(r_it, delta) A_i, clip(r_it, 1-eps, 1+eps_high) A_i)
                  (min(r, delta) is just r without delta)
        cispo (MiniMax-M1, 2025):
          pg_it = -w_it sg(min(r_it, 1+eps_high)) A_i log pi_theta(y_it)
          (the weight also clipped below at 1-eps with cispo_clip_low); its
          gradient is the REINFORCE gradient with a truncated, stop-gradient IS
          weight, so clipped tokens still contribute gradient.

    and the loss types aggregate it as

        grpo    (DeepSeekMath, Shao et al. 2024):  (1/|{i: n_i>0}|) sum_i (1/n_i) sum_t m_it l_it
        gspo    (Zheng et al. 2025, GSPO):         same aggregation, sequence-level ratio
        bnpo, dapo (Yu et al. 2025, DAPO), cispo:  sum_it m_it l_it / sum_it m_it
        dr_grpo (Liu et al. 2025, Dr. GRPO):       sum_it m_it l_it / (S * max_completion_length)

    with ``S`` the number of sequences (``B`` rows; packed, every (row, id > 0) pair).

    bnpo and dapo are the same objective: "dapo" names the token-level sum
    meant to be used with clip-higher (``epsilon_high > epsilon``). The KL and
    entropy terms are aggregated with the same normalisation as the loss they are added to.

    Ratios. "token": ``r_it = exp(logp_it - old_logp_it)``. "sequence" (GSPO):
    ``s_i = exp((1/n_i) sum_t m_it (logp_it - old_logp_it))`` and the GSPO-token
    form ``r_it = sg(s_i) exp(logp_it - sg(logp_it))``: its value is ``s_i`` on
    every token and its gradient is ``s_i grad logp_it``. Because the per-token
    weights of all aggregations above are constant within a row, this gives
    exactly GSPO's sequence objective ``min(s_i A_i, clip(s_i) A_i)`` and its
    gradient; only with TIS (token-varying weights) do the two differ, and the
    token form is the one implemented.

    Returns:
      ``(loss, metrics)``: a scalar and a dict of scalars, all masked-token
      averages unless noted: ``clip_ratio/low`` (r < 1-eps with A < 0: the
      lower clip is active), ``clip_ratio/high`` (r > 1+eps_high with A > 0;
      for cispo: the weight is truncated, any advantage), ``clip_ratio/region``
      (either), ``ratio/mean``, ``ratio/min``, ``ratio/max`` (min and max over
      tokens), ``num_tokens`` and ``num_sequences`` (non-empty sequences; counts);
      with ``ref_logps``: ``kl`` (mean k3, reported even when beta is 0); with
      ``delta``: ``clip_ratio/delta`` (r > delta with A < 0); with ``tis_cap``:
      ``tis/weight_mean`` (of ``w``), ``tis/frac_capped`` (tokens with ``rho > C``; at
      sequence level, the tokens of such sequences) and, mode "mask", ``tis/frac_masked``
      (the same tokens, whose weight is 0); with ``entropy``: ``entropy`` (mean ``H``); with
      ``high_entropy_fraction``: ``entropy/kept_frac`` (tokens with ``k = 1``). With no
      tokens every average, min and max is 0.
    """
    loss_sum, metric_sums = policy_loss_sum(
        logps, old_logps, advantages, mask, ref_logps=ref_logps, loss_type=loss_type,
        epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, beta=beta,
        max_completion_length=max_completion_length,
        importance_sampling_level=importance_sampling_level,
        sampler_logps=sampler_logps, tis_cap=tis_cap, cispo_clip_low=cispo_clip_low,
        sequence_ids=sequence_ids, kl_estimator=kl_estimator, tis_mode=tis_mode,
        tis_level=tis_level, entropy=entropy, entropy_coef=entropy_coef,
        high_entropy_fraction=high_entropy_fraction)
    normalizer = loss_normalizer(mask, loss_type, max_completion_length, sequence_ids=sequence_ids)
    return finalize_loss(loss_sum, normalizer), finalize_metrics(metric_sums)


def policy_loss_sum(logps, old_logps, advantages, mask, *, ref_logps=None, loss_type="grpo",
                    epsilon=0.2, epsilon_high=None, delta=None, beta=0.0,
                    max_completion_length=None, importance_sampling_level="token",
                    sampler_logps=None, tis_cap=None, cispo_clip_low=False, sequence_ids=None,
                    kl_estimator="k3", tis_mode="truncate", tis_level="token", entropy=None,
                    entropy_coef=0.0, high_entropy_fraction=None):
    """The numerator of ``policy_loss`` and the metric sums, for accumulation.

    Same arguments and objective as ``policy_loss``. Returns
    ``(loss_sum, metric_sums)`` with ``loss_sum = sum_i c_i sum_t m_it l_it``
    (``c_i = 1/max(n_i, 1)`` for grpo and gspo, else 1; ``i`` a row, or packed a
    (row, sequence id) pair) and ``metric_sums`` the
    un-normalised metrics: sums over tokens for the averages, the min and max
    ratio, and the counts ``num_tokens`` / ``num_sequences``. For any split of
    a batch into row micro-batches ``k``:

        sum_k loss_sum_k / loss_normalizer(full_mask) == policy_loss(full)[0]

    and the same holds for gradients; ``finalize_metrics`` of the ``combine_metric_sums``
    of the parts equals ``policy_loss(full)[1]`` (not with ``high_entropy_fraction``: its
    quantile is each part's own).
    """
    _check_shapes(logps, old_logps, advantages, mask, ref_logps, sampler_logps, sequence_ids, entropy)
    settings = _resolve_settings(
        loss_type, importance_sampling_level, epsilon, epsilon_high, delta, beta,
        max_completion_length, ref_logps is not None, sampler_logps is not None, tis_cap,
        tis_mode=tis_mode, tis_level=tis_level, has_entropy=entropy is not None,
        entropy_coef=entropy_coef, high_entropy_fraction=high_entropy_fraction)
    inputs = [logps, old_logps] + [x for x in (ref_logps, sampler_logps, entropy) if x is not None]
    dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in inputs], jnp.float32)
    present_BT = _present(mask, sequence_ids)
    segments = _segments(sequence_ids, jnp.shape(logps))

    def masked(x_BT):
        # Replace masked positions *before* arithmetic so that NaN / -inf padding can
        # neither leak into the loss nor into the gradient (where's VJP zeroes them).
        return jnp.where(present_BT, jnp.asarray(x_BT).astype(dtype), 0.0)

    logps_BT, old_logps_BT = masked(logps), masked(old_logps)
    advantages_B1 = jnp.asarray(advantages).astype(dtype)
    if advantages_B1.ndim == 1:
        advantages_B1 = advantages_B1[:, None]  # [B, 1] or [B, T]: broadcasts over the tokens
    num_tokens_S = _sequence_totals(present_BT.astype(dtype), segments)
    num_tokens_B1 = _per_token(num_tokens_S, segments)  # n_i on each token of sequence i
    ratio_BT = _ratio(logps_BT, old_logps_BT, num_tokens_B1, segments, settings["sequence_level"])
    tis_weight_BT, raw_tis_BT = 1.0, None
    if settings["use_tis"]:
        tis_weight_BT, raw_tis_BT = importance_weights(
            old_logps_BT, masked(sampler_logps), present_BT, segments, cap=tis_cap, mode=tis_mode,
            level=tis_level)
    token_loss_BT, clip_low_BT, clip_high_BT = _token_loss(
        loss_type, ratio_BT, logps_BT, advantages_B1, tis_weight_BT, epsilon=epsilon,
        epsilon_high=settings["epsilon_high"], delta=delta, cispo_clip_low=cispo_clip_low)
    entropy_BT = None if entropy is None else masked(entropy)
    keep_BT = None
    if high_entropy_fraction is not None:
        keep_BT = high_entropy_mask(entropy_BT, present_BT, high_entropy_fraction)
        token_loss_BT = jnp.where(keep_BT, token_loss_BT, 0.0)  # where: no gradient either
    kl_BT = None if ref_logps is None else kl_estimate(logps_BT, masked(ref_logps), kl_estimator)
    if settings["use_kl"]:
        token_loss_BT = token_loss_BT + beta * kl_BT
    if settings["use_entropy_bonus"]:
        token_loss_BT = token_loss_BT - entropy_coef * entropy_BT

    if loss_type in _PER_SEQUENCE_MEAN:
        row_weight_B1 = 1.0 / jnp.maximum(num_tokens_B1, 1.0)
    else:
        row_weight_B1 = 1.0
    loss_sum = jnp.sum(jnp.where(present_BT, row_weight_B1 * token_loss_BT, 0.0))
    metric_sums = loss_metrics.metric_sums(
        present_BT, num_tokens_S, dtype, ratio_BT, advantages_B1, clip_low_BT, clip_high_BT, kl_BT=kl_BT,
        delta=delta, tis_weight_BT=tis_weight_BT, raw_tis_BT=raw_tis_BT, tis_cap=tis_cap,
        tis_mode=tis_mode, entropy_BT=entropy_BT, keep_BT=keep_BT)
    return loss_sum, metric_sums


def _ratio(logps_BT, old_logps_BT, num_tokens_B1, segments, sequence_level: bool):
    """The importance ratio ``r_it`` of each token (masked positions hold 0 log-probs;
    ``num_tokens_B1``: ``n_i`` on the tokens of sequence i, ``segments``: `_segments`):

        token:     r_it = exp(logp_it - old_logp_it)
        sequence:  r_it = sg(s_i) exp(logp_it - sg(logp_it)),
                   s_i  = exp((1/n_i) sum_t m_it (logp_it - old_logp_it))    (GSPO-token)
    """
    sg = jax.lax.stop_gradient
    log_ratio_BT = logps_BT - old_logps_BT
    if not sequence_level:
        return jnp.exp(log_ratio_BT)
    seq_log_ratio_B1 = (_per_token(_sequence_totals(log_ratio_BT, segments), segments)
                        / jnp.maximum(num_tokens_B1, 1.0))
    return jnp.exp(sg(seq_log_ratio_B1)) * jnp.exp(logps_BT - sg(logps_BT))


def _token_loss(loss_type, ratio_BT, logps_BT, advantages_B1, tis_weight_BT, *, epsilon,
                epsilon_high, delta, cispo_clip_low):
    """Each token's policy-gradient loss, ``w_it`` the TIS weight (or 1):

        clipped surrogates (PPO; min(r, delta) is r without delta):
          l_it = -w_it min(min(r_it, delta) A_i, clip(r_it, 1 - eps, 1 + eps_high) A_i)
        cispo (MiniMax-M1; lower = 1 - eps with cispo_clip_low, else none):
          l_it = -w_it sg(clip(r_it, lower, 1 + eps_high)) A_i log pi_theta(y_it)

    Returns ``(l_BT, clip_low_BT, clip_high_BT)``: where the lower / upper clip is active
    (r < 1 - eps with A < 0 / r > 1 + eps_high with A > 0; cispo: its weight truncated).
    """
    if loss_type == "cispo":
        lower = 1.0 - epsilon if cispo_clip_low else -jnp.inf
        is_weight_BT = jax.lax.stop_gradient(jnp.clip(ratio_BT, lower, 1.0 + epsilon_high))
        loss_BT = -tis_weight_BT * is_weight_BT * advantages_B1 * logps_BT
        clip_high_BT = ratio_BT > 1.0 + epsilon_high
        if cispo_clip_low:
            return loss_BT, ratio_BT < 1.0 - epsilon, clip_high_BT
        return loss_BT, jnp.zeros(ratio_BT.shape, bool), clip_high_BT
    unclipped_ratio_BT = ratio_BT if delta is None else jnp.minimum(ratio_BT, delta)
    clipped_ratio_BT = jnp.clip(ratio_BT, 1.0 - epsilon, 1.0 + epsilon_high)
    surrogate_BT = jnp.minimum(unclipped_ratio_BT * advantages_B1, clipped_ratio_BT * advantages_B1)
    clip_low_BT = (ratio_BT < 1.0 - epsilon) & (advantages_B1 < 0)
    clip_high_BT = (ratio_BT > 1.0 + epsilon_high) & (advantages_B1 > 0)
    return -tis_weight_BT * surrogate_BT, clip_low_BT, clip_high_BT


def importance_weights(old_logps_BT, sampler_logps_BT, present_BT, segments, *, cap, mode="truncate",
                       level="token"):
    """The stop-gradient importance weight of each token, correcting for sampling from the
    sampler (inference engine) instead of pi_old, and the raw ratio ``rho`` it comes from:

        token:     rho_it = exp(old_it - sampler_it)
        sequence:  rho_i  = exp(sum_t m_it (old_it - sampler_it)), on each token of sequence i
        truncate (TIS, Yao et al. 2025):  w = min(rho, C)
        mask (MIS, Liu et al. 2025):      w = rho 1[rho <= C]    (0 where rho exceeds the cap)

    Inputs hold 0 off ``present_BT`` (a sequence's sum is then over its tokens); ``segments``:
    `_segments`. Returns ``(w, rho)``, ``[B, T]`` (or ``[B, 1]``: sequence level, unpacked).
    """
    log_rho_BT = jnp.where(present_BT, old_logps_BT - sampler_logps_BT, 0.0)
    if level == "sequence":
        log_rho_BT = _per_token(_sequence_totals(log_rho_BT, segments), segments)
    rho_BT = jax.lax.stop_gradient(jnp.exp(log_rho_BT))
    if mode == "mask":
        return jnp.where(rho_BT > cap, 0.0, rho_BT), rho_BT
    return jnp.minimum(rho_BT, cap), rho_BT


def high_entropy_mask(entropy_BT, present_BT, fraction):
    """[B, T] bool: the present tokens whose stop-gradient entropy is at or above the
    ``1 - fraction`` quantile of the present tokens' entropies (linear interpolation between
    order statistics, numpy's default), as in Wang et al. 2025 ("Beyond the 80/20 rule"): the
    top ``fraction`` of the tokens by entropy (ties at the threshold kept)."""
    h_BT = jax.lax.stop_gradient(jnp.asarray(entropy_BT)).astype(jnp.float32)
    sorted_N = jnp.sort(jnp.where(present_BT, h_BT, jnp.inf).reshape(-1))  # present ones first
    last = jnp.maximum(jnp.sum(present_BT, dtype=jnp.int32) - 1, 0)
    position = (1.0 - fraction) * last.astype(jnp.float32)
    # float32 rounding of (1 - rho) (n - 1) must not lift an exact order statistic above itself
    snap = jnp.abs(position - jnp.round(position)) < 1e-6 * jnp.maximum(position, 1.0)
    position = jnp.where(snap, jnp.round(position), position)
    lo = jnp.floor(position).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, last)
    frac = position - lo.astype(jnp.float32)
    threshold = jnp.where(frac > 0, sorted_N[lo] + frac * (sorted_N[hi] - sorted_N[lo]), sorted_N[lo])
    return present_BT & (h_BT >= threshold)


def mismatch_sums(trainer_logps, sampler_logps, mask, sequence_ids=None):
    """The sampler/trainer gap on the trained tokens as token sums (arrays of any one shape,
    e.g. ``[B, T]``; additive over micro-batches, ``finalize_metrics`` makes them means):

        mismatch/logp_abs_diff = sum_t |d_t|,    d_t = log pi_trainer(y_t) - log pi_sampler(y_t)
        mismatch/kl            = sum_t exp(d_t) - d_t - 1

    the second's mean the k3 estimate (Schulman 2020) of KL(pi_sampler || pi_trainer) from the
    sampled tokens (drawn from the sampler). Both 0 exactly when the two agree; no gradient.
    """
    present = _present(mask, sequence_ids)
    d = jax.lax.stop_gradient(jnp.where(present, jnp.asarray(trainer_logps, jnp.float32)
                                        - jnp.asarray(sampler_logps, jnp.float32), 0.0))
    return {"mismatch/logp_abs_diff": jnp.sum(jnp.abs(d)), "mismatch/kl": jnp.sum(jnp.exp(d) - d - 1.0)}


def mismatch_metrics(trainer_logps, sampler_logps, mask, sequence_ids=None):
    """``mismatch_sums`` as means over the trained tokens (0 without any)."""
    count = jnp.maximum(jnp.sum(_present(mask, sequence_ids)), 1).astype(jnp.float32)
    return {k: v / count for k, v in mismatch_sums(trainer_logps, sampler_logps, mask, sequence_ids).items()}
