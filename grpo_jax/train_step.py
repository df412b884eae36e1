"""The compiled GRPO train step: `(state, batch) -> (state, metrics)`, sharded and donated.

Its settings (`TrainConfig`) and batch checks (`prepare_batch`) are in `grpo_jax.train_inputs`,
its state (`TrainState`, `init_train_state`) in `grpo_jax.train_state`; both re-exported here.

Batch (a dict of arrays; `B` rows, `T` token positions, all `[B, T]` unless noted):

    tokens        int32    prompt + completion (+ environment turns) of each row
    positions     int32    RoPE positions (optional: 0..T-1)
    segment_ids   int32    0 on padding, > 0 on real tokens (optional: all 1); attention never
                           crosses segments
    sequence_ids  int32    optional, packed rows (`grpo_jax.packing`): k > 0 on the tokens of the
                           row's k-th episode (each a loss sequence; an episode may span several
                           attention segments), 0 on padding; absent: each row is one sequence.
                           A sequence needs 2 tokens: its first is never scored
    loss_mask     float32  1 where tokens[t] was sampled by the policy and is trained on;
                           0 on prompt, padding and environment tokens (position 0 and each
                           sequence's first token never count)
    old_logps     float32  the sampler's log pi_old(tokens[t]) (0 where loss_mask is 0);
                           optional when `use_sampler_logps_as_old=False` and no TIS
    advantages    float32  [B], one per row (`grpo_jax.grpo.group_advantages`), or [B, T] per
                           token (packed rows: each episode's advantage on its tokens)

The logits at position t score token t + 1, so the step shifts once: targets are tokens[:, 1:],
scored from the hidden states [:, :-1], and the mask and log-probs used are [:, 1:]. Log-probs
are `log softmax(z / temperature)` over the full vocabulary, computed in vocabulary chunks
(`grpo_jax.models.logprobs.token_logprobs`) so the [B, T, V] float32 logits never exist; with the
sampler's temperature they are exactly the sampler's log-probs, and the ratio is 1 on-policy.

One step, for `mu = num_iterations` (DeepSeekMath's GRPO iteration, Shao et al. 2024) and
`M = num_mini_batches` (PPO's mini-batches: rows m, m + M, ... form mini-batch m):

    ref   = log pi_ref(batch)                       once, forward only, only when beta > 0
    old   = batch.old_logps                         use_sampler_logps_as_old=True, or
            sg(log pi_theta_0(batch))               the policy at the start of the step
    repeat mu times:                                (lax.scan)
        for each mini-batch b (M updates):          (lax.scan)
            g = sum_{k in b} grad_theta policy_loss_sum(micro_k) / loss_normalizer(b's mask)
            theta, opt_state = optimizer(g, theta, opt_state)

The micro-batch sum reproduces the full-batch loss and gradient exactly (`grpo_jax.grpo`'s
(sum, count) normalisation, per (row, sequence id) in packed rows), so accumulation changes
memory, not the update, and a packed batch gives the update of its episodes unpacked. When old log-probs
are recomputed with M = 1, the first iteration uses `sg(logps)` of its own forward pass (so the
ratio is exactly 1 and no extra forward is spent) and keeps those log-probs as `old` for the
others; with M > 1 every mini-batch needs pi_theta_0, but the first update moves theta, so one
forward pass over the batch computes them before it (it also gives the gap metrics below).
With `tis_cap` the batch's `old_logps` are the sampler's and the policy term is reweighted by
importance sampling (`tis_mode`, `tis_level`: see `grpo_jax.grpo.policy_loss`).

Micro-batch k holds every n-th row of its mini-batch (`grpo_jax.minibatch`): a strided split
keeps every part spread evenly over the devices that hold the batch rows.

Metrics (device scalars; fetch them one step late): `loss`, `grad_norm` (global norm before
clipping), `lr` (of the latest update, when the optimizer injects it), `entropy` (masked-token
mean of the policy's entropy at the temperature), `kl` (beta > 0), the policy metrics of
`grpo_jax.grpo.policy_loss` (`clip_ratio/...`, `ratio/...`, `tis/...`, `entropy/kept_frac`),
`num_tokens`, `num_sequences`; whenever the batch has `old_logps` (the sampler's),
`mismatch/logp_abs_diff` and `mismatch/kl` (`grpo.mismatch_sums`: the gap between the sampler
and the policy before any update of the step, from the first forward pass: no extra one with
M = 1). Every metric is the mean over the mu x M updates (`ratio/min`, `ratio/max`: the extreme
over them; the counts: the batch's; `mismatch/*`: theta_0's); with one update, that update's.
The entropy options (`entropy_coef`, `high_entropy_fraction`) act per micro-batch: the top-entropy
quantile is over each micro-batch's trained tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from grpo_jax import grpo, minibatch
from grpo_jax import sharding as sharding_lib
from grpo_jax.models.logprobs import loss_columns, token_logprobs_at
from grpo_jax.optim import current_learning_rate, keep_state_dtypes
from grpo_jax.train_inputs import TrainConfig, prepare_batch  # noqa: F401 (re-export)
from grpo_jax.train_state import (TrainState, _replicated, _tree_shardings,  # noqa: F401 (re-export)
                                  init_train_state, split_params, train_state_shardings)

_to_micro = minibatch.to_micro  # re-export (benchmarks/grpo_step.py)


# ---------------------------------------------------------------------------------------------
# The loss of one micro-batch.
# ---------------------------------------------------------------------------------------------
def scored_columns(micro: Mapping[str, jax.Array], cfg: TrainConfig):
    """[B, K] columns of the shifted [B, T - 1] arrays where the output head runs (each row's
    loss positions first, `models.logprobs.loss_columns`), or None for all of them."""
    mask = micro.get("mask")
    if cfg.max_loss_tokens is None or mask is None or cfg.max_loss_tokens >= mask.shape[1]:
        return None
    return loss_columns(mask, cfg.max_loss_tokens)


def score_tokens(model, micro: Mapping[str, jax.Array], cfg: TrainConfig, *, return_entropy=False,
                 fuse: bool = False, mesh=None):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) at the temperature: [B, T - 1] (and entropy);
    0 outside the loss positions when `cfg.max_loss_tokens` applies (`scored_columns`)."""
    hidden_BTD = model.hidden_states(micro["tokens"], micro["positions"], micro["segment_ids"], fuse=fuse,
                                     mesh=mesh)
    return token_logprobs_at(hidden_BTD[:, :-1], model.unembedding(), micro["tokens"][:, 1:],
                             scored_columns(micro, cfg), temperature=cfg.temperature,
                             chunk_size=cfg.chunk_size, return_entropy=return_entropy)


