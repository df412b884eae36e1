r"""The calculator task with a weak warm start and a short GRPO run: correctness is sparse.

    python experiments/train.py --config configs/calculator_sparse.py --workdir /tmp/calculator_sparse
    python experiments/train.py --config configs/calculator_sparse.py:mixed_steps=150 --workdir ...

`configs/calculator_tiny.py` with a quarter of its warm start (`sft.mixed_steps` 300 instead of
1200) and half its GRPO steps (20), evaluated every 5 steps on 100 held-out problems. After 1200
warm-start steps the model copies operands and results reliably, every sampled tool call is
right, and the policy learns whatever the loss or the rubric (`notebooks/rubric_ablation.ipynb`:
correctness only and correctness + format + tool use give the same curves). After 300 steps the
copy skill is half learned and how often a sampled episode is correct depends on the seed's
warm start (3% of the first GRPO batch on seed 0, 36-39% on seeds 1 and 2); the loss-type and
dynamic-sampling notebooks use it (correctness only; the latter with 90% direct answers).

The config argument `mixed_steps=150` (an eighth of the warm start) is the rubric-tuning task
(`notebooks/rubric_tuning.ipynb`, docs/rubric_tuning.md): on seeds 0 and 1 at most 3% of the
first batch is correct, while the direct answer `<answer>527*344</answer>` (the unevaluated
expression: well formed, never correct) is always well formed. Partial credit then changes what
GRPO learns: `strict_format` pays the unevaluated expression as much as a correct tool answer's
format, at no risk, so the hand-written rubric (correct_answer 1.0 + strict_format 0.2 +
tool_used 0.1) rewards that hack and the policy drifts away from the tool (held-out accuracy
0.00 and 0.06 after 20 steps on seeds 0 and 1, where correctness only reaches 0.89 and 0.82);
where a seed's warm start is stronger (seed 2: 27% correct at the first step) both reach 1.00.
It was chosen by a sweep of `sft.mixed_steps` (150, 300) and `sft.direct_answer_fraction`
(0.6, 0.75, 0.9) at 20 GRPO steps, seeds 0-2, correctness only against the hand-written rubric
(docs/rubric_tuning.md): with 0.75 or 0.9 neither rubric learns in 20 steps; with 300 steps the
hand-written rubric fails on seed 0 only.

A run takes 25-60 s on 2 CPU cores (the warm start, 10-15 s, is shared through `sft.cache_dir`
when set). `:runlocal` is a seconds-long smoke variant (tests).
"""

from grpo_jax.ablation import load_config
from grpo_jax.config_utils import parse_args


def get_config(arg: str = ""):
    """`configs/calculator_tiny.py` with a shorter warm start and a shorter GRPO run."""
    args = parse_args(arg, {"runlocal": False, "mixed_steps": 300})
    c = load_config("calculator_tiny", "runlocal" if args["runlocal"] else "")
    with c.unlocked():
        if not args["runlocal"]:
            c.sft.mixed_steps = args["mixed_steps"]
            c.train.num_steps = 20
            c.train.eval_every = 5
            c.eval.num_examples = 100
    return c
