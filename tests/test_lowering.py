"""The accelerator programs, exported from this CPU host with `jax.export` for cuda and tpu.

A tiny bfloat16 model built with each platform's choices (`grpo_jax.platform.choices`) is
exported seven ways: the forward (logits), the train step (beta > 0 so the reference forward is
in, 2 micro-batches), the sampler's prefill and decode (`sampling.programs`), and the rollout
engine's prefill chunk, decode steps and slot copy (`engine.programs`). The exported
StableHLO must be the accelerator's program, not the CPU's:

- no `optimization_barrier` (the CPU form of the weight gradient, `models.dense`, puts one on
  each transposed copy; the CPU-choices train step is checked to carry them, so the test can fail);
- the log-prob vocabulary chunk is the platform's: [.., C] chunk tensors of C = 8192 columns,
  never the CPU's 1024 (the vocabulary is 2 x 8192, so both widths would show as a dimension);
- for cuda the decode loop's body is a loop of `decode_chunk` steps: one more `while` than the
  decode_chunk = 1 program, whose body is a single step (as tpu's is).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from grpo_jax import optim, sampling
from grpo_jax import platform as platform_lib
from grpo_jax import train_step as ts
from grpo_jax.models import ModelConfig, abstract_model

PLATFORMS = ("cuda", "tpu")
ROWS, LENGTH, PROMPTS, PROMPT_LEN = 4, 16, 2, 8
MODEL = ModelConfig(model_type="qwen2", vocab_size=2 * 8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=16, d_ff=128, qkv_bias=True, max_position_embeddings=64, dtype="bfloat16",
                    param_dtype="bfloat16", remat="full")


def model_for(choices) -> ModelConfig:
    return MODEL.replace(cpu_weight_grad=choices.cpu_weight_grad)


def forward_program(choices):
    graphdef, state = nnx.split(abstract_model(model_for(choices)))
    tokens = jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32)
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)), (state, tokens)


def train_step_program(choices):
    model = abstract_model(model_for(choices))
    optimizer = optim.make_optimizer(1e-6)
    cfg = ts.TrainConfig(beta=0.04, micro_batch_size=ROWS // 2, num_iterations=1, chunk_size=choices.logprob_chunk,
                         max_loss_tokens=LENGTH // 2)
    step = ts.make_train_step(model, optimizer, cfg)
    state = jax.eval_shape(lambda: ts.init_train_state(model, optimizer, jax.random.key(0)))
    spec = lambda dtype: jax.ShapeDtypeStruct((ROWS, LENGTH), dtype)  # noqa: E731
    batch = {"tokens": spec(jnp.int32), "positions": spec(jnp.int32), "segment_ids": spec(jnp.int32),
             "loss_mask": spec(jnp.float32), "old_logps": spec(jnp.float32),
             "advantages": jax.ShapeDtypeStruct((ROWS,), jnp.float32)}
    return step.jitted, (state, batch, state.params)


def sampler_programs(choices, decode_chunk=None):
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, prompt_bucket=PROMPT_LEN,
                                  batch_bucket=PROMPTS, stop_token_ids=(1,),
                                  decode_chunk=decode_chunk or choices.decode_chunk)
    return sampling.programs(abstract_model(model_for(choices)), PROMPTS, PROMPT_LEN, cfg)


def engine_programs(choices, decode_chunk=None):
    """The rollout engine's three programs on 4 slots of 32 positions (chunks of 8 tokens)."""
    from grpo_jax.engine import programs as ep
    from grpo_jax.sampling import Layout
    model = abstract_model(model_for(choices))
    a = ep.abstract_args(model, slots=4, capacity=32, chunk=8, prefill_rows=2, layout=Layout())
    chunk = decode_chunk or choices.decode_chunk
    decode = functools.partial(ep.decode_steps, steps=16, chunk=chunk, stop_ids=(1,), filters=(False, True, False),
                               pad_id=0, fuse=True, layout=Layout())
    prefill = functools.partial(ep.prefill_chunk, layout=Layout())
    copy = functools.partial(ep.copy_slots, layout=Layout())
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    return {"engine_decode": (jax.jit(decode, static_argnums=0), (a["graphdef"], a["state"], a["cache"], a["inputs"],
                                                                  a["refill_at"])),
            "engine_prefill": (jax.jit(prefill, static_argnums=0), (a["graphdef"], a["state"], a["cache"],
                                                                    *a["prefill"])),
            "engine_copy": (jax.jit(copy), (a["cache"], i32(4), i32(4), i32()))}


def build(program: str, choices, decode_chunk=None):
    if program.startswith("engine_"):
        return engine_programs(choices, decode_chunk)[program]
    if program == "forward":
        return forward_program(choices)
    if program == "train_step":
        return train_step_program(choices)
    return sampler_programs(choices, decode_chunk)[program]


@functools.lru_cache(maxsize=None)
def exported_text(program: str, platform: str, choices_of: str | None = None, decode_chunk: int | None = None) -> str:
    """StableHLO of `program` exported for `platform`, built with the choices of `choices_of`
    (default: the platform's own)."""
    choices = platform_lib.choices(choices_of or platform)
    jitted, args = build(program, choices, decode_chunk)
    return jax.export.export(jitted, platforms=[platform])(*args).mlir_module()


def dims(text: str, size: int) -> int:
    """How many tensor types have a dimension of `size`."""
    return len(re.findall(rf"tensor<(?:\d+x)*{size}x", text))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("program", ["forward", "train_step", "prefill", "decode", "engine_prefill", "engine_decode",
                                     "engine_copy"])
def test_accelerator_programs_have_no_cpu_barrier(program, platform):
    text = exported_text(program, platform)
    assert "optimization_barrier" not in text


def test_the_cpu_choices_do_put_barriers_in_the_train_step():
    # The check above can fail: the same export with the CPU's choices carries the CPU gradient form.
    assert exported_text("train_step", "cuda", choices_of="cpu").count("optimization_barrier") > 0


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_uses_the_accelerator_log_prob_chunk(platform):
    accelerator, cpu = platform_lib.choices(platform).logprob_chunk, platform_lib.choices("cpu").logprob_chunk
    assert MODEL.vocab_size > accelerator > cpu
    text = exported_text("train_step", platform)
    assert dims(text, accelerator) > 0 and dims(text, cpu) == 0
    cpu_text = exported_text("train_step", platform, choices_of="cpu")
    assert dims(cpu_text, cpu) > 0 and dims(cpu_text, accelerator) == 0


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("program", ["decode", "engine_decode"])
def test_decode_runs_the_platform_decode_chunk_inside_its_loop(platform, program):
    chunk = platform_lib.choices(platform).decode_chunk
    whiles = exported_text(program, platform).count("stablehlo.while")
    single = exported_text(program, platform, decode_chunk=1).count("stablehlo.while")
    assert single >= 1
    if chunk > 1:  # the outer stop-check loop holds an inner loop of `chunk` steps
        assert whiles == single + 1
        assert re.search(rf"stablehlo.constant dense<{chunk}> : tensor<i32>", exported_text(program, platform))
    else:
        assert whiles == single
