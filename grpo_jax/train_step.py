"""The compiled GRPO train step: `(state, batch) -> (state, metrics)`, sharded and donated.

Batch (a dict of arrays; `B` rows, `T` token positions, all `[B, T]` unless noted):

    tokens        int32    prompt + completion (+ environment turns) of each row
    positions     int32    RoPE positions (optional: 0..T-1)
    segment_ids   int32    0 on padding, > 0 on real tokens (optional: all 1)
    loss_mask     float32  1 where tokens[t] was sampled by the policy and is trained on;
                           0 on prompt, padding and environment tokens (position 0 never counts)
    old_logps     float32  the sampler's log pi_old(tokens[t]) (0 where loss_mask is 0);
                           optional when `use_sampler_logps_as_old=False` and no TIS
    advantages    float32  [B], one per row (`grpo_jax.grpo.group_advantages`)

The logits at position t score token t + 1, so the step shifts once: targets are tokens[:, 1:],
scored from the hidden states [:, :-1], and the mask and log-probs used are [:, 1:]. Log-probs
are `log softmax(z / temperature)` over the full vocabulary, computed in vocabulary chunks
(`grpo_jax.models.logprobs.token_logprobs`) so the [B, T, V] float32 logits never exist; with the
sampler's temperature they are exactly the sampler's log-probs, and the ratio is 1 on-policy.

One step, for `mu = num_iterations` (DeepSeekMath's GRPO iteration, Shao et al. 2024):

    ref   = log pi_ref(batch)                       once, forward only, only when beta > 0
    old   = batch.old_logps                         use_sampler_logps_as_old=True, or
            sg(log pi_theta_0(batch))               the policy at the start of the step
    repeat mu times:                                (lax.scan)
        g = sum_k grad_theta policy_loss_sum(micro_k) / loss_normalizer(full mask)   (lax.scan)
        theta, opt_state = optimizer(g, theta, opt_state)

The micro-batch sum reproduces the full-batch loss and gradient exactly (`grpo_jax.grpo`'s
(sum, count) normalisation), so accumulation changes memory, not the update. When old log-probs
are recomputed, the first iteration uses `sg(logps)` of its own forward pass (so the ratio is
exactly 1 and no extra forward is spent) and keeps those log-probs as `old` for the others.
With `tis_cap` the batch's `old_logps` are the sampler's and the policy term is reweighted by
truncated importance sampling (see `grpo_jax.grpo.policy_loss`).

Micro-batch k holds rows k, k + n, k + 2n, ... (n micro-batches): a strided split keeps every
micro-batch spread evenly over the devices that hold the batch rows.

Metrics (device scalars; fetch them one step late): `loss`, `grad_norm` (global norm before
clipping), `lr` (of the latest update, when the optimizer injects it), `entropy` (masked-token
mean of the policy's entropy at the temperature), `kl` (beta > 0), the policy metrics of
`grpo_jax.grpo.policy_loss` (`clip_ratio/...`, `ratio/...`), `num_tokens`, `num_sequences`.
Every metric is the mean over the mu inner iterations (`ratio/min`, `ratio/max`: the extreme
over them); with mu = 1 they are those of the one update.
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

from grpo_jax import grpo
from grpo_jax import sharding as sharding_lib
from grpo_jax.models.logprobs import loss_columns, token_logprobs_at
from grpo_jax.optim import current_learning_rate, keep_state_dtypes
from grpo_jax.utils import dataclass_from, is_var

_REQUIRED_KEYS = ("tokens", "loss_mask", "advantages")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of the step (hashable; changing one recompiles)."""

    loss_type: str = "grpo"                   # one of grpo.LOSS_TYPES
    epsilon: float = 0.2                      # clip range low: ratio >= 1 - epsilon
    epsilon_high: float | None = None         # clip range high (None: epsilon); cispo needs it
    delta: float | None = None                # INTELLECT-2 two-sided clip of the ratio, > 1 + eps_high
    beta: float = 0.0                         # k3 KL weight; > 0 needs reference params
    max_completion_length: int | None = None  # dr_grpo's constant L
    # At most this many loss tokens (loss_mask != 0) per row, e.g. max_new_tokens x max_turns:
    # when fewer than the row's positions, the output head runs at each row's first
    # `max_loss_tokens` loss positions only (a row with more raises in `step`). None: everywhere.
    max_loss_tokens: int | None = None
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO)
    temperature: float = 1.0                  # the sampler's temperature (greedy sampling: 1)
    num_iterations: int = 1                   # mu: optimizer updates on each batch
    micro_batch_size: int | None = None       # rows per gradient-accumulation step; None: all
    chunk_size: int | None = None             # vocabulary columns per log-prob chunk; None:
    #                                           `models.logprobs.DEFAULT_CHUNK_SIZE` (runs choose
    #                                           theirs by platform: `grpo_jax.platform`)
    use_sampler_logps_as_old: bool = True     # False: old log-probs from the policy in-step
    tis_cap: float | None = None              # truncated importance sampling cap (needs False above)
    cispo_clip_low: bool = False              # cispo: also clip its weight below at 1 - epsilon
    fuse_projections: bool = True             # q/k/v, gate/up as one matmul each where unsharded

    def __post_init__(self):
        if self.loss_type not in grpo.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {grpo.LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in grpo.IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError("importance_sampling_level must be one of "
                             f"{grpo.IMPORTANCE_SAMPLING_LEVELS}, got {self.importance_sampling_level!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.max_loss_tokens is not None and self.max_loss_tokens < 1:
            raise ValueError(f"max_loss_tokens must be >= 1 or None, got {self.max_loss_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use 1 for greedy samples), got {self.temperature}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.tis_cap is not None and self.use_sampler_logps_as_old:
            raise ValueError("tis_cap corrects the sampler/trainer mismatch: it needs "
                             "use_sampler_logps_as_old=False (old log-probs recomputed in-step)")

    @classmethod
    def from_any(cls, config: "TrainConfig | Mapping[str, Any] | Any") -> "TrainConfig":
        """Accepts a TrainConfig, a dict or a ConfigDict with (a subset of) these fields."""
        return dataclass_from(cls, config, what="train config")


class TrainState(NamedTuple):
    """Everything the step updates. `params` is the `nnx.State` of the model's `nnx.Param`s."""

    params: Any
    opt_state: Any
    step: jax.Array   # int32 scalar: train steps taken
    key: jax.Array    # root key; per-step randomness is fold_in(key, step)


# ---------------------------------------------------------------------------------------------
# State creation and shardings.
# ---------------------------------------------------------------------------------------------
def split_params(model: nnx.Module):
    """`(graphdef, params, rest)` with `params` the `nnx.Param` state (what the step trains)."""
    return nnx.split(model, nnx.Param, ...)


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def _tree_shardings(tree, mesh, rules):
    """Variables by their logical axes; any other leaf (counts, keys, scalars) replicated."""
    def one(x):
        if is_var(x):
            return sharding_lib.named_sharding(mesh, sharding_lib.logical_axes_of(x), x.shape, rules)
        return _replicated(mesh)
    return jax.tree.map(one, tree, is_leaf=is_var)


def train_state_shardings(model: nnx.Module, optimizer: optax.GradientTransformation, mesh,
                          rules=sharding_lib.DEFAULT_RULES) -> TrainState:
    """A `TrainState` of `NamedSharding`s: parameters and optimizer moments by logical axes.

    `model` may be abstract (`grpo_jax.models.abstract_model`). The optimizer state inherits the
    parameters' `nnx.Param` wrappers (optax maps over their values), so its moments carry the
    same logical axes and shard like the parameters.
    """
    _, params, _ = split_params(model)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    return TrainState(params=_tree_shardings(params, mesh, rules),
                      opt_state=_tree_shardings(abstract_opt, mesh, rules),
                      step=_replicated(mesh), key=_replicated(mesh))


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, key, *,
                     mesh=None, rules=sharding_lib.DEFAULT_RULES) -> TrainState:
    """The initial state, born sharded on `mesh` (optimizer state created by a jitted init).

    The state holds a copy of the model's parameters: the step donates (frees) the state's
    buffers, and `model` stays usable. The policy after some steps is
    `nnx.merge(graphdef, state.params, rest)` (`split_params`).
    """
    _, params, _ = split_params(model)
    if mesh is None:
        return _init_state(optimizer, params, key)
    shardings = train_state_shardings(model, optimizer, mesh, rules)
    init = jax.jit(_init_state.__wrapped__, static_argnums=0, out_shardings=shardings)
    return init(optimizer, jax.device_put(params, shardings.params), key)


@functools.partial(jax.jit, static_argnums=0)
def _init_state(optimizer, params, key) -> TrainState:
    # The outputs of a jit are new buffers: the state owns a copy of the parameters.
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key)


# ---------------------------------------------------------------------------------------------
# The loss of one micro-batch.
# ---------------------------------------------------------------------------------------------
def prepare_batch(batch: Mapping[str, jax.Array], cfg: TrainConfig) -> dict[str, jax.Array]:
    """The model inputs [B, T] plus the shifted targets, mask and sampler log-probs [B, T - 1]."""
    missing = [k for k in _REQUIRED_KEYS if k not in batch]
    needs_sampler = cfg.use_sampler_logps_as_old or cfg.tis_cap is not None
    if needs_sampler and batch.get("old_logps") is None:
        missing.append("old_logps")
    if missing:
        raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}")
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T] with T >= 2, got {tokens.shape}")
    b, t = tokens.shape
    for name in ("positions", "segment_ids", "loss_mask", "old_logps"):
        if batch.get(name) is not None and jnp.shape(batch[name]) != (b, t):
            raise ValueError(f"{name} must be [B, T] = {(b, t)} like tokens, got {jnp.shape(batch[name])}")
    if jnp.shape(batch["advantages"]) != (b,):
        raise ValueError(f"advantages must be [B] = {(b,)}, got {jnp.shape(batch['advantages'])}")
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    prepared = {
        "tokens": tokens,
        "positions": jnp.asarray(positions, jnp.int32),
        "segment_ids": jnp.asarray(segment_ids, jnp.int32),
        "mask": jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:],
        "advantages": jnp.asarray(batch["advantages"], jnp.float32),
    }
    if needs_sampler:
        prepared["sampler_logps"] = jnp.asarray(batch["old_logps"], jnp.float32)[:, 1:]
    return prepared


