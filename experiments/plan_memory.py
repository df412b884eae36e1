r"""Prints the per-device memory plan of a GRPO run (`grpo_jax.memory.plan_memory`).

Nothing is allocated and no devices are needed: shapes come from `jax.eval_shape`, shardings from
the logical-axis rules on an abstract mesh, so a 256-device plan runs on a laptop in seconds.

    python experiments/plan_memory.py --model qwen2.5-7b --mesh fsdp=8 --beta 0.04 \
        --kv_batch 64 --kv_length 2048 --dtype bfloat16 --param_dtype float32
    python experiments/plan_memory.py --hf_config path/to/config.json --mesh data=2,fsdp=4,tp=2 \
        --train_batch 16 --train_seq 2048 --remat full --device_memory_gib 80 --json
    python experiments/plan_memory.py --model qwen2.5-7b --mesh fsdp=1 --lora_rank 64 \
        --lora_alpha 64 --beta 0.001 --kv_batch 256 --kv_length 1152 --train_batch 16 \
        --train_seq 1024 --remat full --device_memory_gib 80

`--lora_rank r > 0` plans a LoRA run (`ModelConfig.lora_rank`): the base frozen in the compute
dtype, adapters on `--lora_targets` trained, no reference copy (docs/lora.md, "Memory").
"""

import json

from absl import app, flags

from grpo_jax import memory
from grpo_jax.models import PRESETS, from_hf_config, preset
from grpo_jax.models.config import REMAT_MODES

_MODEL = flags.DEFINE_enum("model", "qwen2.5-7b", sorted(PRESETS), "Model preset.")
_HF_CONFIG = flags.DEFINE_string("hf_config", None, "An HF config.json (replaces --model).")
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "Mesh axis sizes, e.g. 'data=2,fsdp=4,tp=2'.")
_BETA = flags.DEFINE_float("beta", 0.0, "KL weight; > 0 keeps reference weights.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (activations, KV cache, the "
                             "sampler's copy of the weights).")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Storage dtype of the trained weights "
                                   "and the reference (float32: master weights).")
_GATHER_WEIGHTS = flags.DEFINE_bool("gather_weights", True, "The sampler reads a copy of the weights "
                                    "gathered over fsdp (config.sampling.gather_weights).")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adamw", ["adamw", "adam", "none"], "Optimizer.")
_OPTIMIZER_DTYPE = flags.DEFINE_string("optimizer_dtype", "float32", "Adam moments' dtype.")
_GRAD_DTYPE = flags.DEFINE_string("grad_dtype", "float32", "Gradient accumulator dtype.")
_KV_BATCH = flags.DEFINE_integer("kv_batch", 0, "Rows the sampler decodes at once (global).")
_KV_LENGTH = flags.DEFINE_integer("kv_length", 0, "Cache slots per row (prompt + completion).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", None,
                                    "Rows per forward/backward (micro-batch, global).")
_TRAIN_SEQ = flags.DEFINE_integer("train_seq", None, "Tokens per training row.")
_REMAT = flags.DEFINE_enum("remat", "dots", list(REMAT_MODES),
                           "What each layer keeps for the backward pass (ModelConfig.remat).")
_DEVICE_GIB = flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one device (GiB).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA rank; 0 = off (every weight trained).")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (scale alpha / rank; no effect "
                                 "on memory).")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"],
                                  "Comma list of the projections that get adapters.")
_JSON = flags.DEFINE_bool("json", False, "Print the plan as one JSON line instead of a table.")


def main(argv):
    del argv
    if _HF_CONFIG.value:
        with open(_HF_CONFIG.value) as f:
            cfg = from_hf_config(json.load(f))
        label = _HF_CONFIG.value
    else:
        cfg, label = preset(_MODEL.value), _MODEL.value
    cfg = cfg.replace(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, lora_rank=_LORA_RANK.value,
                      lora_alpha=_LORA_ALPHA.value, lora_targets=tuple(_LORA_TARGETS.value))
    plan = memory.plan_memory(
        cfg, _MESH.value, optimizer=None if _OPTIMIZER.value == "none" else _OPTIMIZER.value,
        optimizer_dtype=_OPTIMIZER_DTYPE.value, grad_dtype=_GRAD_DTYPE.value,
        with_reference=_BETA.value > 0, kv_batch=_KV_BATCH.value, kv_length=_KV_LENGTH.value,
        gather_weights=_GATHER_WEIGHTS.value,
        train_batch=_TRAIN_BATCH.value, train_seq=_TRAIN_SEQ.value, remat=_REMAT.value,
        device_memory_gib=_DEVICE_GIB.value, label=label)
    print(json.dumps(plan.as_dict()) if _JSON.value else plan.table())


if __name__ == "__main__":
    app.run(main)
