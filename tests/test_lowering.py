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
  decode_chunk = 1 program, whose body is a single step (as tpu's is);
- attention is the platform's kernel (`models.attention`): cuDNN's fused attention in the cuda
  forward and train step (forward and backward), splash's `tpu_custom_call` in tpu's, and the
  Pallas decode-attention kernel (Triton) in the cuda engine's decode step.

cuDNN's version and the GPU generation are probed while tracing; with no GPU here they are
stubbed, and the export is told the custom calls are expected (`DisabledSafetyCheck`).
"""

import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from grpo_jax import optim, sampling
from grpo_jax import platform as platform_lib
from grpo_jax import train_step as ts
from grpo_jax.models import ModelConfig, abstract_model

PLATFORMS = ("cuda", "tpu")
ROWS, LENGTH, PROMPTS, PROMPT_LEN = 4, 128, 2, 8  # splash takes multiples of 128
MODEL = ModelConfig(model_type="qwen2", vocab_size=2 * 8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=16, d_ff=128, qkv_bias=True, max_position_embeddings=64, dtype="bfloat16",
                    param_dtype="bfloat16", remat="full")


def model_for(choices) -> ModelConfig:
    return MODEL.replace(**choices.model_fields())


def forward_program(choices):
    graphdef, state = nnx.split(abstract_model(model_for(choices)))
    tokens = jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32)
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)), (state, tokens)


def train_step_program(choices):
    model = abstract_model(model_for(choices))
    optimizer = optim.make_optimizer(1e-6)
    cfg = ts.TrainConfig(beta=0.04, micro_batch_size=ROWS // 2, num_iterations=1, chunk_size=choices.logprob_chunk,
                         max_loss_tokens=LENGTH // 4)
    step = ts.make_train_step(model, optimizer, cfg)
    state = jax.eval_shape(lambda: ts.init_train_state(model, optimizer, jax.random.key(0)))
    spec = lambda dtype: jax.ShapeDtypeStruct((ROWS, LENGTH), dtype)  # noqa: E731
    batch = {"tokens": spec(jnp.int32), "positions": spec(jnp.int32), "segment_ids": spec(jnp.int32),
             "loss_mask": spec(jnp.float32), "old_logps": spec(jnp.float32),
             "advantages": jax.ShapeDtypeStruct((ROWS,), jnp.float32)}
    return step.jitted, (state, batch, state.params, step.frozen)


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
    from jax._src.cudnn import fused_attention_stablehlo as fa
    choices = platform_lib.choices(choices_of or platform)
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CUSTOM_CALLS]
    with mock.patch.object(fa, "check_cudnn_version", lambda: 91000), \
            mock.patch.object(fa, "check_compute_capability", lambda capability: True):
        jitted, args = build(program, choices, decode_chunk)
        return jax.export.export(jitted, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


CUSTOM_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__gpu$xla.gpu.triton")


def dims(text: str, size: int) -> int:
    """How many tensor types have a dimension of `size`."""
    return len(re.findall(rf"tensor<(?:\d+x)*{size}x", text))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("program", ["forward", "train_step", "prefill", "decode", "engine_prefill", "engine_decode",
                                     "engine_copy"])
def test_accelerator_programs_have_no_cpu_barrier(program, platform):
    text = exported_text(program, platform)
    # The Pallas GPU decode kernel's split-K combine holds one barrier per call (one per layer).
    kernel_barriers = MODEL.n_layers if (program, platform) == ("engine_decode", "cuda") else 0
    assert text.count("stablehlo.optimization_barrier") == kernel_barriers


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


@pytest.mark.parametrize("program", ["forward", "train_step"])
def test_training_attention_is_the_platform_kernel(program):
    cuda, tpu = exported_text(program, "cuda"), exported_text(program, "tpu")
    assert "@__cudnn$fmhaSoftmax(" in cuda and "tpu_custom_call" not in cuda
    assert "tpu_custom_call" in tpu and "cudnn" not in tpu
    if program == "train_step":  # the backward kernels too
        assert "@__cudnn$fmhaSoftmaxBackward(" in cuda
        assert tpu.count("tpu_custom_call") >= 3  # policy forward, its backward, the reference forward
    # The CPU choices keep plain XLA attention: no kernel at all.
    assert "cudnn" not in exported_text(program, "cuda", choices_of="cpu")


def test_cuda_engine_decode_reads_the_cache_with_the_pallas_kernel():
    assert "__gpu$xla.gpu.triton" in exported_text("engine_decode", "cuda")
    # The lockstep sampler's rows have holes (left padding): it keeps XLA attention.
    assert "__gpu$xla.gpu.triton" not in exported_text("decode", "cuda")


def test_sharded_tpu_train_step_runs_splash_per_device():
    """On a mesh the train step runs splash under `shard_map` (rows over data x fsdp, heads over
    tp): a Pallas call on globally sharded arrays would be gathered to every device instead."""
    from grpo_jax.sharding import make_mesh
    mesh = make_mesh(data=2, fsdp=2, tp=2)
    model = abstract_model(model_for(platform_lib.choices("tpu")))
    optimizer = optim.make_optimizer(1e-6)
    cfg = ts.TrainConfig(micro_batch_size=8, chunk_size=8192)
    step = ts.make_train_step(model, optimizer, cfg, mesh=mesh)
    state = jax.eval_shape(lambda: ts.init_train_state(model, optimizer, jax.random.key(0)))
    spec = lambda dtype: jax.ShapeDtypeStruct((8, LENGTH), dtype)  # noqa: E731
    batch = {"tokens": spec(jnp.int32), "positions": spec(jnp.int32), "segment_ids": spec(jnp.int32),
             "loss_mask": spec(jnp.float32), "old_logps": spec(jnp.float32),
             "advantages": jax.ShapeDtypeStruct((8,), jnp.float32)}
    assert "shard_map" in str(step.jitted.trace(state, batch, None, step.frozen).jaxpr)
    text = jax.export.export(step.jitted, platforms=["tpu"])(state, batch, None, step.frozen).mlir_module()
    assert "mhlo.num_partitions = 8" in text and text.count("tpu_custom_call") >= 2