def loss_from_hidden(hidden_BTD, unembed_VD, micro: Mapping[str, jax.Array], cfg: TrainConfig, *,
                     normalizer, old_logps_BT=None, ref_logps_BT=None, use_current_as_old=False):
    """`policy_loss_sum(micro) / normalizer` from the model's final hidden states.

    Args:
      hidden_BTD: final-normed hidden states of the micro-batch [B, T, D].
      unembed_VD: the output projection [V, D] (`Transformer.unembedding()`).
      micro: a `prepare_batch`ed micro-batch (`mask`, `sampler_logps` already shifted to [B, T - 1]).
      normalizer: `grpo.loss_normalizer` of the mini-batch's mask (the full batch's when M = 1).
      old_logps_BT: [B, T - 1] old log-probs; None means `sg(logps)` (the current policy).
      use_current_as_old: traced bool; where true, `sg(logps)` replaces `old_logps_BT`.

    Returns `(loss, (metric_sums, logps_BT))`; the metric sums include `entropy` and, when
    `micro` has `sampler_logps` and M = 1, `grpo.mismatch_sums` of these log-probs.
    """
    logps_BT, entropy_BT = token_logprobs_at(
        hidden_BTD[:, :-1], unembed_VD, micro["tokens"][:, 1:], scored_columns(micro, cfg),
        temperature=cfg.temperature, chunk_size=cfg.chunk_size, return_entropy=True)
    current = jax.lax.stop_gradient(logps_BT)
    if old_logps_BT is None:
        old_BT = current
    else:
        old_BT = jnp.where(use_current_as_old, current, old_logps_BT)
    mask_BT = micro["mask"]
    tis = cfg.tis_cap is not None
    # The entropy enters the loss (bonus, top-entropy mask) only when asked: else a metric only.
    uses_entropy = cfg.entropy_coef != 0 or cfg.high_entropy_fraction is not None
    loss_sum, metric_sums = grpo.policy_loss_sum(
        logps_BT, old_BT, micro["advantages"], mask_BT, ref_logps=ref_logps_BT,
        loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        delta=cfg.delta, beta=cfg.beta, kl_estimator=cfg.kl_estimator, max_completion_length=cfg.max_completion_length,
        importance_sampling_level=cfg.importance_sampling_level,
        sampler_logps=micro["sampler_logps"] if tis else None, tis_cap=cfg.tis_cap,
        cispo_clip_low=cfg.cispo_clip_low, sequence_ids=micro.get("sequence_ids"),
        tis_mode=cfg.tis_mode, tis_level=cfg.tis_level, entropy=entropy_BT if uses_entropy else None,
        entropy_coef=cfg.entropy_coef, high_entropy_fraction=cfg.high_entropy_fraction)
    if not uses_entropy:
        metric_sums["entropy"] = jnp.sum(jnp.where(mask_BT != 0, jax.lax.stop_gradient(entropy_BT), 0.0))
    if "sampler_logps" in micro and cfg.num_mini_batches == 1:  # M > 1: from the step's first forward
        metric_sums.update(grpo.mismatch_sums(current, micro["sampler_logps"], mask_BT, micro.get("sequence_ids")))
    return loss_sum / normalizer, (metric_sums, current)


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------
def _check_loss_tokens(loss_mask, max_loss_tokens):
    """A host (numpy) mask with a row of more than `max_loss_tokens` loss tokens would lose some
    of them silently: raise. Device arrays are not read back (no sync in the step's path)."""
    if max_loss_tokens is None or not isinstance(loss_mask, np.ndarray) or loss_mask.ndim != 2:
        return
    most = int((loss_mask[:, 1:] != 0).sum(axis=1).max(initial=0))
    if most > max_loss_tokens:
        raise ValueError(f"a row has {most} loss tokens, more than max_loss_tokens="
                         f"{max_loss_tokens}: raise it (or None) so none is dropped")


