r"""GRPO on GSM8K with LoRA on Qwen2.5-7B-Instruct, on one TPU v5e-8 (8 chips of 16 GiB HBM).

    python experiments/train.py \
        --config configs/qwen2_5_7b_lora_v5e8.py:model_dir=/path/Qwen2.5-7B-Instruct,data_dir=/path/tfds \
        --workdir /tmp/gsm8k_qwen7b_lora

`model_dir` is the HF checkpoint directory of Qwen2.5-7B-Instruct (config.json, safetensors,
tokenizer files) that you downloaded; `data_dir` the TFDS data directory of GSM8K (see
configs/gsm8k_qwen2_5_0_5b.py, whose setup this repeats: 64 prompts x 8 samples per step,
up to 512 new tokens, correct-answer + format reward, k3 KL penalty beta 0.001, 500 steps).

Full GRPO of the 7B model needs ~19 GiB a chip on a v5e-8 (fsdp=8; float32 masters, gradients
and Adam moments, a reference copy): more than a chip has. Here only rank-64 LoRA adapters on
every projection of every layer are trained (161M parameters, 2% of the model;
`grpo_jax.models.lora`): the base weights stay frozen in bfloat16 (model.param_dtype),
gradients and Adam moments exist for the adapters only, and the KL reference is the base with
the adapters off, so there is no second copy. Learning rate 1e-5: LoRA wants about 10x the
full fine-tune's (1e-6 in the 0.5B config).

Sizes that fit: every weight fully sharded over the 8 chips (mesh fsdp=8); the sampler reads
the merged bfloat16 copy in that layout (sampling.gather_weights = False: gathered, the copy
would be the whole 14.2 GiB model on every chip); the engine decodes the step's 512 episodes
at once (64 a chip); the train step takes micro-batches of 32 packed rows of 1024 tokens
(4 a chip), remat "full". Every category at once (13.1 GiB) is under a chip's 16 GiB too. The
memory plan, printed by

    python experiments/plan_memory.py --model qwen2.5-7b --mesh fsdp=8 --lora_rank 64 \
        --lora_alpha 64 --beta 0.001 --dtype bfloat16 --param_dtype bfloat16 --nogather_weights \
        --kv_batch 512 --kv_length 1152 --train_batch 32 --train_seq 1024 --remat full \
        --device_memory_gib 16

    memory plan: qwen2.5-7b (7,615,616,512 params, 161,480,704 trained (LoRA rank 64)) on mesh data=1 fsdp=8 tp=1 (8 devices)
    category           per device    unsharded  dtype     assumption
    params               2.23 GiB    14.79 GiB  mixed     frozen base (bfloat16) + LoRA adapters (float32, trained)
      frozen base        1.77 GiB    14.19 GiB  bfloat16
      adapters           0.46 GiB     0.60 GiB  float32
    gradients            0.46 GiB     0.60 GiB  float32   accumulator, adapters only
    optimizer            0.91 GiB     1.20 GiB  float32   adamw: mu + nu, adapters only
    reference            0.00 GiB     0.00 GiB            none (LoRA: the reference is the base with adapters off)
    kv_cache             3.94 GiB    31.50 GiB  bfloat16  L x k [B=512, Hkv, Dh, S=1152], v [B, Hkv, S, Dh] + kv_valid
    sampling_weights     1.77 GiB    14.19 GiB  bfloat16  merged copy (W + alpha/r A B) in the train layout, for the rollout
    activations          3.79 GiB            -  bfloat16  ESTIMATE for 32 x 1024 tokens, remat full
    total               13.09 GiB   (every category at once)
    peak                 8.85 GiB   (params + optimizer + reference + max(kv_cache + sampling_weights, gradients + activations))
    device              16.00 GiB   fits (peak is 55% of one device)

(kv_length = rollout.max_seq_len + engine.prefill_chunk: an engine slot's positions;
activations are an estimate that assumes no flash attention (splash attention on TPU keeps
less); `trainer` prints the run's own plan, `memory.plan_for_run`, at start.)
"""

import importlib.util
import os


def _h100_config_module():
    """`qwen2_5_7b_lora_h100.py`, whose helpers build both 7B LoRA configs."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_7b_lora_h100.py")
    spec = importlib.util.spec_from_file_location("qwen2_5_7b_lora_h100", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    """`arg`: model_dir=/path/Qwen2.5-7B-Instruct,data_dir=...,manual_dir=... (as the 0.5B config)."""
    h100 = _h100_config_module()
    c = h100._lora_7b(h100._gsm8k(arg), "tpu", fsdp=8, slots=512, micro_batch_size=32)
    with c.unlocked():
        c.sampling.gather_weights = False  # the merged copy stays sharded 8 ways (1.8 GiB a chip)
    return c
