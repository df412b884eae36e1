"""Memory planner: per-device bytes checked against hand calculations, nothing allocated."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from grpo_jax import config_utils, memory, sharding
from grpo_jax.models import ModelConfig, preset

# Qwen2.5-7B (config.json): L layers, model width D, vocabulary V, H query heads, K KV heads of
# Dh dims, MLP width F. q/k/v biases, untied lm_head.
L, D, V, H, K, DH, F = 28, 3584, 152064, 28, 4, 128, 18944
QWEN_7B_PARAMS = 7_615_616_512

# Parameter groups by how the default rules can shard them ("embed" -> fsdp, "vocab" / "q_heads" /
# "kv_heads" / "mlp" -> tp, "norm" / "layers" / "head_dim" -> never):
EMBEDDINGS = 2 * V * D                         # embed, lm_head     ("vocab", "embed")
ATTN_QO = 2 * L * D * H * DH                   # wq, wo             (.., "embed", "q_heads", ..)
ATTN_KV = 2 * L * D * K * DH                   # wk, wv             (.., "embed", "kv_heads", ..)
MLP = 3 * L * D * F                            # w_gate, w_up, w_down ("embed", "mlp")
BIAS_Q = L * H * DH                            # bq                 ("layers", "q_heads", "head_dim")
BIAS_KV = 2 * L * K * DH                       # bk, bv             ("layers", "kv_heads", "head_dim")
NORMS = D + 2 * L * D                          # final, attn, mlp norms (never sharded)

BF16, F32 = 2, 4
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ADAM_COUNT = 4                                 # optax adam's int32 step counter (replicated)
KV_INDEX = 4                                   # the cache's int32 write index (replicated)


def _plan_7b(mesh, model=None, **kw):
    """bfloat16 weights and compute (no masters); the sampler reads the params themselves."""
    args = dict(param_dtype="bfloat16", optimizer="adamw", optimizer_dtype="float32",
                with_reference=True, reference_dtype="bfloat16", kv_batch=64, kv_length=2048,
                kv_dtype="bfloat16", gather_weights=False, device_memory_gib=80)
    args.update(kw)
    return memory.plan_memory(model or preset("qwen2.5-7b", dtype="bfloat16"), mesh, **args)


def test_parameter_groups_add_up_to_qwen_7b():
    assert EMBEDDINGS + ATTN_QO + ATTN_KV + MLP + BIAS_Q + BIAS_KV + NORMS == QWEN_7B_PARAMS
    assert preset("qwen2.5-7b").num_params() == QWEN_7B_PARAMS


def test_qwen_7b_grpo_fsdp8_matches_hand_calculation():
    """bf16 policy + bf16 reference + float32 AdamW moments + float32 gradients, fsdp=8."""
    live_before = {id(x) for x in jax.live_arrays()}
    plan = _plan_7b("fsdp=8")
    new_bytes = sum(x.nbytes for x in jax.live_arrays() if id(x) not in live_before)
    assert new_bytes < 2 ** 20, "planning must not allocate the model"

    # Every matrix has an `embed` axis of 3584 = 8 * 448 -> split 8 ways over fsdp.
    # Biases and norms have no `embed` axis; their head axes map to tp, which has size 1 here,
    # so they are replicated on every device.
    assert D % 8 == 0
    sharded = EMBEDDINGS + ATTN_QO + ATTN_KV + MLP
    replicated = BIAS_Q + BIAS_KV + NORMS
    assert replicated == 333_312
    per_device_params = sharded // 8 + replicated
    assert per_device_params == 952_243_712

    b = plan.per_device
    assert b["params"] == per_device_params * BF16 == 1_904_487_424            # 1.77 GiB
    assert b["reference"] == per_device_params * BF16
    assert b["gradients"] == per_device_params * F32 == 3_808_974_848          # 3.55 GiB
    assert b["optimizer"] == 2 * per_device_params * F32 + ADAM_COUNT          # mu + nu, 7.09 GiB
    # KV cache: k and v [L, B, S, K, Dh], rows split over fsdp; kv_valid [B, S] bool.
    kv = 2 * L * (64 // 8) * 2048 * K * DH * BF16 + (64 // 8) * 2048 + KV_INDEX
    assert kv == 939_540_484
    assert b["kv_cache"] == kv
    assert b["sampling_weights"] == 0 and "activations" not in b
    # Policy + reference in bf16, gradients + mu + nu in f32: 2 * 2 + 3 * 4 = 16 bytes a parameter.
    total = (2 * BF16 + 3 * F32) * per_device_params + ADAM_COUNT + kv
    assert plan.total == total == 16_175_439_880                              # 15.06 GiB
    # The cache (rollout) and the gradients (train step) are not alive at the same time.
    assert plan.peak == total - kv
    assert plan.fits and plan.num_devices == 8 and not plan.warnings
    # Global sizes are the unsharded arrays.
    assert plan.category_bytes("params", per_device=False) == QWEN_7B_PARAMS * BF16

    table = plan.table()
    assert "1.77 GiB" in table and "7.09 GiB" in table and "fits" in table
    assert json.loads(json.dumps(plan.as_dict()))["per_device_bytes"]["params"] == b["params"]

    # The sampler's copy gathered over fsdp (tp=1): the whole model on every device, alive
    # with the cache during the rollout, which then outweighs the train step.
    gathered = _plan_7b("fsdp=8", gather_weights=True)
    assert gathered.per_device["sampling_weights"] == QWEN_7B_PARAMS * BF16      # 14.19 GiB
    assert gathered.peak == total - b["gradients"] + QWEN_7B_PARAMS * BF16


def test_plan_matches_real_shardings_on_eight_devices():
    """The abstract-mesh shard shapes equal those of NamedShardings on a real 8-device mesh."""
    for axes in ({"fsdp": 8}, {"fsdp": 4, "tp": 2}, {"data": 2, "fsdp": 2, "tp": 2}):
        plan = _plan_7b(axes, kv_batch=12)
        real = sharding.make_mesh(**{"data": 1, "tp": 1, **axes})
        for leaf in plan.leaves:
            named = sharding.named_sharding(real, leaf.logical_axes, leaf.shape)
            assert named.spec == leaf.spec, leaf.name
            itemsize = np.dtype(leaf.dtype).itemsize
            assert leaf.device_bytes == itemsize * math.prod(named.shard_shape(leaf.shape)), leaf.name


def test_fsdp4_tp2_splits_heads_and_kv_heads():
    plan = _plan_7b({"fsdp": 4, "tp": 2})
    # Matrices: embed over fsdp (3584 / 4) and vocab / heads / KV heads (4 / 2) / MLP over tp:
    # 8 ways. Biases: heads over tp only (2 ways). Norms: replicated.
    per_device_params = ((EMBEDDINGS + ATTN_QO + ATTN_KV + MLP) // 8 + (BIAS_Q + BIAS_KV) // 2
                         + NORMS)
    assert per_device_params == 952_179_200
    b = plan.per_device
    assert b["params"] == per_device_params * BF16
    assert b["optimizer"] == 2 * per_device_params * F32 + ADAM_COUNT
    # Rows over fsdp (64 / 4 = 16), KV heads over tp (4 / 2 = 2); kv_valid has no head axis.
    assert b["kv_cache"] == 2 * L * 16 * 2048 * (K // 2) * DH * BF16 + 16 * 2048 + KV_INDEX
    # The sampler's layout: k [B, Hkv, Dh, S] and v [B, Hkv, S, Dh] per layer (`sharding.KV_*`).
    specs = {x.name: x.spec for x in plan.leaves if x.category == "kv_cache"}
    P = jax.sharding.PartitionSpec
    assert specs["k"] == specs["v"] == P(None, "fsdp", "tp", None, None)
    assert specs["kv_valid"] == P("fsdp", None)


def test_float32_masters_and_the_samplers_weights_by_hand():
    """bfloat16 compute on float32 masters, fsdp=4, tp=2, on the tiny default config.

    D=64, H=4, K=2, Dh=16, F=128, L=2, V=256, untied head, no biases or q/k norms.
    """
    cfg = ModelConfig(dtype="bfloat16", param_dtype="float32")
    L_, D_, H_, K_, DH_, F_, V_ = 2, 64, 4, 2, 16, 128, 256
    embeddings = 2 * V_ * D_                     # ("vocab", "embed"): tp and fsdp
    attn = L_ * D_ * DH_ * (2 * H_ + 2 * K_)     # heads over tp, embed over fsdp
    mlp = 3 * L_ * D_ * F_                       # mlp over tp, embed over fsdp
    norms = D_ + 2 * L_ * D_                     # never sharded
    assert embeddings + attn + mlp + norms == cfg.num_params()
    kw = dict(optimizer=None, kv_batch=8, kv_length=32)
    plan = memory.plan_memory(cfg, "fsdp=4,tp=2", **kw)
    b = plan.per_device
    assert b["params"] == ((embeddings + attn + mlp) // 8 + norms) * F32
    # Gathered over fsdp, still split over tp: every matrix 2 ways, in the compute dtype.
    sampling_weights = ((embeddings + attn + mlp) // 2 + norms) * BF16
    assert b["sampling_weights"] == sampling_weights == 107_136
    # Rows over fsdp (8 / 4), KV heads over tp (2 / 2), in the compute dtype.
    kv = 2 * L_ * (8 // 4) * (K_ // 2) * DH_ * 32 * BF16 + (8 // 4) * 32 + KV_INDEX
    assert b["kv_cache"] == kv
    assert plan.peak == b["params"] + max(kv + sampling_weights, b["gradients"])
    assert "sampling_weights" in plan.table() and plan.dtypes["sampling_weights"] == "bfloat16"

    # gather_weights=False: the bfloat16 copy in the train layout (8 ways).
    train_layout = memory.plan_memory(cfg, "fsdp=4,tp=2", gather_weights=False, **kw)
    assert train_layout.per_device["sampling_weights"] == ((embeddings + attn + mlp) // 8 + norms) * BF16
    # ... and without masters there is no copy: the sampler reads the params.
    no_masters = memory.plan_memory(cfg, "fsdp=4,tp=2", param_dtype="bfloat16", gather_weights=False, **kw)
    assert no_masters.per_device["sampling_weights"] == 0
    assert no_masters.per_device["params"] == b["params"] // 2


def test_dimensions_that_do_not_divide_are_replicated_and_reported():
    # tp=8: 28 query heads and 4 KV heads do not split 8 ways, vocab (152064) and MLP (18944) do;
    # no fsdp, so nothing splits the embed axis; 12 cache rows have no batch axis to split over.
    plan = _plan_7b({"tp": 8}, kv_batch=12)
    per_device_params = ((EMBEDDINGS + MLP) // 8 + ATTN_QO + ATTN_KV + BIAS_Q + BIAS_KV + NORMS)
    assert plan.per_device["params"] == per_device_params * BF16
    assert plan.per_device["kv_cache"] == 2 * L * 12 * 2048 * K * DH * BF16 + 12 * 2048 + KV_INDEX
    assert any("layers/wq" in w and "tp" in w for w in plan.warnings)
    assert any(w.startswith("kv_cache/k ") for w in plan.warnings)
    assert not any("w_gate" in w or "embed" in w for w in plan.warnings)

    # 12 rows on data=2 x fsdp=4: data divides, fsdp on top does not -> 6 rows per device.
    plan = _plan_7b({"data": 2, "fsdp": 4}, kv_batch=12)
    assert plan.per_device["kv_cache"] == 2 * L * 6 * 2048 * K * DH * BF16 + 6 * 2048 + KV_INDEX
    assert "fsdp" in plan.table() and "does not divide" in plan.table()


def test_plans_256_devices_without_them():
    assert len(jax.devices()) < 256
    plan = _plan_7b("fsdp=256", with_reference=False, kv_batch=0)
    # 3584 = 256 * 14, so every matrix still splits; biases and norms stay whole.
    per_device_params = (EMBEDDINGS + ATTN_QO + ATTN_KV + MLP) // 256 + BIAS_Q + BIAS_KV + NORMS
    assert plan.per_device["params"] == per_device_params * BF16
    assert plan.per_device["reference"] == 0 and plan.per_device["kv_cache"] == 0
    assert plan.mesh_shape == {"data": 1, "fsdp": 256, "tp": 1}


def test_optax_transformation_keeps_moments_in_param_dtype():
    # optax's Adam initialised on bf16 params keeps bf16 moments (what `init_train_state` does).
    plan = _plan_7b("fsdp=8", optimizer=optax.adamw(1e-4))
    assert plan.per_device["optimizer"] == 2 * plan.per_device["params"] + ADAM_COUNT
    assert _plan_7b("fsdp=8", optimizer=None).per_device["optimizer"] == 0


def test_does_not_fit_warns():
    plan = _plan_7b("fsdp=8", device_memory_gib=8)
    assert plan.fits is False
    assert "DOES NOT FIT" in plan.table() and "WARNING" in plan.table()


def test_activation_estimate_by_hand_on_a_tiny_model():
    cfg = ModelConfig(dtype="float32", param_dtype="float32")  # D=64, H=4, K=2, Dh=16, F=128, L=2
    B, T, c = 8, 16, 4
    plan_kw = dict(optimizer=None, train_batch=B, train_seq=T, chunk_size=32)
    # fsdp=8: one row per device; nothing else of an activation is split.
    rows = B // 8
    layer = rows * T * (5 * 64 + 3 * 4 * 16 + 3 * 2 * 16 + 3 * 128) * c + rows * 4 * T * T * (4 + c)
    head = 3 * rows * T * 32 * 4
    off = memory.plan_memory(cfg, "fsdp=8", remat=False, **plan_kw).per_device["activations"]
    on = memory.plan_memory(cfg, "fsdp=8", remat=True, **plan_kw).per_device["activations"]
    assert off == (2 + 1) * layer + head
    assert on == 2 * rows * T * 64 * c + 2 * layer + head
    assert memory.plan_memory(cfg, "fsdp=8", remat="full", **plan_kw).per_device["activations"] == on
    assert memory.plan_memory(cfg, "fsdp=8", remat="none", **plan_kw).per_device["activations"] == off
    # "dots": the layer input, the attention output and down projections [B, T, D], q, k, v and
    # gate/up, per layer.
    dots = memory.plan_memory(cfg, "fsdp=8", remat="dots", **plan_kw).per_device["activations"]
    assert dots == 2 * rows * T * (3 * 64 + 4 * 16 + 2 * 2 * 16 + 2 * 128) * c + 2 * layer + head
    # Halving the devices that split rows doubles the per-device estimate.
    assert memory.plan_memory(cfg, "fsdp=4", remat=True, **plan_kw).per_device["activations"] == 2 * on
    # On a real model each mode keeps less than the one before it.
    big = dict(train_batch=8, train_seq=2048)
    kept = [_plan_7b("fsdp=8", remat=mode, **big).per_device["activations"]
            for mode in ("none", "dots", "full")]
    assert kept[0] > kept[1] > kept[2]
    with pytest.raises(ValueError, match="remat"):
        memory.plan_memory(cfg, "fsdp=8", remat="some", **plan_kw)
    assert "ESTIMATE" in _plan_7b("fsdp=8", **big).table()


def test_mesh_axis_sizes_parsing():
    assert memory.mesh_axis_sizes("data=2, fsdp=4,tp=2") == {"data": 2, "fsdp": 4, "tp": 2}
    assert memory.mesh_axis_sizes({"fsdp": 8}) == {"data": 1, "fsdp": 8, "tp": 1}
    assert memory.mesh_axis_sizes(sharding.make_mesh(fsdp=4, tp=2)) == {"data": 1, "fsdp": 4, "tp": 2}
    for bad in ("fsdp", "pipe=2", "fsdp=-1"):
        with pytest.raises(ValueError):
            memory.mesh_axis_sizes(bad)


def test_script_prints_the_table():
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "plan_memory.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough
    out = subprocess.run(
        [sys.executable, script, "--model", "qwen2.5-7b", "--mesh", "fsdp=8", "--beta", "0.04",
         "--kv_batch", "64", "--kv_length", "2048", "--dtype", "bfloat16"],
        capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    # float32 masters by default: 952,243,712 params a device x 4 bytes; the sampler's gathered
    # bfloat16 copy is the whole model (fsdp is the only sharded axis): 7.6e9 x 2 bytes.
    assert "qwen2.5-7b" in out and "reference" in out and "fits" in out
    assert "3.55 GiB" in out and "14.19 GiB" in out and "sampling_weights" in out


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=4, tp=2), dict(data=2, fsdp=4, tp=1)])
def test_rollout_figure_agrees_with_the_compiled_decode_program(mesh_shape):
    """The plan's rollout bytes (KV cache + the sampler's weights) per device against what XLA
    says the compiled decode program takes as arguments on one device: those two, plus the loop's
    per-row outputs (tokens, log-probs, counters), which the plan leaves out."""
    from grpo_jax import sampling
    from grpo_jax.models import create_model

    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                      d_ff=256, max_position_embeddings=512, dtype="bfloat16", param_dtype="float32")
    mesh = sharding.make_mesh(**mesh_shape)
    model = sampling.sampling_model(create_model(cfg, seed=0, mesh=mesh))
    prompts, prompt_len = 16, 32
    scfg = sampling.SamplingConfig(max_new_tokens=96, n=4, prompt_bucket=32, batch_bucket=8)
    fn, args = sampling.programs(model, prompts, prompt_len, scfg)["decode"]
    compiled = fn.lower(*args).compile().memory_analysis().argument_size_in_bytes
    rows, cache_len = prompts * scfg.n, prompt_len + scfg.max_new_tokens
    plan = memory.plan_memory(cfg, mesh_shape, optimizer=None, kv_batch=rows, kv_length=cache_len)
    planned = plan.category_bytes("kv_cache") + plan.category_bytes("sampling_weights")
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    loop_outputs = rows // shards * (cache_len - prompt_len) * 8 + rows // shards * 16
    assert plan.category_bytes("kv_cache") > compiled / 3  # the cache is a real share of it
    print("decode arguments per device:", compiled, "planned:", planned, "+ loop outputs:", loop_outputs)
    assert abs(compiled - planned - loop_outputs) <= 0.005 * compiled, (compiled, planned, loop_outputs)


def test_engine_rollout_figure_agrees_with_its_compiled_decode_program():
    """The plan with the engine's rows (slots) and positions (max_length + a prefill chunk)
    against the compiled engine decode program's arguments per device: weights, cache, and the
    per-slot inputs the plan leaves out."""
    from grpo_jax import sampling
    from grpo_jax.engine import programs
    from grpo_jax.models import create_model

    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                      d_ff=256, max_position_embeddings=512, dtype="bfloat16", param_dtype="float32")
    mesh_shape = dict(data=2, fsdp=4, tp=1)
    mesh = sharding.make_mesh(**mesh_shape)
    model = sampling.sampling_model(create_model(cfg, seed=0, mesh=mesh))
    slots, capacity = 32, 256 + 64
    layout = sampling.Layout(mesh)
    a = programs.abstract_args(model, slots=slots, capacity=capacity, chunk=64, prefill_rows=4, layout=layout)
    decode = jax.jit(programs.decode_steps, static_argnames=("graphdef", "steps", "chunk", "stop_ids", "filters",
                                                             "pad_id", "fuse", "layout"))
    compiled = decode.lower(a["graphdef"], a["state"], a["cache"], a["inputs"], a["refill_at"], steps=8, chunk=1,
                            stop_ids=(1,), filters=(False, False, False), pad_id=0, fuse=False,
                            layout=layout).compile().memory_analysis().argument_size_in_bytes
    plan = memory.plan_memory(cfg, mesh_shape, optimizer=None, kv_batch=slots, kv_length=capacity)
    planned = plan.category_bytes("kv_cache") + plan.category_bytes("sampling_weights")
    per_slot_inputs = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(a["inputs"])) + 4
    assert plan.category_bytes("kv_cache") > compiled / 3
    assert abs(compiled - planned) <= per_slot_inputs + 0.005 * compiled, (compiled, planned, per_slot_inputs)


# ---------------------------------------------------------------------------------------------
# LoRA: the frozen base in the compute dtype, adapters trained, no reference copy.
# ---------------------------------------------------------------------------------------------
# (in, out) of each target projection of Qwen2.5-7B, flattened: q is H * Dh = 3584 wide, k and
# v K * Dh = 512.
LORA_SIZES = {"wq": (D, H * DH), "wk": (D, K * DH), "wv": (D, K * DH), "wo": (H * DH, D),
              "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}


def _adapter_params(rank, targets=tuple(LORA_SIZES)):
    """A [L, in, r] and B [L, r, out] per target."""
    return sum(L * rank * (LORA_SIZES[t][0] + LORA_SIZES[t][1]) for t in targets)


def _plan_7b_lora(mesh, rank, **kw):
    """param_dtype float32 (masters, were it not LoRA), beta > 0 (a reference, were it not LoRA)."""
    kw = dict(param_dtype="float32", with_reference=True, kv_batch=64, kv_length=2048, **kw)
    return memory.plan_memory(preset("qwen2.5-7b", dtype="bfloat16", lora_rank=rank), mesh, **kw)


def test_lora_categories_by_hand_on_one_device():
    """Rank 16 on every projection, one device: the base in bfloat16 even with param_dtype
    float32 (no masters), float32 adapters; gradients and Adam's moments for the adapters only;
    no reference copy although beta > 0; the sampler's merged copy is the base's size."""
    adapters = _adapter_params(16)
    assert adapters == 28 * 16 * 90_112 == 40_370_176
    plan = _plan_7b_lora("fsdp=1", 16)
    b = plan.per_device
    assert b["params"] == QWEN_7B_PARAMS * BF16 + adapters * F32
    assert plan.category_bytes("params", part="frozen base") == QWEN_7B_PARAMS * BF16
    assert plan.category_bytes("params", part="adapters") == adapters * F32
    assert plan.parts("params") == {"frozen base": "bfloat16", "adapters": "float32"}
    assert b["gradients"] == adapters * F32 and b["optimizer"] == 2 * adapters * F32 + ADAM_COUNT
    assert b["reference"] == 0 and b["sampling_weights"] == QWEN_7B_PARAMS * BF16
    assert plan.num_params == QWEN_7B_PARAMS and plan.num_trainable == adapters and plan.lora_rank == 16
    assert {x.name.split("/")[-1] for x in plan.leaves if x.part == "adapters"} == {
        f"lora_{m}_{t}" for m in "ab" for t in LORA_SIZES}
    for text in ("frozen base", "adapters", "LoRA rank 16", "adapters only", "adapters off", "merged copy"):
        assert text in plan.table(), text
    d = json.loads(json.dumps(plan.as_dict()))
    assert d["parts_bytes"]["params"] == {"frozen base": QWEN_7B_PARAMS * BF16, "adapters": adapters * F32}
    # Fewer targets, fewer adapters.
    attn = memory.plan_memory(preset("qwen2.5-7b", dtype="bfloat16", lora_rank=64,
                                     lora_targets=("wq", "wk", "wv", "wo")), "fsdp=1")
    assert attn.per_device["gradients"] == _adapter_params(64, ("wq", "wk", "wv", "wo")) * F32


def test_lora_adapters_shard_by_their_logical_axes():
    """fsdp=8: A of wq/wk/wv/w_gate/w_up and B of wo/w_down have an `embed` axis (split 8 ways);
    the other matrices' axes map to tp (size 1) or to nothing ("lora"): replicated."""
    r = 64
    plan = _plan_7b_lora("fsdp=8", r, gather_weights=False)
    split = 7 * D // 8                                     # 5 A's and 2 B's of width D
    whole = 2 * H * DH + 2 * K * DH + 3 * F                # B of wq/wk/wv/w_gate/w_up, A of wo/w_down
    adapters_per_device = L * r * (split + whole)
    assert plan.category_bytes("params", part="adapters") == adapters_per_device * F32
    per_device_base = (EMBEDDINGS + ATTN_QO + ATTN_KV + MLP) // 8 + BIAS_Q + BIAS_KV + NORMS
    assert plan.category_bytes("params", part="frozen base") == per_device_base * BF16
    assert plan.per_device["gradients"] == adapters_per_device * F32
    assert plan.per_device["optimizer"] == 2 * adapters_per_device * F32 + ADAM_COUNT
    # The merged copy in the train layout (gather_weights=False) is as sharded as the base.
    assert plan.per_device["sampling_weights"] == per_device_base * BF16
    assert _plan_7b_lora("fsdp=8", r).per_device["sampling_weights"] == QWEN_7B_PARAMS * BF16