def scored_columns(micro: Mapping[str, jax.Array], cfg: TrainConfig):
    """[B, K] columns of the shifted [B, T - 1] arrays where the output head runs (each row's
    loss positions first, `models.logprobs.loss_columns`), or None for all of them."""
    mask = micro.get("mask")
    if cfg.max_loss_tokens is None or mask is None or cfg.max_loss_tokens >= mask.shape[1]:
        return None
    return loss_columns(mask, cfg.max_loss_tokens)


def score_tokens(model, micro: Mapping[str, jax.Array], cfg: TrainConfig, *, return_entropy=False,
                 fuse: bool = False):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) at the temperature: [B, T - 1] (and entropy);
    0 outside the loss positions when `cfg.max_loss_tokens` applies (`scored_columns`)."""
    hidden_BTD = model.hidden_states(micro["tokens"], micro["positions"], micro["segment_ids"], fuse=fuse)
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
      normalizer: `grpo.loss_normalizer` of the *full* batch's mask.
      old_logps_BT: [B, T - 1] old log-probs; None means `sg(logps)` (the current policy).
      use_current_as_old: traced bool; where true, `sg(logps)` replaces `old_logps_BT`.

    Returns `(loss, (metric_sums, logps_BT))`; the metric sums include `entropy`.
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
    loss_sum, metric_sums = grpo.policy_loss_sum(
        logps_BT, old_BT, micro["advantages"], mask_BT, ref_logps=ref_logps_BT,
        loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        delta=cfg.delta, beta=cfg.beta, max_completion_length=cfg.max_completion_length,
        importance_sampling_level=cfg.importance_sampling_level,
        sampler_logps=micro["sampler_logps"] if tis else None, tis_cap=cfg.tis_cap,
        cispo_clip_low=cfg.cispo_clip_low)
    metric_sums["entropy"] = jnp.sum(jnp.where(mask_BT != 0, jax.lax.stop_gradient(entropy_BT), 0.0))
    return loss_sum / normalizer, (metric_sums, current)


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------
def _to_micro(tree, n_micro: int, constrain):
    """[B, ...] -> [n_micro, B / n_micro, ...] with micro-batch k = rows k, k + n, k + 2n, ..."""
    def split(x):
        b = x.shape[0]
        x = x.reshape((b // n_micro, n_micro) + x.shape[1:])
        return constrain(jnp.swapaxes(x, 0, 1))
    return jax.tree.map(split, tree)


def _scan(body, init, xs, length: int):
    """`lax.scan(body, init, xs)`, or one direct call when length is 1 (no loop for XLA to keep:
    the common mu = 1, one-micro-batch step then compiles like a plain forward + backward)."""
    if length > 1:
        return jax.lax.scan(body, init, xs)
    carry, ys = body(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda y: y[None], ys)


def _reduce_metric_sums(sums_KM: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-micro-batch sums [mu, n_micro] -> finalised metrics [mu] -> means over iterations."""
    reducers = {"sum": jnp.sum, "min": jnp.min, "max": jnp.max}
    per_iteration = {k: reducers[grpo.metric_reduction(k)](v, axis=1) for k, v in sums_KM.items()}
    finals = grpo.finalize_metrics(per_iteration)
    out = {}
    for name, value in finals.items():
        reduction = grpo.metric_reduction(name)
        if name in ("num_tokens", "num_sequences"):
            out[name] = value[0]
        elif reduction == "sum":
            out[name] = jnp.mean(value)
        else:
            out[name] = reducers[reduction](value)
    return out


