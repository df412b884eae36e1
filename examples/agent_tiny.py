r"""GRPO on the example agent env `examples/agent_env_example.py` (a tiny model, CPU).

    PYTHONPATH=. python experiments/train.py --config examples/agent_tiny.py --workdir /tmp/agent_tiny

A from-scratch 1-layer model on the example's word-level tokenizer (written to the temp
directory on first use) plays the example agent: 4 requests an episode (3 local tool calls in
between), 4 tokens a reply, 4 prompts x 8 episodes a step, a high learning rate (a toy that
moves in a few steps). `:runlocal` is the same with fewer steps (tests/test_agent_env.py).
"""

from grpo_jax.config_utils import default_config, parse_args


def get_config(arg: str = ""):
    from examples.agent_env_example import default_tokenizer_dir

    args = parse_args(arg, {"runlocal": False})
    c = default_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 1, 4, 2
    c.model.head_dim, c.model.d_ff = 8, 64
    c.model.max_position_embeddings = 128
    c.tokenizer.path = default_tokenizer_dir()

    c.env.name = "examples.agent_env_example:load_environment"  # the plug-in (repo root on PYTHONPATH)
    c.env.num_train = 64

    c.sampling.max_new_tokens = 4
    c.rollout.group_size = 8
    c.rollout.max_turns = 4  # requests an episode: the trainer's loss-token budget is 4 x max_new_tokens
    c.rollout.max_seq_len = 128
    c.rollout.length_multiple = 64
    c.engine.slots = 32
    c.engine.prefill_chunk = 64
    c.optim.learning_rate = 3e-2
    c.train.num_steps = 20
    c.train.prompts_per_step = 4
    c.train.eval_every = 10
    c.eval.num_examples = 8
    c.eval.correct_fn = "answered"  # the rubric function that says an episode is right
    c.checkpoint.every = 10

    if args["runlocal"]:
        c.train.num_steps, c.train.eval_every, c.checkpoint.every = 6, 6, 6
        c.eval.num_examples = 4
    return c.lock()