def test_without_lora_nothing_changes():
    """lora_rank 0: the targets are ignored and every figure is the full fine-tune's."""
    base = _plan_7b("fsdp=8", train_batch=8, train_seq=1024)
    off = _plan_7b("fsdp=8", preset("qwen2.5-7b", dtype="bfloat16", lora_targets=("wq",)), train_batch=8,
                   train_seq=1024)
    assert off.per_device == base.per_device and off.table() == base.table()
    assert off.lora_rank == 0 and off.num_trainable == QWEN_7B_PARAMS
    assert off.parts("params") == {"": "bfloat16"} and "frozen base" not in off.table()


def test_lora_activation_term_by_hand():
    """Each target adds its x A [B, T, r] (compute dtype) to a layer's activations."""
    kw = dict(optimizer=None, train_batch=8, train_seq=16, chunk_size=32)
    cfg = ModelConfig(dtype="float32", param_dtype="float32")  # L=2
    rows, T, r, c = 8 // 8, 16, 4, 4
    thin = 7 * rows * T * r * c
    for mode, layers in (("none", 2 + 1), ("full", 2), ("dots", 2 + 2)):
        full = memory.plan_memory(cfg, "fsdp=8", remat=mode, **kw).per_device["activations"]
        lora = memory.plan_memory(cfg.replace(lora_rank=r), "fsdp=8", remat=mode, **kw)
        assert lora.per_device["activations"] == full + layers * thin, mode


