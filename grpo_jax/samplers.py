"""What a rollout samples from: a lockstep `Sampler` (one batched call per turn, e.g.
`ModelSampler`) or an `EngineSampler` (the rollout engine); `model_sampler` makes either."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

from grpo_jax.engine import Engine, EngineConfig, GenerationParams
from grpo_jax.sampling import Samples, SamplingConfig, generate, sampling_model


class Sampler(Protocol):
    """What a rollout samples from: `sampler(prompts, key, n, row_ids) -> Samples`, n completions
    per prompt, rows prompt-major. `row_ids` are the global episode ids of the output rows; a
    sampler keys its random draws by them (`grpo_jax.sampling.generate`), so an episode samples
    the same tokens whichever batch, turn-mate or process it is sampled with. `rollout` checks
    `max_new_tokens` against its config and `stop_token_ids` against the chat template."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]

    def __call__(self, prompts: list[list[int]], key, n: int, row_ids: Sequence[int]) -> Samples: ...


SampleFn = Sampler  # the earlier name


@dataclasses.dataclass(frozen=True)
class ModelSampler:
    """The `Sampler` of a model: `grpo_jax.sampling.generate` with `config` (its `n` set per
    call) on `model`, which should be in the sampling form (`model_sampler` makes it)."""

    model: Any
    config: SamplingConfig

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.config.stop_token_ids

    def __call__(self, prompts: list[list[int]], key, n: int, row_ids: Sequence[int] | None = None) -> Samples:
        return generate(self.model, prompts, key, dataclasses.replace(self.config, n=n), row_ids=row_ids)


@dataclasses.dataclass(frozen=True)
class EngineSampler:
    """A rollout's `Engine` and the sampling of its turns."""

    engine: Engine
    params: GenerationParams

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.engine.config.stop_token_ids


def model_sampler(model, sampling_config: SamplingConfig | Mapping[str, Any],
                  engine_config: EngineConfig | Mapping[str, Any] | None = None) -> "ModelSampler | EngineSampler":
    """What `rollout` samples from: with `engine_config`, an `EngineSampler` (the engine's stop
    and pad ids are the sampling config's); else a lockstep `ModelSampler`. Either reads
    `sampling_model(model)`, made here once: every turn of a rollout reads the same
    compute-dtype copy of the weights, which is freed with the sampler."""
    cfg = SamplingConfig.from_any(sampling_config)
    if engine_config is None:
        return ModelSampler(sampling_model(model, gather_weights=cfg.gather_weights), cfg)
    engine_cfg = dataclasses.replace(EngineConfig.from_any(engine_config), stop_token_ids=cfg.stop_token_ids,
                                     pad_id=cfg.pad_id, gather_weights=cfg.gather_weights,
                                     decode_chunk=cfg.decode_chunk)
    return EngineSampler(Engine(model, engine_cfg), GenerationParams.from_sampling(cfg))
