"""One config object for the decoder families we support, and its HF `config.json` mapping.

Llama 3.x, Qwen2/Qwen2.5 and Qwen3 are the same pre-norm decoder (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) with a few switches:

| family | q/k/v bias | q/k RMSNorm | tied embeddings | RoPE scaling |
|---|---|---|---|---|
| llama (3.x) | no | no | 3.2 small sizes | `llama3` (3.1+) |
| qwen2 (2/2.5) | yes | no | small sizes | none |
| qwen3 | no | yes (per head, before RoPE) | small sizes | none |

`head_dim` is a field of its own (Qwen3 decouples it from `d_model / n_heads`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from grpo_jax.models.lora import LORA_TARGETS
from grpo_jax.utils import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# HF `architectures` entry written by `to_hf_config`.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# What a layer keeps for the backward pass (`ModelConfig.remat`):
#   "none": every intermediate; "dots": the outputs of the weight matmuls (q/k/v, attention output
#   projection, gate/up, down) and the layer input, recomputing attention scores/probabilities and
#   the elementwise ops; "full": the layer input only (the whole layer recomputed).
REMAT_MODES = ("none", "dots", "full")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")   # `models.attention`
KV_LAYOUTS = ("head_major", "seq_major")        # `models.kv_cache`
DECODE_ATTENTIONS = ("full", "blocked", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM. Field names follow the math, HF names in comments."""

    model_type: str = "qwen2"          # 'llama' | 'qwen2' | 'qwen3'
    vocab_size: int = 256               # vocab_size
    d_model: int = 64                   # hidden_size
    n_layers: int = 2                   # num_hidden_layers
    n_heads: int = 4                    # num_attention_heads
    n_kv_heads: int = 2                 # num_key_value_heads
    head_dim: int = 16                  # head_dim (d_model // n_heads unless given)
    d_ff: int = 128                     # intermediate_size
    rms_norm_eps: float = 1e-6          # rms_norm_eps
    rope_theta: float = 10000.0         # rope_theta / rope_parameters.rope_theta
    # RoPE scaling: None, or HF's `rope_scaling` dict ('rope_type': 'linear' | 'llama3', ...);
    # stored as a sorted tuple of items so the config stays hashable (it is static under jit).
    rope_scaling: Mapping[str, Any] | tuple | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False              # attention_bias (llama), always True for qwen2
    qk_norm: bool = False               # qwen3's q_norm / k_norm
    tie_embeddings: bool = False        # tie_word_embeddings
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Numerics (not part of the checkpoint): activations/param storage dtype.
    dtype: str = "float32"              # compute dtype of activations
    param_dtype: str = "float32"        # storage dtype of the weights
    # Rematerialisation of each layer in the backward pass, one of REMAT_MODES (True / False
    # mean "full" / "none"). "dots" stores no [T, T] attention probabilities (the memory
    # planner's estimate for Qwen2.5-7B: 33% / 60% of "none"'s activations at 2048 / 192
    # tokens), and on CPU it also runs the train step faster (fewer stacked residuals to write
    # and read back).
    remat: str = "dots"
    # Platform form of the weight matmuls' gradient (`models.dense`): True for XLA:CPU. Set by
    # the run from `grpo_jax.platform`; same values either way.
    cpu_weight_grad: bool = False
    # Attention implementations and the KV cache's layout, also set by the run from
    # `grpo_jax.platform` (same values up to rounding): `models.attention` and `models.kv_cache`.
    attention: str = "xla"              # training / scoring / first prefill: xla | cudnn | splash
    kv_layout: str = "head_major"       # head_major (k [B, Hkv, Dh, S]) | seq_major ([B, S, Hkv, Dh])
    decode_attention: str = "blocked"   # full | blocked (live blocks only) | pallas_gpu (per-row lengths)
    # LoRA adapters (`models.lora`): rank 0 = none; scale alpha / rank; the projections adapted.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        object.__setattr__(self, "remat", remat_mode(self.remat))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention)")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported; "
                              f"expected one of {SUPPORTED_ROPE_TYPES}")
        for name, allowed in (("attention", ATTENTION_IMPLS), ("kv_layout", KV_LAYOUTS),
                              ("decode_attention", DECODE_ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of {allowed}")
        if isinstance(self.lora_targets, (list, str)):
            targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in targets if t.strip()))
        if self.lora_rank < 0 or (self.lora_rank and not self.lora_alpha > 0):
            raise ConfigError(f"lora_rank must be >= 0 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise ConfigError(f"lora_targets {self.lora_targets}: choose from {LORA_TARGETS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name}={getattr(self, name)!r}: use float32, bfloat16 or float16")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (matches `jax.eval_shape` of the model)."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * self.d_ff + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * layer + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add), attention included.

        Embedding lookups are free; attention scores and values cost 2 * 2 * T * H * Dh per token
        on average over a causal sequence of length `seq_len` (half of the full square).
        """
        d, hd = self.d_model, self.head_dim
        proj = 2 * d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 2 * 3 * d * self.d_ff
        attn = 2 * 2 * self.n_heads * hd * seq_len / 2
        return self.n_layers * (proj + mlp + attn) + 2 * d * self.vocab_size


def remat_mode(remat: bool | str | None) -> str:
    """One of REMAT_MODES from a mode name or a bool (True: "full", False / None: "none")."""
    if remat is None or isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_MODES:
        raise ConfigError(f"remat={remat!r}: use one of {REMAT_MODES} (or True / False)")
    return remat


def _get(hf: Mapping[str, Any], key: str, default: Any = None, *, required: bool = False):
    if key in hf and hf[key] is not None:
        return hf[key]
    if required:
        raise ConfigError(f"config.json has no {key!r} field")
    return default


def _positive_int(hf: Mapping[str, Any], key: str) -> int:
    """A required size field, named when it is missing, not an integer or not positive (before
    anything divides by it)."""
    value = _get(hf, key, required=True)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: {key}={value!r} must be a positive integer")
    return value


def from_hf_config(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """Maps an HF `config.json` dict (transformers 4.x or 5.x layout) to a `ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = hf.get("architectures")
        raise ConfigError(
            f"config.json: model_type={model_type!r} (architectures={archs}) is not supported; "
            f"supported model_type values: {SUPPORTED_MODEL_TYPES}")
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not supported (full attention only)")
    d_model = _positive_int(hf, "hidden_size")
    n_heads = _positive_int(hf, "num_attention_heads")
    # transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
    rope_params = dict(_get(hf, "rope_parameters", {}) or {})
    rope_scaling = dict(_get(hf, "rope_scaling", {}) or {}) or dict(rope_params)
    rope_theta = float(_get(hf, "rope_theta", rope_params.get("rope_theta", 10000.0)))
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    else:
        rope_scaling = {k: v for k, v in rope_scaling.items() if k not in ("rope_theta", "type")}
        rope_scaling["rope_type"] = rope_type
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    cfg = dict(
        model_type=model_type,
        vocab_size=_positive_int(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_positive_int(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=int(_get(hf, "num_key_value_heads", n_heads)),
        head_dim=int(_get(hf, "head_dim", d_model // n_heads)),
        d_ff=_positive_int(hf, "intermediate_size"),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 2048)),
        qkv_bias=True if model_type == "qwen2" else bool(_get(hf, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    if model_type == "llama" and hf.get("mlp_bias"):
        raise ConfigError("config.json: mlp_bias=true is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act!r} is not supported (silu only)")
    cfg.update(overrides)
    return ModelConfig(**cfg)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict transformers needs to load a checkpoint of this model."""
    rope_scaling = cfg.rope_scaling_dict or None
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        # transformers >= 5 reads rope_parameters; older versions read the two fields above.
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(rope_scaling or {"rope_type": "default"})},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if cfg.model_type == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = False
    if cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
        hf["sliding_window"] = None
        hf["max_window_layers"] = cfg.n_layers
        hf["layer_types"] = ["full_attention"] * cfg.n_layers
    if cfg.model_type == "qwen3":
        hf["attention_bias"] = False
    return hf


# Published full-size architectures (from each model's config.json), used by `eval_shape`
# tests and the memory planner. Parameter counts are in tests/test_models_shapes.py.
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
        head_dim=64, d_ff=4864, rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True,
        tie_embeddings=True, eos_token_id=151645, bos_token_id=151643),
    "qwen2.5-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
        head_dim=128, d_ff=8960, rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True,
        tie_embeddings=True, eos_token_id=151645, bos_token_id=151643),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        head_dim=128, d_ff=18944, rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True,
        tie_embeddings=False, eos_token_id=151645, bos_token_id=151643),
    "llama-3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, d_ff=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_embeddings=False, bos_token_id=128000,
        eos_token_id=128001),
    "qwen3-8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8,
        head_dim=128, d_ff=12288, rope_theta=1e6, max_position_embeddings=40960, qk_norm=True,
        tie_embeddings=False, eos_token_id=151645, bos_token_id=151643),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [head_dim // 2] (float32), with the configured scaling applied.

    default: theta^(-2i/d).  linear: divided by `factor`.  llama3 (Llama 3.1 release):
    wavelengths longer than original_ctx / low_freq_factor are divided by `factor`, those shorter
    than original_ctx / high_freq_factor are kept, and the band between is interpolated with
    s = (original_ctx / wavelen - low) / (high - low):  (1 - s) * f / factor + s * f.
    """
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.head_dim))
    scaling = cfg.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return jnp.where(medium, smoothed, scaled)
    return inv
