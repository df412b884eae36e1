r"""Roofline of the GSM8K run's three programs and one attention layer, from XLA's cost analysis, on a CPU host.

    python benchmarks/roofline.py [--presets qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b]
                                  [--prompt-len 256] [--decode-fill 0.6] [--table] [--quick]
    JAX_PLATFORMS=cuda python benchmarks/roofline.py --presets qwen2.5-0.5b   # on a GPU

For each preset (random-weight shapes, abstract: nothing is allocated) and each program, one JSON
line with the FLOPs and bytes of the program XLA compiles, the model-formula FLOPs beside them,
and the compute and memory floors on an H100 / H200 and a TPU v5e chip. Shapes are those of
`configs/gsm8k_qwen2_5_0_5b.py`:

- "attention_layer": one layer's training attention on one train micro-batch (64 rows x 768
  tokens, the preset's heads / KV heads / head_dim, bfloat16), forward + backward, "before"
  (the XLA form compiled) and "after" (a flash kernel's HBM traffic, modelled: see below);
- "train_step": `grpo_jax.train_step` on prompts_per_step x group_size rows (512) of
  prompt_len + max_new_tokens tokens (256 + 512 = 768, within the config's max_seq_len of
  1024), in micro-batches of `grpo.micro_batch_size` (64), beta 0.001 (the reference forward is
  in), full remat, bfloat16 compute on float32 master weights, the output head at the 512 completion positions of each row
  (`max_loss_tokens`, as the trainer sets it), the config's optimizer;
- "prefill": `grpo_jax.sampling.programs`' prefill (on the sampler's bfloat16 copy of the weights) of the step's 64 prompts of `prompt_len`
  tokens, its cache repeated for the 8 samples of each group;
- "decode_step": one step of the decode loop, 512 rows against a cache of
  prompt_len + max_new_tokens (768) slots.

Every program is lowered with the accelerator's platform choices (`grpo_jax.platform`: no CPU
gradient form, 8192-column log-prob chunks, the GPU's 16-step decode chunk) where XLA:CPU can
compile them: attention is compiled in its XLA form (`attention="xla"`: cuDNN's and splash's
flash kernels have no CPU backend) and the decode step reads the whole cache
(`decode_attention="full"`), both corrected below by a model of what the GPU/TPU kernels move
(`platform_choices` records both). Compiled for the CPU here (`JAX_PLATFORMS`, default cpu: set
it to cuda or tpu on an accelerator machine to read that compiler's bytes, attention still in its
XLA form; `compiled_for` says which). How the figures are counted:

- XLA's cost analysis counts a `while` body once. The layer stack is a `lax.scan`, the
  micro-batches and the log-prob vocabulary chunks are scans too: the train step is therefore
  lowered with every scan unrolled (`unrolled_scans`) at 1 and 2 layers x 1 and 2 micro-batches
  and extrapolated bilinearly to L layers x M micro-batches (cost = a + b L + c M + d L M);
  `loops_left` checks that the compiled programs held no loop. Prefill and decode run the layers
  as straight-line code: lowered at 1 and 2 layers and extrapolated linearly. The decode program
  is its `while` loop, counted once: one decode step (its inner 16-step chunk is a loop too).
  The other loops left in prefill and decode (`loops_left`) are threefry's rounds drawing a
  few random words per row: negligible.
- FLOPs from the compiled program are exact (remat recompute, the reference forward, the
  chunked head's recomputation and the shifted last chunk's overlap included). Bytes from an
  XLA:CPU compile are an upper bound for GPU/TPU: CPU fuses less and upcasts bfloat16 to
  float32 around dots (`bytes_xla`). `bytes_min` is a lower bound: every weight read once
  per pass (policy forward, recompute and backward, reference forward, per micro-batch), the
  optimizer's read and write of parameters, gradients and moments, the KV cache written
  (prefill) or read (decode) once; activations not counted.
- `model_flops` (`ModelConfig.flops_per_token`): train step 3x the forward (forward + backward)
  plus 1x for the reference forward when beta > 0, the head at the completion positions only;
  prefill the causal prompt forward and the head at each prompt's last position; a decode step
  one token per row attending to all cache slots plus the head.
- Per device: `compute_floor_s` = flops_xla / peak FLOP/s, `memory_floor_s` = bytes_xla /
  bandwidth (from a CPU compile, an upper bound of the memory floor) and `memory_floor_min_s` = bytes_min /
  bandwidth; `bound` compares the compute floor with the upper memory floor ("compute" is then
  certain) and with the lower one (from an accelerator's compile: with the first only); `projected_mfu` = model_flops / (floor x peak) with floor =
  max(compute floor, memory floor), and `projected_mfu_best` with the lower memory floor.
  A decode step also gets `tokens_per_s_ceiling` = rows / floor.
- Attention, before and after (`attention_layer`): `bytes_xla` / `flops_xla` are those of
  `segment_attention(impl="xla")` and its vjp w.r.t. q, k, v (output and dq, dk, dv from a dO
  argument) compiled at the micro-batch's shape, `bytes_xla_fwd` of the forward alone; the XLA
  form materialises [B, H, T, S] float32 scores (`scores_bytes_removed`: one such tensor, 2.1 GB
  at 0.5B) and writes and reads several per pass. `bytes_flash_fwd` / `bytes_flash_fwd_bwd`
  follow the FlashAttention-2 I/O model (Dao 2023, "FlashAttention-2: Faster Attention with
  Better Parallelism and Work Partitioning", arXiv:2307.08691), in bfloat16: the forward reads
  Q, K, V and writes O and the float32 row log-sum-exp; the backward reads Q, K, V, O, dO, LSE
  and writes dQ, dK, dV; K and V are re-read once per query block (T / 128 passes, block_q 128
  as in cuDNN's and splash-like tiling), everything else once, no causal block skipping (an upper
  bound: causal kernels skip about half of the K/V re-reads). This row's `bytes_min` is the flash
  figure, so its `projected_mfu_best` (= `projected_mfu_flash`) is the flash kernel's.
- `bytes_xla_flash` (train step): `bytes_xla` less, for each layer and micro-batch, the XLA form's
  excess over the flash kernel's for the attention passes the step runs, read from the config:
  one forward-backward, one more forward when the layer is rematerialised (remat "full" or
  "dots": forward, then recompute + backward) and one for the reference model when beta > 0, so
  2 forwards + 1 forward-backward for the GSM8K config (`counted_by` says which). It assumes the
  attention inside the step moves what it moves compiled alone. `projected_mfu_flash` and
  `memory_floor_flash_s` per device use it in place of `bytes_xla`. Still an XLA:CPU upper bound
  for everything but attention.
- Live KV reads (decode step): `bytes_kv_full` is the full cache's read (rows x slots x layers x
  K and V), `bytes_kv_live` the read when on average `--decode-fill` (0.6) of each row's slots
  hold tokens, rounded up to `kv_cache.block_size(slots)` positions (the `blocked` read's block:
  512 for long caches, a quarter of a short one, 192 at 768 slots; the GPU's Pallas kernel reads
  128-position blocks per row, the TPU's `blocked` loop up to the longest live row).
  `tokens_per_s_ceiling_live` (`_best`) = rows / max(compute floor, (bytes_xla (bytes_min) -
  bytes_kv_full + bytes_kv_live) / bandwidth), the compute floor kept at the full cache's.

Timing: on 2 CPU cores 1 min 45 s for the three default presets (most of it the train step's
four compiles per preset). `--table`: a markdown table after the JSON lines. `--quick`: a tiny
model and batch (the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiled for the host's CPU, never run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grpo_jax import components, sampling  # noqa: E402
from grpo_jax import platform as platform_lib  # noqa: E402
from grpo_jax import train_step as ts  # noqa: E402
from grpo_jax.models import PRESETS, ModelConfig, abstract_model, kv_cache  # noqa: E402
from grpo_jax.utils import round_up  # noqa: E402
from benchmarks.attention_bytes import (FLASH_BLOCK_Q, attention_passes, attention_programs,  # noqa: E402
                                        flash_attention_bytes)

CONFIG = os.path.join(ROOT, "configs", "gsm8k_qwen2_5_0_5b.py")
# Datasheet peaks: dense bfloat16 FLOP/s and HBM bytes/s.
DEVICES = {
    "h100": {"flops": 989e12, "bytes": 3.35e12},
    "h200": {"flops": 989e12, "bytes": 4.8e12},
    "tpu_v5e": {"flops": 197e12, "bytes": 819e9},
}
DEFAULT_PRESETS = "qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b"
# --quick: a tiny model (2 log-prob chunks of 512 columns) and batch.
QUICK_MODEL = dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
QUICK_SHAPE = dict(prompts=2, group=4, micro=4, prompt_len=16, new_tokens=16, chunk=512)
def model_shape(name: str) -> ModelConfig:
    if name in PRESETS:
        return PRESETS[name]
    raise SystemExit(f"unknown preset {name!r}; known: {sorted(PRESETS)}")


def gsm8k_config():
    spec = importlib.util.spec_from_file_location("gsm8k_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


# ---------------------------------------------------------------------------------------------
# Counting every loop iteration.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def unrolled_scans():
    """While tracing: every `jax.lax.scan` (and `jax.lax.map`) fully unrolled, so that XLA's cost
    analysis, which counts a `while` body once, counts every iteration. Keep trip counts small."""
    scan, lax_map = jax.lax.scan, jax.lax.map

    def unrolled_scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
        return scan(f, init, xs, length=length, reverse=reverse, unroll=True, **kwargs)

    def unrolled_map(f, xs, **kwargs):
        return unrolled_scan(lambda carry, x: (carry, f(x)), (), xs)[1]

    jax.lax.scan, jax.lax.map = unrolled_scan, unrolled_map
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map = scan, lax_map


def compiled_cost(jitted, args) -> dict:
    """FLOPs, bytes and `while` loops of `jitted.lower(*args)` compiled for the default backend."""
    start = time.perf_counter()
    # LLVM's optimisation (most of an XLA:CPU compile) does not change the HLO cost analysis reads.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    compiled = jitted.lower(*args).compile(options)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "bytes": float(cost["bytes accessed"]),
            "loops": compiled.as_text().count(" while("), "compile_s": time.perf_counter() - start}


def extrapolate(points: dict, layers: int, micro: int | None = None) -> float:
    """cost(L) = a + b L from L = 1, 2; or cost(L, M) = a + b L + c M + d L M from
    L, M in {1, 2} (`points` keyed by L or by (L, M))."""
    if micro is None:
        return points[1] + (layers - 1) * (points[2] - points[1])
    d = points[2, 2] - points[2, 1] - points[1, 2] + points[1, 1]
    b = points[2, 1] - points[1, 1] - d
    c = points[1, 2] - points[1, 1] - d
    a = points[1, 1] - b - c - d
    return a + b * layers + c * micro + d * layers * micro


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# The programs.
# ---------------------------------------------------------------------------------------------
def train_step_program(cfg: ModelConfig, shape: dict, micro_batches: int, optimizer, chunk: int):
    """(jitted, abstract args, optimizer-state bytes) of the train step on `micro_batches`."""
    model = abstract_model(cfg)
    tcfg = ts.TrainConfig(beta=shape["beta"], micro_batch_size=shape["micro"], chunk_size=chunk,
                          max_loss_tokens=shape["new_tokens"], max_completion_length=shape["new_tokens"])
    step = ts.make_train_step(model, optimizer, tcfg)
    state = jax.eval_shape(lambda: ts.init_train_state(model, optimizer, jax.random.key(0)))
    rows, length = shape["micro"] * micro_batches, shape["prompt_len"] + shape["new_tokens"]
    spec = lambda dtype: jax.ShapeDtypeStruct((rows, length), dtype)  # noqa: E731
    batch = {"tokens": spec(jnp.int32), "positions": spec(jnp.int32), "segment_ids": spec(jnp.int32),
             "loss_mask": spec(jnp.float32), "old_logps": spec(jnp.float32),
             "advantages": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    ref = state.params if shape["beta"] > 0 else None
    return step.jitted, (state, batch, ref, step.frozen), tree_bytes(state.opt_state)


def sampling_programs(cfg: ModelConfig, shape: dict, decode_chunk: int):
    scfg = sampling.SamplingConfig(max_new_tokens=shape["new_tokens"], temperature=1.0, n=shape["group"],
                                   prompt_bucket=shape["prompt_len"], batch_bucket=shape["prompts"],
                                   stop_token_ids=(0,), decode_chunk=decode_chunk)
    # The sampler reads a copy of the weights in the compute dtype (`sampling.sampling_model`).
    model = abstract_model(cfg.replace(param_dtype=cfg.dtype))
    return sampling.programs(model, shape["prompts"], shape["prompt_len"], scfg)


def model_figures(cfg: ModelConfig, shape: dict, opt_state_bytes: int) -> dict:
    """Model-formula FLOPs and minimal bytes of each program."""
    d, v, layers = cfg.d_model, cfg.vocab_size, cfg.n_layers
    head = 2 * d * v
    p, new = shape["prompt_len"], shape["new_tokens"]
    length, slots = p + new, p + new
    rows = shape["prompts"] * shape["group"]
    weights = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize  # master weights
    sampled = cfg.num_params() * jnp.dtype(cfg.dtype).itemsize  # the sampler's copy
    kv_bytes = 2 * layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize  # per row and slot
    micro = rows // shape["micro"]
    passes = 3 + (shape["beta"] > 0)  # forward, recompute, backward (+ reference forward)
    # Forward at every position but the head at the completion's only (max_loss_tokens).
    train_forward = cfg.flops_per_token(length) * rows * length - head * rows * (length - new)
    grads = cfg.num_params() * 4  # float32 accumulation
    return {
        "train_step": {
            "flops": (3 + (shape["beta"] > 0)) * train_forward,
            "bytes": micro * passes * weights + micro * 2 * grads + 2 * (weights + opt_state_bytes) + grads},
        "prefill": {
            "flops": shape["prompts"] * (p * (cfg.flops_per_token(p) - head) + head),
            "bytes": sampled + rows * slots * kv_bytes},
        "decode_step": {
            "flops": rows * cfg.flops_per_token(2 * slots),  # attention over all `slots` slots
            "bytes": sampled + rows * slots * kv_bytes},
    }


def roofline(flops_xla: float, bytes_xla: float, bytes_min: float, model_flops: float,
             bytes_are_upper_bound: bool = True) -> dict:
    out = {}
    for name, peak in DEVICES.items():
        compute = flops_xla / peak["flops"]
        memory, memory_min = bytes_xla / peak["bytes"], bytes_min / peak["bytes"]
        floor, floor_best = max(compute, memory), max(compute, memory_min)
        if not bytes_are_upper_bound:  # the accelerator's own compile
            bound = "compute" if compute >= memory else "memory"
        else:  # "compute or memory": the CPU's bytes too pessimistic to tell
            bound = ("compute" if compute >= memory else "memory" if memory_min >= compute
                     else "compute or memory")
        out[name] = {"compute_floor_s": compute, "memory_floor_s": memory, "memory_floor_min_s": memory_min,
                     "bound": bound, "projected_mfu": model_flops / (floor * peak["flops"]),
                     "projected_mfu_best": model_flops / (floor_best * peak["flops"])}
    return out


def rounded(x):
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, float):
        return float(f"{x:.4g}")
    return x


def measure(name: str, shape: dict, config, quick: bool, decode_fill: float = 0.6):
    """One JSON-ready dict per program for preset `name`: "attention_layer", "train_step",
    "prefill", "decode_step".

    The programs are compiled with the GPU's platform choices where XLA:CPU can compile them: of
    `platform.choices("gpu").model_fields()` only `cpu_weight_grad` (False) is taken. Attention
    is compiled in its XLA form (`attention="xla"`: the flash kernels, cuDNN and splash, have no
    CPU backend) and the decode step reads the full cache (`decode_attention="full"`: the cost of
    a full-cache step; "blocked" would also be a loop, counted once); the flash kernels' and the
    live-block reads' bytes are then modelled below (`bytes_xla_flash`, `bytes_kv_live`).
    """
    choices = platform_lib.choices("gpu")
    backend = jax.default_backend()
    chunk = shape.get("chunk") or choices.logprob_chunk
    full = model_shape(name).replace(**(QUICK_MODEL if quick else {}))
    full = full.replace(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                        cpu_weight_grad=choices.cpu_weight_grad, attention="xla", decode_attention="full",
                        max_position_embeddings=max(full.max_position_embeddings,
                                                    shape["prompt_len"] + shape["new_tokens"]))
    rows = shape["prompts"] * shape["group"]
    micro = rows // shape["micro"]
    length = shape["prompt_len"] + shape["new_tokens"]
    model_desc = (f"{full.model_type} d{full.d_model} L{full.n_layers} H{full.n_heads}/{full.n_kv_heads} "
                  f"Dh{full.head_dim} F{full.d_ff} V{full.vocab_size} {full.dtype} (weights {full.param_dtype})")
    platform_choices = {"platform": choices.platform, "cpu_weight_grad": full.cpu_weight_grad,
                        "attention": f"{full.attention} (the GPU's: {choices.attention})",
                        "decode_attention": f"{full.decode_attention} (the GPU's: {choices.decode_attention})",
                        "kv_layout": full.kv_layout, "logprob_chunk": chunk, "decode_chunk": choices.decode_chunk}
    bytes_note = "XLA:CPU bytes: an upper bound for GPU/TPU" if backend == "cpu" else f"XLA:{backend.upper()} bytes"

    # -- One layer's attention, XLA form compiled here, flash form modelled. -------------------
    att = {key: compiled_cost(*prog) for key, prog in attention_programs(full, shape).items()}
    b, h = shape["micro"], full.n_heads
    flash = flash_attention_bytes(b, length, h, full.n_kv_heads, full.head_dim, jnp.dtype(full.dtype).itemsize)
    att_model_flops = 3 * 4 * b * h * length * length * full.head_dim  # QK^T, PV; backward twice the forward
    att_row = {
        "preset": name + (" (quick)" if quick else ""), "program": "attention_layer",
        "shape": f"{b} rows x {length} tokens (one train micro-batch), one layer, forward + backward",
        "model": model_desc, "platform_choices": platform_choices,
        "counted_by": ("bytes_xla / flops_xla: segment_attention(impl='xla') and its vjp w.r.t. q, k, v "
                       "(output and dq, dk, dv from dO) compiled (forward + backward; *_fwd: the forward "
                       "alone); bytes_flash_*: the FlashAttention-2 I/O model (Dao 2023, arXiv:2307.08691): "
                       "forward reads Q, K, V, writes O and the float32 row log-sum-exp; backward reads Q, K, "
                       "V, O, dO, LSE, writes dQ, dK, dV; no [B, H, T, S] scores"),
        "flash_assumption": (f"block_q {FLASH_BLOCK_Q} (cuDNN / splash-like tiling): K and V read once per "
                             f"query block ({flash['kv_passes']} passes), the rest once; no causal block "
                             "skipping (an upper bound for causal kernels)"),
        "loops_left": max(c["loops"] for c in att.values()),
        "compiled_for": backend, "flops_xla": att["fwd_bwd"]["flops"], "flops_xla_fwd": att["fwd"]["flops"],
        "bytes_xla": att["fwd_bwd"]["bytes"], "bytes_xla_fwd": att["fwd"]["bytes"], "bytes_xla_note": bytes_note,
        "bytes_flash_fwd": flash["fwd"], "bytes_flash_fwd_bwd": flash["fwd_bwd"],
        "bytes_xla_over_flash_fwd": att["fwd"]["bytes"] / flash["fwd"],
        "bytes_xla_over_flash_fwd_bwd": att["fwd_bwd"]["bytes"] / flash["fwd_bwd"],
        "scores_bytes_removed": b * h * length * length * 4,
        "scores_note": "one [B, H, T, S] float32 tensor (scores or probabilities); the XLA form writes and "
                       "reads several per pass, the flash kernels none",
        "model_flops": att_model_flops, "bytes_min": flash["fwd_bwd"],
        "flops_xla_over_model": att["fwd_bwd"]["flops"] / att_model_flops,
        "devices": roofline(att["fwd_bwd"]["flops"], att["fwd_bwd"]["bytes"], flash["fwd_bwd"], att_model_flops,
                            bytes_are_upper_bound=backend == "cpu"),
        "compile_s": sum(c["compile_s"] for c in att.values()),
    }
    for device in att_row["devices"].values():  # bytes_min is the flash kernel's
        device["projected_mfu_flash"] = device["projected_mfu_best"]
    yield rounded(att_row)

    # -- The three programs of a GSM8K step. ---------------------------------------------------
    optimizer = components.optimizer(config, config.train.num_steps)
    costs = {"train_step": {}, "prefill": {}, "decode_step": {}}
    opt_bytes = {}
    for layers in (1, 2):
        cfg = full.replace(n_layers=layers)
        for m in (1, 2):
            jitted, args, opt_bytes[layers] = train_step_program(cfg, shape, m, optimizer, chunk)
            with unrolled_scans():
                costs["train_step"][layers, m] = compiled_cost(jitted, args)
        programs = sampling_programs(cfg, shape, choices.decode_chunk)
        for program, key in (("prefill", "prefill"), ("decode_step", "decode")):
            costs[program][layers] = compiled_cost(*programs[key])
    opt_state_bytes = extrapolate(opt_bytes, full.n_layers)
    model = model_figures(full, shape, opt_state_bytes)
    described = {
        "train_step": (f"{rows}x{length} tokens in {micro} micro-batches of {shape['micro']}, beta "
                       f"{shape['beta']}, remat {full.remat}, head at {shape['new_tokens']} positions"),
        "prefill": f"{shape['prompts']} prompts x {shape['prompt_len']} tokens, cache {length} slots x {rows} rows",
        "decode_step": f"{rows} rows x {length} cache slots, one step",
    }
    passes = attention_passes(full.remat, shape["beta"])
    removed_per_layer = sum(n * (att[k]["bytes"] - flash[k]) for k, n in passes.items())
    for program, points in costs.items():
        is_train = program == "train_step"
        pick = lambda k: {lm: c[k] for lm, c in points.items()}  # noqa: E731
        flops = extrapolate(pick("flops"), full.n_layers, micro if is_train else None)
        nbytes = extrapolate(pick("bytes"), full.n_layers, micro if is_train else None)
        loops = sorted(set(pick("loops").values()))
        row = {
            "preset": name + (" (quick)" if quick else ""), "program": program, "shape": described[program],
            "model": model_desc, "platform_choices": platform_choices,
            "counted_by": ("scans unrolled; lowered at 1, 2 layers x 1, 2 micro-batches, extrapolated "
                           f"bilinearly to {full.n_layers} x {micro}" if is_train else
                           f"lowered at 1 and 2 layers, extrapolated linearly to {full.n_layers}"
                           + ("; the decode loop's body (one step) counted once" if program == "decode_step" else "")),
            "loops_left": loops if not is_train else max(loops),
            "compiled_for": backend, "flops_xla": flops, "bytes_xla": nbytes, "bytes_xla_note": bytes_note,
            "model_flops": model[program]["flops"], "bytes_min": model[program]["bytes"],
            "flops_xla_over_model": flops / model[program]["flops"],
            "devices": roofline(flops, nbytes, model[program]["bytes"], model[program]["flops"],
                                bytes_are_upper_bound=backend == "cpu"),
            "compile_s": sum(c["compile_s"] for c in points.values()),
        }
        if is_train:
            removed = full.n_layers * micro * removed_per_layer
            row["attention_bytes_removed"] = removed
            row["bytes_xla_flash"] = nbytes - removed
            policy = "forward, then recompute + backward" if full.remat != "none" else "forward + backward"
            reference = "+ the reference forward" if shape["beta"] > 0 else "no reference forward"
            row["counted_by"] += (
                f"; bytes_xla_flash: bytes_xla less {full.n_layers} layers x {micro} micro-batches x "
                f"({passes['fwd']} attention forward + {passes['fwd_bwd']} forward-backward) x the "
                f"attention_layer row's (bytes_xla - bytes_flash) (remat {full.remat}: {policy}; "
                f"beta {shape['beta']}: {reference})")
            for dev_name, device in row["devices"].items():
                peak = DEVICES[dev_name]
                floor = max(device["compute_floor_s"], row["bytes_xla_flash"] / peak["bytes"])
                device["memory_floor_flash_s"] = row["bytes_xla_flash"] / peak["bytes"]
                device["projected_mfu_flash"] = model[program]["flops"] / (floor * peak["flops"])
        if program == "decode_step":
            kv_per_slot = 2 * full.n_layers * full.n_kv_heads * full.head_dim * jnp.dtype(full.dtype).itemsize
            block = kv_cache.block_size(length)
            live = min(length, round_up(math.ceil(decode_fill * length), block))
            row["bytes_kv_full"] = rows * length * kv_per_slot
            row["bytes_kv_live"] = rows * live * kv_per_slot
            row["kv_live"] = (f"fill {decode_fill}: {decode_fill * length:.0f} of {length} slots per row, read in "
                              f"blocks of {block} (kv_cache.block_size) -> {live} slots; compute floor kept "
                              "at the full cache's")
            saved = row["bytes_kv_full"] - row["bytes_kv_live"]
            for dev_name, device in row["devices"].items():
                peak = DEVICES[dev_name]
                floor = max(device["compute_floor_s"], device["memory_floor_s"])
                floor_best = max(device["compute_floor_s"], device["memory_floor_min_s"])
                device["tokens_per_s_ceiling"] = rows / floor
                device["tokens_per_s_ceiling_best"] = rows / floor_best
                device["tokens_per_s_ceiling_live"] = rows / max(
                    device["compute_floor_s"], (nbytes - saved) / peak["bytes"])
                device["tokens_per_s_ceiling_live_best"] = rows / max(
                    device["compute_floor_s"], (model[program]["bytes"] - saved) / peak["bytes"])
        yield rounded(row)


def markdown_table(rows: list[dict]) -> str:
    """The figures a reader compares, one row per (preset, program)."""
    lines = ["| preset | program | TFLOP (XLA) | TFLOP (model) | GB (XLA) | GB (min) | H100 compute s "
             "| H100 memory s (XLA / min) | H100 bound | H100 MFU (XLA / min bytes) | H100 MFU (flash) "
             "| v5e bound | v5e MFU (XLA / min bytes) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, t = r["devices"]["h100"], r["devices"]["tpu_v5e"]
        flash = f"{h['projected_mfu_flash']:.0%}" if "projected_mfu_flash" in h else "-"
        lines.append(
            f"| {r['preset']} | {r['program']} | {r['flops_xla'] / 1e12:.4g} | {r['model_flops'] / 1e12:.4g} "
            f"| {r['bytes_xla'] / 1e9:.4g} | {r['bytes_min'] / 1e9:.4g} | {h['compute_floor_s']:.3g} "
            f"| {h['memory_floor_s']:.3g} / {h['memory_floor_min_s']:.3g} | {h['bound']} "
            f"| {h['projected_mfu']:.0%} / {h['projected_mfu_best']:.0%} | {flash} | {t['bound']} "
            f"| {t['projected_mfu']:.0%} / {t['projected_mfu_best']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help="comma-separated model shapes (grpo_jax.models.PRESETS, or qwen2.5-1.5b)")
    parser.add_argument("--prompt-len", type=int, default=256,
                        help="tokens per prompt (GSM8K chat prompts rounded to the prompt bucket)")
    parser.add_argument("--table", action="store_true", help="also print a markdown table at the end")
    parser.add_argument("--quick", action="store_true", help="a tiny model and batch (smoke test)")
    parser.add_argument("--decode-fill", type=float, default=0.6,
                        help="average fraction of a row's cache slots that hold tokens during decode "
                             "(bytes_kv_live, tokens_per_s_ceiling_live)")
    args = parser.parse_args(argv)
    if not 0 < args.decode_fill <= 1:
        parser.error(f"--decode-fill {args.decode_fill}: a fraction in (0, 1]")
    config = gsm8k_config()
    if args.quick:
        shape = dict(QUICK_SHAPE)
    else:
        shape = dict(prompts=config.train.prompts_per_step, group=config.rollout.group_size,
                     micro=config.grpo.micro_batch_size, prompt_len=args.prompt_len,
                     new_tokens=config.sampling.max_new_tokens, chunk=None)
        if shape["prompt_len"] + shape["new_tokens"] > config.rollout.max_seq_len:
            parser.error(f"--prompt-len {args.prompt_len} + {shape['new_tokens']} new tokens exceed "
                         f"the config's max_seq_len {config.rollout.max_seq_len}")
    shape["beta"] = config.grpo.beta
    for name in args.presets.split(","):
        model_shape(name)  # fail early on a typo
    rows = []
    for name in args.presets.split(","):
        for row in measure(name, shape, config, args.quick, args.decode_fill):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.table:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