def make_train_step(model: nnx.Module, optimizer: optax.GradientTransformation, cfg: TrainConfig,
                    *, mesh=None, rules=sharding_lib.DEFAULT_RULES,
                    compiler_options: Mapping[str, Any] | None = None) -> "TrainStep":
    """Builds the `TrainStep` `step(state, batch, ref_params=None) -> (state, metrics)`, one `jax.jit`.

    Args:
      model: the policy's `Transformer` (may be abstract: only its structure is used).
      optimizer: e.g. `grpo_jax.optim.make_optimizer(...)`; the state from `init_train_state`.
      cfg: a `TrainConfig`.
      mesh: with a mesh, the state is sharded by logical axes, the batch rows over the `batch`
        axes, metrics replicated; the state is donated (do not reuse the state you pass in).
      rules: logical-axis rules (`grpo_jax.sharding.DEFAULT_RULES`).
      compiler_options: XLA options for this program only, e.g.
        `{"xla_backend_optimization_level": 0}` trades run time for compile time (tests, tiny
        models on CPU, where LLVM's optimisation is most of a 10 s compile).

    `ref_params` (the reference model's `nnx.Param` state, laid out like `state.params`) is
    required when `cfg.beta > 0` and ignored otherwise. The returned function has `.jitted`,
    the underlying jitted function of `(state, batch, ref_params, frozen)` (for `lower`/`compile`;
    `.frozen` is the model's untrained state, `split_params(model)[2]`: the frozen base under
    LoRA adapters, `models.lora`).
    """
    cfg = TrainConfig.from_any(cfg)
    layout = _step_layout(model, optimizer, cfg, mesh, rules)
    graphdef, _, rest = split_params(model)
    body = _StepBody(cfg, optimizer, graphdef, rest,
                     fuse=cfg.fuse_projections and sharding_lib.can_fuse_projections(mesh, rules),
                     constrain_micro=layout.constrain_micro, constrain_grads=layout.constrain_grads, mesh=mesh)
    jitted = jax.jit(body.train_step, donate_argnums=0, compiler_options=compiler_options,
                     **layout.jit_shardings)
    frozen_sh = layout.jit_shardings["in_shardings"][3] if mesh is not None else None
    return TrainStep(jitted, cfg, batch_shards=layout.batch_shards, model=model, frozen_shardings=frozen_sh)


