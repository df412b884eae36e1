r"""GRPO on GSM8K with LoRA on Qwen2.5-7B-Instruct, on one 80 GB GPU (H100).

    python experiments/train.py \
        --config configs/qwen2_5_7b_lora_h100.py:model_dir=/path/Qwen2.5-7B-Instruct,data_dir=/path/tfds \
        --workdir /tmp/gsm8k_qwen7b_lora

`model_dir` is the HF checkpoint directory of Qwen2.5-7B-Instruct (config.json, safetensors,
tokenizer files) that you downloaded; `data_dir` the TFDS data directory of GSM8K (see
configs/gsm8k_qwen2_5_0_5b.py, whose setup this repeats: 64 prompts x 8 samples per step,
up to 512 new tokens, correct-answer + format reward, k3 KL penalty beta 0.001, 500 steps).

Full GRPO of the 7B model needs ~119 GiB on one GPU (float32 masters, gradients and Adam
moments, a reference copy). Here only rank-64 LoRA adapters on every projection of every layer
are trained (161M parameters, 2% of the model; `grpo_jax.models.lora`): the base weights stay
frozen in bfloat16 (model.param_dtype), gradients and Adam moments exist for the adapters only,
and the KL reference is the base with the adapters off, so there is no second copy. Learning
rate 1e-5: LoRA wants about 10x the full fine-tune's (1e-6 in the 0.5B config).

Sizes that fit: the engine decodes 256 episodes at once (of the step's 512), the train step
takes micro-batches of 16 packed rows of 1024 tokens, remat "full". The plan's peak (46 GiB)
is also under the 60 GiB JAX preallocates by default on an 80 GB GPU
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.75); engine.slots = 512 would raise it to ~62 GiB (raise the
fraction to use it). The memory plan, printed by

    python experiments/plan_memory.py --model qwen2.5-7b --mesh fsdp=1 --lora_rank 64 \
        --lora_alpha 64 --beta 0.001 --dtype bfloat16 --param_dtype bfloat16 --kv_batch 256 \
        --kv_length 1152 --train_batch 16 --train_seq 1024 --remat full --device_memory_gib 80

    memory plan: qwen2.5-7b (7,615,616,512 params, 161,480,704 trained (LoRA rank 64)) on mesh data=1 fsdp=1 tp=1 (1 device)
    category           per device    unsharded  dtype     assumption
    params              14.79 GiB    14.79 GiB  mixed     frozen base (bfloat16) + LoRA adapters (float32, trained)
      frozen base       14.19 GiB    14.19 GiB  bfloat16
      adapters           0.60 GiB     0.60 GiB  float32
    gradients            0.60 GiB     0.60 GiB  float32   accumulator, adapters only
    optimizer            1.20 GiB     1.20 GiB  float32   adamw: mu + nu, adapters only
    reference            0.00 GiB     0.00 GiB            none (LoRA: the reference is the base with adapters off)
    kv_cache            15.75 GiB    15.75 GiB  bfloat16  L x k [B=256, Hkv, Dh, S=1152], v [B, Hkv, S, Dh] + kv_valid
    sampling_weights    14.19 GiB    14.19 GiB  bfloat16  merged copy (W + alpha/r A B) gathered over fsdp, split over tp, for the rollout
    activations         15.15 GiB            -  bfloat16  ESTIMATE for 16 x 1024 tokens, remat full
    total               61.68 GiB   (every category at once)
    peak                45.93 GiB   (params + optimizer + reference + max(kv_cache + sampling_weights, gradients + activations))
    device              80.00 GiB   fits (peak is 57% of one device)

(kv_length = rollout.max_seq_len + engine.prefill_chunk: an engine slot's positions;
activations are an estimate that assumes no flash attention; `trainer` prints the run's own
plan, `memory.plan_for_run`, at start.)
"""

import importlib.util
import os


def _gsm8k(arg: str):
    """The GSM8K GRPO config (`gsm8k_qwen2_5_0_5b.py`: env, lengths, batch, schedule), unlocked."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_qwen2_5_0_5b.py")
    spec = importlib.util.spec_from_file_location("gsm8k_qwen2_5_0_5b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _lora_7b(c, platform: str, fsdp: int, slots: int, micro_batch_size: int):
    """Qwen2.5-7B with rank-64 adapters on every projection, the base frozen in bfloat16."""
    with c.unlocked():
        c.platform = platform
        c.mesh.data, c.mesh.fsdp, c.mesh.tp = 1, fsdp, 1
        c.model.param_dtype = "bfloat16"  # the frozen base: no float32 masters (adapters are float32)
        c.lora.rank, c.lora.alpha, c.lora.dropout = 64, 64.0, 0.0
        c.lora.targets = "wq,wk,wv,wo,w_gate,w_up,w_down"
        c.engine.slots = slots
        c.grpo.micro_batch_size = micro_batch_size
        c.optim.learning_rate = 1e-5  # 10x the full fine-tune's, the usual LoRA ratio
    return c


def get_config(arg: str = ""):
    """`arg`: model_dir=/path/Qwen2.5-7B-Instruct,data_dir=...,manual_dir=... (as the 0.5B config)."""
    return _lora_7b(_gsm8k(arg), "gpu", fsdp=1, slots=256, micro_batch_size=16)