def projections_unsharded(mesh, rules=sharding_lib.DEFAULT_RULES) -> bool:
    """Whether the head and MLP axes of the weights are unsplit on `mesh`, so that q/k/v and
    gate/up can be concatenated without regathering (see `Transformer.hidden_states(fuse=)`)."""
    if mesh is None:
        return True
    return all(spec == PartitionSpec(None) or spec == PartitionSpec()
               for spec in (sharding_lib.logical_to_spec((axis,), None, mesh, rules)
                            for axis in ("heads", "kv_heads", "mlp")))


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
                    compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """Builds `step(state, batch, ref_params=None) -> (state, metrics)`, one `jax.jit`.

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
    the underlying jitted function of `(state, batch, ref_params)` (for `lower`/`compile`).
    """
    cfg = TrainConfig.from_any(cfg)
    graphdef, _, rest = split_params(model)
    uses_ref = cfg.beta > 0
    keeps_sampler_old = cfg.use_sampler_logps_as_old

    def forward(params):
        return nnx.merge(graphdef, params, rest)

    fuse = cfg.fuse_projections and projections_unsharded(mesh, rules)

    def micro_loss(params, micro, old_BT, ref_BT, normalizer, use_current_as_old):
        policy = forward(params)
        hidden = policy.hidden_states(micro["tokens"], micro["positions"], micro["segment_ids"], fuse=fuse)
        return loss_from_hidden(hidden, policy.unembedding(), micro, cfg, normalizer=normalizer,
                                old_logps_BT=old_BT, ref_logps_BT=ref_BT,
                                use_current_as_old=use_current_as_old)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    if mesh is not None:
        batch_spec = sharding_lib.logical_to_spec(("batch",), None, mesh, rules)
        state_sh = train_state_shardings(model, optimizer, mesh, rules)

        batch_shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(batch_spec)))

        def constrain_micro(x):  # [n_micro, mb, ...]: rows of each micro-batch over the batch axes
            mb_spec = sharding_lib.logical_to_spec(("batch",), x.shape[1:2], mesh, rules)
            spec = PartitionSpec(None, *mb_spec)
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

        def constrain_grads(g):
            return jax.lax.with_sharding_constraint(g, state_sh.params)
    else:
        constrain_micro = constrain_grads = lambda x: x

    def train_step(state: TrainState, batch, ref_params):
        data = prepare_batch(batch, cfg)
        b = data["tokens"].shape[0]
        mb = cfg.micro_batch_size or b
        if b % mb:
            raise ValueError(f"micro_batch_size={mb} must divide the batch size {b}")
        n_micro = b // mb
        normalizer = grpo.loss_normalizer(data["mask"], cfg.loss_type, cfg.max_completion_length)
        micro = _to_micro(data, n_micro, constrain_micro)

        ref_logps = None
        if uses_ref:
            ref_model = forward(ref_params)  # outside grad_fn: no gradient reaches it
            ref_logps = jax.lax.map(lambda m: score_tokens(ref_model, m, cfg, fuse=fuse), micro)
        if keeps_sampler_old:
            old_logps = micro["sampler_logps"]
        else:  # placeholder, filled by the first iteration's own log-probs
            old_logps = jnp.zeros(micro["mask"].shape, jnp.float32)

        def iteration(carry, index):
            params, opt_state, old = carry
            first = index == 0
            recompute_old = jnp.logical_and(first, not keeps_sampler_old)

            def accumulate(grads, xs):
                m, old_m, ref_m = xs
                (loss, (sums, logps)), g = grad_fn(params, m, old_m, ref_m, normalizer, recompute_old)
                grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
                return constrain_grads(grads), (loss, sums, logps)

            zeros = constrain_grads(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            grads, (losses, sums, logps) = _scan(accumulate, zeros, (micro, old, ref_logps), n_micro)
            grad_norm = optax.tree_utils.tree_norm(grads)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            opt_state = keep_state_dtypes(new_opt_state, opt_state)
            params = optax.apply_updates(params, updates)
            if not keeps_sampler_old:
                old = jnp.where(first, logps, old)
            lr = current_learning_rate(opt_state)
            stats = {"loss": jnp.sum(losses), "grad_norm": grad_norm}
            if lr is not None:
                stats["lr"] = jnp.asarray(lr, jnp.float32)
            return (params, opt_state, old), (stats, sums)

        (params, opt_state, _), (stats, sums) = _scan(
            iteration, (state.params, state.opt_state, old_logps), jnp.arange(cfg.num_iterations),
            cfg.num_iterations)
        metrics = _reduce_metric_sums(sums)
        metrics.update({k: jnp.mean(v) for k, v in stats.items() if k != "lr"})
        if "lr" in stats:
            metrics["lr"] = stats["lr"][-1]
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key)
        return new_state, metrics

    if mesh is None:
        jitted = jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options)
    else:
        batch_sh = NamedSharding(mesh, batch_spec)  # a prefix: rows over the batch axes
        ref_sh = state_sh.params if uses_ref else None
        jitted = jax.jit(train_step, in_shardings=(state_sh, batch_sh, ref_sh),
                         out_shardings=(state_sh, _replicated(mesh)), donate_argnums=0,
                         compiler_options=compiler_options)

    def step(state: TrainState, batch: Mapping[str, Any], ref_params=None):
        if uses_ref and ref_params is None:
            raise ValueError(f"beta={cfg.beta} > 0: pass ref_params (the reference model's params)")
        batch = {k: v for k, v in batch.items() if v is not None}
        _check_loss_tokens(batch.get("loss_mask"), cfg.max_loss_tokens)
        rows = jnp.shape(batch["tokens"])[0] if "tokens" in batch else 0
        if mesh is not None and rows % batch_shards:
            raise ValueError(f"the batch has {rows} rows, not a multiple of the {batch_shards} "
                             "devices its rows are split over (the mesh's batch axes)")
        return jitted(state, batch, ref_params if uses_ref else None)

    step.jitted = jitted
    return step