def _config(name, arg="model_dir=/path/Qwen2.5-7B-Instruct"):
    from config_fixtures import config_module
    module = config_module(name)
    return module, module.get_config(arg)


def _docstring_plan(doc):
    """The `plan_memory.py` command and the table printed under it in a config's docstring."""
    lines = doc.splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("python experiments/plan_memory.py"))
    command, i = "", start
    while True:
        command += lines[i].strip().rstrip("\\") + " "
        if not lines[i].rstrip().endswith("\\"):
            break
        i += 1
    table_start = next(j for j in range(i + 1, len(lines)) if lines[j].strip())
    table_end = next(j for j in range(table_start, len(lines)) if not lines[j].strip())
    return command.split(), "\n".join(x[4:] for x in lines[table_start:table_end])


@pytest.mark.parametrize("name,device_gib,devices", [("qwen2_5_7b_lora_h100", 80, 1),
                                                     ("qwen2_5_7b_lora_v5e8", 16, 8)])
def test_7b_lora_configs_fit_their_devices(name, device_gib, devices):
    """The config's own sizes (mesh, LoRA, engine slots, micro-batch, sequence budget) give the
    plan in its docstring, which fits the device; the same run without LoRA does not."""
    module, c = _config(name)
    assert c.lora.rank > 0 and c.lora.dropout == 0 and c.model.dtype == "bfloat16"
    assert c.mesh.data * c.mesh.fsdp * c.mesh.tp == devices and c.platform in ("gpu", "tpu")
    # The ModelConfig fields the run sets from config.lora and the platform (`components`).
    cfg = preset("qwen2.5-7b", dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                 **config_utils.model_platform_fields(c))
    assert cfg.lora_rank == c.lora.rank and len(cfg.lora_targets) == 7
    # What `plan_for_run` passes: the engine's slots and positions, the packed micro-batch.
    kw = dict(optimizer="adamw", with_reference=c.grpo.beta > 0,
              kv_batch=c.engine.slots or c.train.prompts_per_step * c.rollout.group_size,
              kv_length=c.rollout.max_seq_len + c.engine.prefill_chunk,
              gather_weights=c.sampling.gather_weights, train_batch=c.grpo.micro_batch_size,
              train_seq=c.rollout.max_seq_len, device_memory_gib=device_gib)
    mesh = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tp": c.mesh.tp}
    plan = memory.plan_memory(cfg, mesh, label="qwen2.5-7b", **kw)
    assert plan.fits and plan.peak < device_gib * memory.GIB
    assert plan.per_device["reference"] == 0 and plan.warnings == ()
    command, table = _docstring_plan(module.__doc__)
    assert table == plan.table()
    # The command in the docstring prints that table.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable] + command[1:], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120, check=True).stdout
    assert out.rstrip("\n") == table
    # Full GRPO of the same run (float32 masters, all gradients and moments, a reference copy)
    # does not fit: ~119 GiB on one GPU, ~19 GiB a v5e chip with the gathered sampler copy.
    full = memory.plan_memory(cfg.replace(lora_rank=0, param_dtype="float32"), mesh, **kw)
    assert not full.fits and full.peak > 1.5 * plan.peak


