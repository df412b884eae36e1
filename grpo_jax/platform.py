"""Platform choices, made once, on the host, from the config or the devices a run uses.

Code that is traced (the model, the sampler's programs, the train step) never asks JAX which
backend it runs on: a program compiled ahead of time, or exported from a CPU host for `cuda` or
`tpu` (`jax.export`), must be the program that platform runs. Instead the run decides here and
passes plain settings down (`ModelConfig.cpu_weight_grad`, `.attention`, `.kv_layout`,
`.decode_attention`, `TrainConfig.chunk_size`, `SamplingConfig.decode_chunk`), each of which a
user may also set by hand.

| choice | cpu | gpu | tpu | why |
|---|---|---|---|---|
| `cpu_weight_grad` | True | False | False | XLA:CPU runs a token-axis contraction outside its fast matmul library (`models.dense`); cuBLAS and the MXU take transposed operands natively |
| `logprob_chunk` | 1024 | 8192 | 8192 | a [N, 1024] float32 chunk stays in a CPU's cache; accelerators want few, wide matmuls |
| `decode_chunk` | 1 | 16 | 1 | decode steps between stop checks: XLA:GPU copies a `while` predicate to the host every iteration (a sync that exposes every kernel launch), so 16 steps run as one loop of known trip count per check; on CPU and TPU the predicate is evaluated where the loop runs |
| `attention` | xla | cudnn | splash | training attention (`models.attention`): the fused kernels never write the [T, S] scores; XLA:CPU has no such kernel and its GEMMs are fastest on the plain form |
| `kv_layout` | head_major | seq_major | seq_major | `models.kv_cache`: k stored transposed makes the CPU decode a plain GEMM; kernels take [B, S, Hkv, Dh] |
| `decode_attention` | blocked | pallas_gpu | blocked | read only the cache's live part (`models.kv_cache`): a loop over blocks up to the longest live row on CPU/TPU, whose predicate XLA:GPU would copy to the host every iteration, so GPU uses the per-row-length Pallas kernel |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
# jax.Device.platform and jax.export platform names -> ours.
_ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class PlatformChoices:
    platform: str          # one of PLATFORMS
    cpu_weight_grad: bool  # `models.dense`: weight gradient on a transposed copy (XLA:CPU)
    logprob_chunk: int     # vocabulary columns per chunk of `models.logprobs.token_logprobs`
    decode_chunk: int      # sampler decode steps between stop checks
    attention: str         # `ModelConfig.attention`
    kv_layout: str         # `ModelConfig.kv_layout`
    decode_attention: str  # `ModelConfig.decode_attention`

    def model_fields(self) -> dict[str, Any]:
        """The `ModelConfig` fields this platform sets."""
        return {"cpu_weight_grad": self.cpu_weight_grad, "attention": self.attention,
                "kv_layout": self.kv_layout, "decode_attention": self.decode_attention}


_CHOICES = {
    "cpu": PlatformChoices("cpu", cpu_weight_grad=True, logprob_chunk=1024, decode_chunk=1, attention="xla",
                           kv_layout="head_major", decode_attention="blocked"),
    "gpu": PlatformChoices("gpu", cpu_weight_grad=False, logprob_chunk=8192, decode_chunk=16, attention="cudnn",
                           kv_layout="seq_major", decode_attention="pallas_gpu"),
    "tpu": PlatformChoices("tpu", cpu_weight_grad=False, logprob_chunk=8192, decode_chunk=1, attention="splash",
                           kv_layout="seq_major", decode_attention="blocked"),
}


def canonical(name: str) -> str:
    """'cuda' / 'rocm' / 'gpu' -> 'gpu', 'cpu', 'tpu'; anything else raises naming the choices."""
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(f"platform {name!r}: use one of {PLATFORMS} or 'auto' (the run's devices)")
    return _ALIASES[key]


def of_devices(devices: Iterable[Any] | None = None) -> str:
    """The platform of `devices` (default: `jax.devices()`, the devices a run uses)."""
    devices = list(devices if devices is not None else jax.devices())
    kinds = {canonical(d.platform) for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"devices of several platforms {sorted(kinds)}: pick one with `platform`")
    return kinds.pop()


def of_tree(tree) -> str:
    """The platform of the devices holding the arrays of `tree` (e.g. a model's state); the
    default devices' when it holds no placed array."""
    devices = set()
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            devices |= set(sharding.device_set)
    return of_devices(devices or None)


def choices(platform: str = "auto", devices: Iterable[Any] | None = None) -> PlatformChoices:
    """The settings for `platform` ('cpu', 'gpu'/'cuda', 'tpu'), or for the platform of
    `devices` (default: all devices) when it is 'auto'."""
    name = of_devices(devices) if platform in (None, "", "auto") else canonical(platform)
    return _CHOICES[name]
