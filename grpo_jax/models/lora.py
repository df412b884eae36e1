"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

With `ModelConfig.lora_rank = r > 0`, each target projection W ([in, out], flattened) of every
layer gets two trained matrices, A [in, r] and B [r, out], and computes

    y = x W + (alpha / r) (x A) B

`A` starts uniform in +-1/sqrt(in) and `B` at zero (PEFT's initialisation), so a new adapter
changes nothing. The adapters are `LoRAParam`s (a subclass of `nnx.Param`): with adapters,
`trainable(model)` selects them alone, so the train state, its gradients, optimizer moments and
checkpoints hold adapters only, and the base weights stay in the model's other state (frozen).
The reference policy is the base with adapters off (`adapters_off`: B = 0), no second copy.

Applied unmerged in training (two thin matmuls per target; the weight gradient of W is never
formed); the sampler merges them into its per-rollout copy of the weights once (`merged`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (`lora_a_<target>` [L, in, r], `lora_b_<target>` [L, r, out])."""


# The base weights (every parameter but the adapters): what a supervised warm start trains.
BASE = nnx.All(nnx.Param, nnx.Not(LoRAParam))


def target_axes(name: str) -> tuple[str, str]:
    """The logical axes of a target's flattened input and output."""
    return {"wq": ("embed", "q_heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
            "wo": ("q_heads", "embed"), "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"),
            "w_down": ("mlp", "embed")}[name]


def target_sizes(cfg, name: str) -> tuple[int, int]:
    """(in, out) of a target projection, flattened."""
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w_gate": (d, f), "w_up": (d, f),
            "w_down": (f, d)}[name]


def has_adapters(model) -> bool:
    return getattr(model.config, "lora_rank", 0) > 0


def trainable(model):
    """The filter of what training updates: the adapters when the model has them, else every
    `nnx.Param`."""
    return LoRAParam if has_adapters(model) else nnx.Param


def delta(cfg, p, name: str, x, dt):
    """(alpha / r) (x A) B for target `name` of one layer's params `p` (None without adapters);
    x [..., in] -> [..., out] (flattened)."""
    a = p.get(f"lora_a_{name}")
    if a is None:
        return None
    scale = cfg.lora_alpha / cfg.lora_rank
    return (x @ a.astype(dt)) @ (p[f"lora_b_{name}"].astype(dt) * jnp.asarray(scale, dt))


@functools.partial(jax.jit, static_argnums=0)
def merged_layers(cfg, stacked: dict) -> dict:
    """Stacked layer params with W += (alpha / r) A B for every target and the adapters removed."""
    out = {k: v for k, v in stacked.items() if not k.startswith("lora_")}
    scale = cfg.lora_alpha / cfg.lora_rank
    for name in cfg.lora_targets:
        w = stacked[name]
        ab = jnp.einsum("lir,lro->lio", stacked[f"lora_a_{name}"].astype(jnp.float32),
                        stacked[f"lora_b_{name}"].astype(jnp.float32)) * scale
        out[name] = (w.astype(jnp.float32) + ab.reshape(w.shape)).astype(w.dtype)
    return out


def merged(model):
    """A model without adapters whose weights are the base's plus the adapters' product (the
    merged model a sampler reads, or an HF export). The model itself is unchanged."""
    if not has_adapters(model):
        return model
    graphdef, state = _plain_model(type(model), model.config.replace(lora_rank=0))
    new = merged_layers(model.config, model.layers.stacked())
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    def value(path, var):
        if path[0] == "layers" and path[1] in new:
            return var.replace(new[path[1]])
        return var.replace(flat[path].get_value())

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
        lambda kp, v: value(tuple(getattr(k, "key", k) for k in kp), v), state,
        is_leaf=lambda x: isinstance(x, nnx.Variable)))


@functools.lru_cache(maxsize=8)
def _plain_model(model_class, cfg):
    """(graphdef, abstract state) of the model without adapters (made once per config)."""
    return nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(params=0))))


def adapters_off(params):
    """The adapter state with every B zeroed: the base policy (the reference model). A new
    state: the train step donates the one it is given, so nothing is shared with it."""
    def off(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return jnp.zeros_like(x) if any(n.startswith("lora_b_") for n in names) else jnp.copy(x)
    return jax.tree_util.tree_map_with_path(off, params)
