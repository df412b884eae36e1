r"""GRPO on GSM8K from a local Qwen2.5-0.5B-Instruct checkpoint (GPU or TPU).

    python experiments/train.py \
        --config configs/gsm8k_qwen2_5_0_5b.py:model_dir=/path/Qwen2.5-0.5B-Instruct,data_dir=/path/tfds \
        --workdir /tmp/gsm8k_qwen

`model_dir` is an HF checkpoint directory (config.json, safetensors, tokenizer files); `data_dir`
the TFDS data directory where GSM8K is (or will be) prepared: with `manual_dir=DIR` holding the
official train.jsonl / test.jsonl, nothing is downloaded (`grpo_jax.envs.gsm8k`).

Setup: 64 prompts x 8 samples per step at temperature 1, up to 512 new tokens, think-then-answer
format, reward = correct answer (numeric match of <answer>) 1.0 + strict format 0.2, GRPO loss
with the k3 KL penalty (beta 0.001) to the initial model, AdamW lr 1e-6, bfloat16 compute on
float32 master weights (one bfloat16 weight update at lr 1e-6 would change ~2% of the weights),
layer rematerialisation, weights fully sharded over all devices.

Published reference: verl's GRPO example for Qwen2.5-0.5B-Instruct reports GSM8K test accuracy
rising from 36.4 (the instruct model) to 54.3 after GRPO (verl documentation, "Algorithm
baselines", GSM8K table). Expected here: ~500 steps reach the same range on one H100-class
GPU in a few hours; the held-out greedy accuracy (`eval/accuracy`, 1319 test problems) is
logged every 50 steps. This config is not run on CPU; `:runlocal` is a smoke variant that the
tests run with a tiny random checkpoint of the same architecture (pass model_dir / data_dir).
"""

from grpo_jax.config_utils import default_config, parse_args


def get_config(arg: str = ""):
    args = parse_args(arg, {"model_dir": None, "data_dir": "", "manual_dir": None, "runlocal": False})
    c = default_config()
    c.model.hf_path = args["model_dir"]
    c.model.dtype = "bfloat16"
    # Master weights (model.param_dtype float32, the default): at lr 1e-6 an update is below
    # bfloat16's resolution for ~98% of the weights. "bfloat16" turns them off (half the weight
    # memory, for models that do not fit otherwise).
    c.model.remat = "full"

    c.env.name = "gsm8k"
    c.env.kwargs.data_dir = args["data_dir"]
    c.env.kwargs.manual_dir = args["manual_dir"]
    c.env.num_train = 7473

    c.sampling.max_new_tokens = 512
    c.sampling.prompt_bucket = 64
    c.sampling.batch_bucket = 64

    c.rollout.max_turns = 1
    c.rollout.max_seq_len = 1024
    c.rollout.length_multiple = 128

    c.grpo.beta = 0.001
    c.grpo.micro_batch_size = 64

    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10

    c.train.num_steps = 500
    c.train.prompts_per_step = 64
    c.train.eval_every = 50

    c.eval.num_examples = 1319

    c.checkpoint.every = 50

    if args["runlocal"]:
        c.model.dtype = "float32"
        c.model.param_dtype = "float32"
        c.model.remat = "dots"
        c.env.num_train = 4
        c.sampling.max_new_tokens = 8
        c.sampling.prompt_bucket = 32
        c.sampling.batch_bucket = 8
        c.rollout.group_size = 2
        c.rollout.max_seq_len = 256
        c.rollout.length_multiple = 32
        c.grpo.micro_batch_size = 8
        c.train.num_steps = 2
        c.train.prompts_per_step = 4
        c.train.eval_every = 2
        c.eval.num_examples = 1
        c.checkpoint.every = 2
    return c.lock()
