r"""Tiny Countdown with GRPO, from scratch on CPU.

    python experiments/train.py --config configs/countdown_tiny.py --workdir /tmp/countdown_tiny

Reach a target with three numbers (1..20) and + - * /, each number at most once, answering
<think>...</think><answer>expression</answer>. Reward: a valid expression reaching the target 1.0
+ strict format 0.2 (TinyZero-style task, Pan et al. 2025). A 0.8M-parameter model is warm-started
on solved examples, then trained with GRPO.
Expected (2 CPU cores): ~8 minutes; the valid-solution rate is low for a model this small and
rises slowly; the config exists to exercise the task end to end, not to solve it.

`:runlocal` is a seconds-long smoke variant (tests).
"""

from grpo_jax.config_utils import default_config, parse_args, shrink_for_smoke_test


def get_config(arg: str = ""):
    args = parse_args(arg, {"runlocal": False})
    c = default_config()
    c.env.name = "countdown"
    c.env.kwargs.num_numbers = 3
    c.env.kwargs.max_number = 20
    c.env.kwargs.max_target = 100
    c.env.kwargs.system_prompt = ""
    c.sft.steps = 300
    c.sft.num_demos = 3000
    c.sampling.max_new_tokens = 64
    c.rollout.max_turns = 1
    c.optim.learning_rate = 5e-4
    c.train.num_steps = 40
    c.train.eval_every = 20
    c.eval.correct_fn = "valid_solution"
    c.checkpoint.every = 20
    if args["runlocal"]:
        shrink_for_smoke_test(c, max_new_tokens=12)
        c.sft.steps = 2
    return c.lock()
