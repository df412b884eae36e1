r"""The default CPU experiment: a tiny model learns to use a calculator tool with GRPO.

    python experiments/train.py --config configs/calculator_tiny.py --workdir /tmp/calculator_tiny

Task: "What is 527 * 344?" (3-digit x 3-digit, operands 317..999 so every product has 6
digits). The model may write <calc>527*344</calc>; the tool replies with the product; the
episode ends with <answer>181288</answer>. Reward: correct answer 1.0 + strict format 0.2 +
tool used 0.1.

1. A sentencepiece tokenizer (320 pieces, digits split) is trained on the task's texts.
2. Warm start (1200 steps): a 0.4M-parameter Qwen2-style model is trained from scratch on
   demonstrations of which 40% call the calculator and 60% skip it and restate the expression
   (`<answer>527*344</answer>`: well formed, never correct). It learns both ways and prefers
   the second: greedy decoding never calls the tool, sampling calls it ~40% of the time, and
   when it does, it copies operands and result correctly (~97%).
3. GRPO (40 steps, 8 prompts x 8 completions): only tool calls earn the correctness reward, so
   group-relative advantages move the policy to call the calculator.

Held-out greedy accuracy and tool-call rate (200 problems) are printed before and after GRPO.
Measured on 2 CPU cores (seeds 0-4; README): 75-96 s per run; accuracy 0.00 -> 1.00 / 0.995 /
1.00 / 1.00 / 0.975 and tool-call rate 0.00 -> 1.00. The warm start's learning rate (2e-3) and
length (1200 steps) are what made every seed learn the copy skill (README).

`:runlocal` is a seconds-long smoke variant (tests).
"""

from grpo_jax.config_utils import default_config, parse_args, shrink_for_smoke_test


def get_config(arg: str = ""):
    args = parse_args(arg, {"runlocal": False})
    c = default_config()

    c.model.n_layers = 2
    c.model.max_position_embeddings = 128

    c.env.kwargs.difficulty = "3x3"
    c.env.kwargs.tool_format = "compact"
    c.env.kwargs.system_prompt = ""
    c.env.kwargs.max_turns = 3

    c.sft.mixed_steps = 1200
    c.sft.batch_size = 16
    c.sft.mixed_learning_rate = 2e-3
    c.sft.num_demos = 3000
    c.sft.direct_answer_fraction = 0.6

    c.sampling.max_new_tokens = 16

    c.rollout.max_seq_len = 128

    c.optim.learning_rate = 3e-4

    c.train.num_steps = 40
    c.train.eval_every = 20

    c.eval.num_examples = 200

    c.checkpoint.every = 10

    if args["runlocal"]:
        shrink_for_smoke_test(c, max_new_tokens=12, num_steps=3)
        c.sft.mixed_steps = 4
    return c.lock()
