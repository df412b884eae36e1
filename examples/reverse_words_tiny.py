r"""GRPO on the example plug-in env `examples/reverse_words_env.py` (a tiny model, CPU).

    PYTHONPATH=. python experiments/train.py --config examples/reverse_words_tiny.py \
        --workdir /tmp/reverse_words

A from-scratch 2-layer model (sentencepiece tokenizer trained on the task's texts) is warm
started on 300 steps of gold demonstrations, then trained with GRPO for 30 steps (8 prompts x
8 completions); about 2 minutes on 2 shared CPU cores. It is a plug-in demonstration, not a
tuned recipe: measured (seed 0), greedy held-out accuracy is 0.49 after the warm start and 0.48
after GRPO (strict format 1.0); 100 steps at learning rate 1e-3 (0.25) or 60 at 3e-4 (0.42) did
not help either. `:runlocal` is the seconds-long smoke variant (tests/test_env_config.py).
"""

from grpo_jax.config_utils import default_config, parse_args, shrink_for_smoke_test


def get_config(arg: str = ""):
    args = parse_args(arg, {"runlocal": False})
    c = default_config()
    c.model.n_layers = 2
    c.model.max_position_embeddings = 128

    c.env.name = "examples.reverse_words_env:load_environment"  # the plug-in (repo root on PYTHONPATH)
    c.env.kwargs.max_words = 4
    c.env.num_train = 2000

    c.sft.steps = 300
    c.sft.batch_size = 16
    c.sampling.max_new_tokens = 16
    c.rollout.max_turns = 1
    c.rollout.max_seq_len = 64
    c.train.num_steps = 30
    c.train.eval_every = 10
    c.eval.num_examples = 100
    c.eval.correct_fn = "exact_match"  # the rubric function that says an answer is right

    if args["runlocal"]:
        shrink_for_smoke_test(c)
        c.sft.steps = 2
    return c.lock()