def test_plan_for_run_passes_the_lora_settings():
    """`plan_for_run` plans the run's own model config: with adapters, the LoRA categories."""
    from types import SimpleNamespace
    from grpo_jax.optim import make_optimizer

    cfg = ModelConfig(dtype="bfloat16", param_dtype="bfloat16", lora_rank=4, lora_targets=("wq", "w_down"))
    ns = SimpleNamespace
    config = ns(train=ns(prompts_per_step=2), rollout=ns(group_size=4, max_seq_len=64),
                sampling=ns(gather_weights=True), model=ns(hf_path=None))
    run = SimpleNamespace(config=config, engine=None, model=SimpleNamespace(config=cfg),
                          mesh=sharding.make_mesh(data=1, fsdp=1, tp=1, devices=jax.devices()[:1]),
                          optimizer=make_optimizer(1e-4),
                          uses_reference=True, train=SimpleNamespace(micro_batch_size=4, chunk_size=32))
    plan = memory.plan_for_run(run)
    adapters = 2 * 4 * ((64 + 4 * 16) + (128 + 64))        # L * r * (in + out) of wq and w_down
    assert plan.lora_rank == 4 and plan.num_trainable == adapters
    assert plan.category_bytes("params", part="adapters") == adapters * F32
    assert plan.per_device["gradients"] == adapters * F32 and plan.per_device["reference"] == 0
    # make_optimizer: clipping + AdamW, float32 moments for the adapters only (+ counters).
    assert 2 * adapters * F32 <= plan.per_device["optimizer"] < 2 * adapters * F32 + 64


def test_lora_plan_matches_a_real_train_state_on_eight_devices():
    """The plan's adapters / optimizer / frozen base against the bytes one device holds of a
    real LoRA train state (`init_train_state` with `make_optimizer`) and of the model's base."""
    from flax import nnx
    from grpo_jax.models import create_model
    from grpo_jax.optim import make_optimizer
    from grpo_jax.train_state import init_train_state, split_params

    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                      d_ff=256, dtype="bfloat16", param_dtype="bfloat16", lora_rank=8)
    mesh = sharding.make_mesh(data=1, fsdp=4, tp=2)
    model = create_model(cfg, seed=0, mesh=mesh)
    optimizer = make_optimizer(1e-4)
    state = init_train_state(model, optimizer, jax.random.key(0), mesh=mesh)
    _, _, rest = split_params(model)

    def on_one_device(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

    plan = memory.plan_memory(cfg, {"fsdp": 4, "tp": 2}, optimizer=optimizer)
    assert plan.category_bytes("params", part="adapters") == on_one_device(state.params)
    assert plan.per_device["optimizer"] == on_one_device(state.opt_state)
    assert plan.category_bytes("params", part="frozen base") == on_one_device(nnx.state(rest, nnx.Param))
