r"""Tiny single-turn arithmetic with GRPO, from scratch on CPU.

    python experiments/train.py --config configs/arithmetic_tiny.py --workdir /tmp/arithmetic_tiny

"What is 47 + 8?" answered as <answer>55</answer> (1-2 digit +, -, *). A 0.8M-parameter model is
warm-started on 300 steps of demonstrations, then trained with GRPO (8 prompts x 8 samples).
Reward: correct answer 1.0 + strict format 0.2.
Expected (2 CPU cores): ~6 minutes; held-out greedy accuracy rises during GRPO (addition and
subtraction are learned first; 2-digit products stay hard for a model this small).

`:runlocal` is a seconds-long smoke variant (tests).
"""

from grpo_jax.config_utils import default_config, parse_args, shrink_for_smoke_test


def get_config(arg: str = ""):
    args = parse_args(arg, {"runlocal": False})
    c = default_config()
    c.model.max_position_embeddings = 96
    c.env.name = "arithmetic"
    c.env.kwargs.difficulty = "easy"
    c.env.kwargs.system_prompt = ""
    c.sft.steps = 300
    c.sft.num_demos = 3000
    c.sampling.max_new_tokens = 16
    c.rollout.max_turns = 1
    c.rollout.max_seq_len = 96
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 40
    c.train.eval_every = 20
    c.eval.num_examples = 200
    c.checkpoint.every = 20
    if args["runlocal"]:
        shrink_for_smoke_test(c)
        c.sft.steps = 2
    return c.lock()