class _StepLayout(NamedTuple):
    """Where the step's arrays live: the sharding constraints of the micro-batches and of the
    gradient accumulator, the devices the batch rows split over, and `jax.jit`'s shardings."""

    constrain_micro: Callable   # [n_micro, mb, ...] -> the same, rows over the batch axes
    constrain_grads: Callable   # gradients -> the same, sharded like the params
    batch_shards: int
    jit_shardings: dict[str, Any]   # in_shardings / out_shardings ({} without a mesh)


def _step_layout(model, optimizer, cfg: TrainConfig, mesh, rules) -> _StepLayout:
    """The `_StepLayout` on `mesh`: state by logical axes, batch rows over the `batch` axes,
    metrics replicated; without a mesh, no constraints and no shardings."""
    if mesh is None:
        return _StepLayout(_identity, _identity, 1, {})
    batch_spec = sharding_lib.logical_to_spec(("batch",), None, mesh, rules)
    state_sh = train_state_shardings(model, optimizer, mesh, rules)
    batch_shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(batch_spec)))

    def constrain_micro(x):  # [n_micro, mb, ...]: rows of each micro-batch over the batch axes
        mb_spec = sharding_lib.logical_to_spec(("batch",), x.shape[1:2], mesh, rules)
        spec = PartitionSpec(None, *mb_spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def constrain_grads(g):
        return jax.lax.with_sharding_constraint(g, state_sh.params)

    batch_sh = NamedSharding(mesh, batch_spec)  # a prefix: rows over the batch axes
    ref_sh = state_sh.params if cfg.beta > 0 else None
    frozen_sh = _tree_shardings(split_params(model)[2], mesh, rules)
    jit_shardings = {"in_shardings": (state_sh, batch_sh, ref_sh, frozen_sh),
                     "out_shardings": (state_sh, _replicated(mesh))}
    return _StepLayout(constrain_micro, constrain_grads, batch_shards, jit_shardings)


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class _StepBody:
    """The traced step, outermost first: `train_step` -> `iteration` (mu times) ->
    `accumulate_grads` (over the micro-batches) -> `micro_loss`. Micro-batched arrays are
    [M, n_micro, mb, ...] (`grpo_jax.minibatch`), one mini-batch's [n_micro, mb, ...]."""

    cfg: TrainConfig
    optimizer: optax.GradientTransformation
    graphdef: Any
    rest: Any
    fuse: bool
    constrain_micro: Callable
    constrain_grads: Callable
    mesh: Any = None   # splash attention runs under shard_map on it (`models.attention`)

    def forward(self, params):
        """The model with these parameters."""
        return nnx.merge(self.graphdef, params, self.rest)

    def train_step(self, state: TrainState, batch, ref_params, frozen):
        """`(state, batch, ref_params, frozen) -> (state, metrics)`; `frozen`: the model's
        state that is not trained (the base weights under LoRA adapters), an argument so that
        the program never holds weights as constants."""
        return dataclasses.replace(self, rest=frozen).step(state, batch, ref_params)

    def step(self, state: TrainState, batch, ref_params):
        """The reference and old log-probs, then mu `iteration`s (the module docstring's step).
        Arrays are laid out [M, n_micro, mb, ...] (`grpo_jax.minibatch`)."""
        cfg = self.cfg
        data = prepare_batch(batch, cfg)
        n_mini, n_micro = minibatch.batch_split(data["tokens"].shape[0], cfg)
        flat = minibatch.to_micro(data, n_mini * n_micro, self.constrain_micro)   # [M * n_micro, mb, ...]
        micro = minibatch.to_mini(flat, n_mini)
        ref_logps = minibatch.to_mini(self.ref_logps(flat, ref_params), n_mini)
        sampler = micro.get("sampler_logps")
        before = None   # log pi_theta_0 (no update yet) where the step computes it up front
        if n_mini == 1:   # today's step: the first iteration's forward gives pi_theta_0
            normalizers = grpo.loss_normalizer(data["mask"], cfg.loss_type, cfg.max_completion_length,
                                               sequence_ids=data.get("sequence_ids"))[None]
        else:   # each mini-batch normalised alone; pi_theta_0 before the first update moves theta
            normalizers = jnp.stack([self.normalizer(jax.tree.map(lambda x: x[m], micro))
                                     for m in range(n_mini)])
            before = minibatch.to_mini(self.policy_logps(flat, state.params), n_mini)
        if cfg.use_sampler_logps_as_old:
            old_logps = sampler
        elif before is not None:
            old_logps = before
        else:  # placeholder, filled by the first iteration's own log-probs
            old_logps = jnp.zeros(micro["mask"].shape, jnp.float32)
        iteration = functools.partial(self.iteration, micro, ref_logps, normalizers)
        (params, opt_state, _), (stats_IM, sums_IMK) = minibatch.scan(
            iteration, (state.params, state.opt_state, old_logps), jnp.arange(cfg.num_iterations),
            cfg.num_iterations)
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key)
        metrics = minibatch.step_metrics(stats_IM, sums_IMK)
        if before is not None and sampler is not None:   # M = 1: in the sums (`loss_from_hidden`)
            metrics.update(grpo.mismatch_metrics(before, sampler, micro["mask"], micro.get("sequence_ids")))
        return new_state, metrics

    def normalizer(self, micro):
        """`grpo.loss_normalizer` of the rows of `micro` ([n_micro, mb, ...])."""
        rows = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
        ids = micro.get("sequence_ids")
        return grpo.loss_normalizer(rows(micro["mask"]), self.cfg.loss_type, self.cfg.max_completion_length,
                                    sequence_ids=None if ids is None else rows(ids))

    def policy_logps(self, micro, params):
        """log pi_theta(micro) with `params`, forward only: [n, mb, T - 1]."""
        policy = self.forward(params)
        return jax.lax.map(lambda m: score_tokens(policy, m, self.cfg, fuse=self.fuse, mesh=self.mesh), micro)

    def ref_logps(self, micro, ref_params):
        """log pi_ref(micro) (forward only, outside the gradient), or None when beta is 0."""
        if not self.cfg.beta > 0:
            return None
        ref_model = self.forward(ref_params)
        return jax.lax.map(lambda m: score_tokens(ref_model, m, self.cfg, fuse=self.fuse, mesh=self.mesh), micro)

    def iteration(self, micro, ref_logps, normalizers, carry, index):
        """One of the mu passes over the batch, `carry = (theta, opt_state, old_logps)`: one
        `update` per mini-batch (lax.scan over M), then, with one mini-batch,

            old = sg(log pi_theta_0)    after the first iteration, when old log-probs are recomputed

        Returns the new carry and `(stats_M, metric_sums_MK)`, the updates' stats and metric sums.
        """
        params, opt_state, old_logps = carry
        first = index == 0
        keeps_sampler_old = self.cfg.use_sampler_logps_as_old
        one_mini = micro["tokens"].shape[0] == 1
        # M > 1 recomputes old log-probs up front (`step`); M = 1 takes them from this forward.
        recompute_old = jnp.logical_and(first, not keeps_sampler_old and one_mini)
        update = functools.partial(self.update, recompute_old)
        (params, opt_state), (stats_M, sums_MK, logps) = minibatch.scan(
            update, (params, opt_state), (micro, old_logps, ref_logps, normalizers), micro["tokens"].shape[0])
        if not keeps_sampler_old and one_mini:
            old_logps = jnp.where(first, logps, old_logps)
        return (params, opt_state, old_logps), (stats_M, sums_MK)

    def update(self, recompute_old, carry, xs):
        """One optimizer update on one mini-batch, `carry = (theta, opt_state)`:

            g = accumulate_grads(theta)     its loss normalised by its own `loss_normalizer`
            theta, opt_state = optimizer(g, theta, opt_state)

        Returns the new carry and `(stats, metric_sums_K, logps)` (stats: loss, grad_norm, lr).
        """
        params, opt_state = carry
        micro, old_logps, ref_logps, normalizer = xs
        grads, (losses_K, sums_K, logps) = self.accumulate_grads(
            params, micro, old_logps, ref_logps, normalizer, recompute_old)
        grad_norm = optax.tree_utils.tree_norm(grads)
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
        opt_state = keep_state_dtypes(new_opt_state, opt_state)
        params = optax.apply_updates(params, updates)
        stats = {"loss": jnp.sum(losses_K), "grad_norm": grad_norm}
        lr = current_learning_rate(opt_state)
        if lr is not None:
            stats["lr"] = jnp.asarray(lr, jnp.float32)
        return (params, opt_state), (stats, sums_K, logps)

    def accumulate_grads(self, params, micro, old_logps, ref_logps, normalizer, recompute_old):
        """The gradient of the full batch's loss, summed micro-batch by micro-batch in float32:

            g = sum_k grad_theta policy_loss_sum(micro_k) / normalizer     (lax.scan over k)

        Returns `(g, (losses_K, metric_sums_K, logps))`, `logps` the current log-probs.
        """
        grad_fn = jax.value_and_grad(self.micro_loss, has_aux=True)

        def accumulate(grads, xs):
            m, old_m, ref_m = xs
            (loss, (sums, logps)), g = grad_fn(params, m, old_m, ref_m, normalizer, recompute_old)
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
            return self.constrain_grads(grads), (loss, sums, logps)

        zeros = self.constrain_grads(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        n_micro = micro["tokens"].shape[0]
        return minibatch.scan(accumulate, zeros, (micro, old_logps, ref_logps), n_micro)

    def micro_loss(self, params, micro, old_BT, ref_BT, normalizer, use_current_as_old):
        """`policy_loss_sum(micro) / normalizer` of the policy with `params` (`loss_from_hidden`)."""
        policy = self.forward(params)
        hidden_BTD = policy.hidden_states(micro["tokens"], micro["positions"], micro["segment_ids"],
                                          fuse=self.fuse, mesh=self.mesh)
        return loss_from_hidden(hidden_BTD, policy.unembedding(), micro, self.cfg,
                                normalizer=normalizer, old_logps_BT=old_BT, ref_logps_BT=ref_BT,
                                use_current_as_old=use_current_as_old)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """`step(state, batch, ref_params=None) -> (state, metrics)`: the host checks (reference
    given when beta > 0, rows split evenly, no row over `max_loss_tokens`), then `jitted`, the
    compiled `(state, batch, ref_params, frozen)` function (for `lower`, `compile`, `jax.export`)."""

    jitted: Callable
    config: TrainConfig
    batch_shards: int = 1   # devices the batch rows are split over
    model: Any = None       # its untrained state is read at each call (`frozen`)
    frozen_shardings: Any = None

    @property
    def frozen(self):
        """The model's untrained state now (the base under LoRA adapters, updated in place by a
        warm start), `split_params(model)[2]`, placed as the step takes it (a no-op when it is)."""
        rest = split_params(self.model)[2]
        if self.frozen_shardings is None or not jax.tree.leaves(rest):
            return rest
        if isinstance(jax.tree.leaves(rest)[0], jax.ShapeDtypeStruct):  # an abstract model
            return rest
        return jax.device_put(rest, self.frozen_shardings)

    def __call__(self, state: TrainState, batch: Mapping[str, Any], ref_params=None):
        cfg, uses_ref = self.config, self.config.beta > 0
        if uses_ref and ref_params is None:
            raise ValueError(f"beta={cfg.beta} > 0: pass ref_params (the reference model's params)")
        batch = {k: v for k, v in batch.items() if v is not None}
        _check_loss_tokens(batch.get("loss_mask"), cfg.max_loss_tokens)
        rows = jnp.shape(batch["tokens"])[0] if "tokens" in batch else 0
        if rows % self.batch_shards:
            raise ValueError(f"the batch has {rows} rows, not a multiple of the {self.batch_shards} "
                             "devices its rows are split over (the mesh's batch axes)")
        return self.jitted(state, batch, ref_params if uses_ref else None, self.frozen)
