r"""Tunes a rubric's weights by short GRPO runs: `python experiments/tune_rubric.py --config
configs/NAME.py[:ARGS] --workdir DIR`.

Successive halving over candidate weight vectors (a grid over the rubric's shaping functions,
or random draws, plus the hand-written rubric): a candidate whose rubric rewards a known hack
(the audit) is discarded before any training; the stored rollouts of the first run are
re-scored under every candidate (sign flips, variance lost, agreement with correctness); round
r trains the survivors for `min_steps * eta**r` steps and keeps the best half by held-out
`eval/accuracy`. `--propose_criteria` adds a candidate scored by an LLM judge whose criteria a
judge model (`--judge_base_url`, `--judge_model`, any OpenAI-compatible endpoint) proposed.

Writes DIR/tuning.json (candidates, audits, re-scoring, rounds, scores, the winner) after every
run and each run under DIR/runs/; running the same command again reuses finished runs. See
docs/rubric_tuning.md and `grpo_jax.rubrics.tuning`.

    python experiments/tune_rubric.py --config configs/calculator_sparse.py:mixed_steps=150 --workdir /tmp/tune \
        --grid=0,0.1,0.3,0.6 --min_steps=5 --seeds=100,101
"""

import json

from absl import app, flags, logging

from grpo_jax import cli

_TUNE = flags.DEFINE_list("tune", None, "Rubric functions to tune (default: the weighted ones but correctness).")
_GRID = flags.DEFINE_list("grid", ["0", "0.1", "0.3", "0.6"], "Weights tried for each tuned function.")
_NUM_RANDOM = flags.DEFINE_integer("num_random", 0, "Draw this many random weight vectors instead of the grid.")
_RANDOM_HIGH = flags.DEFINE_float("random_high", 1.0, "Random weights are drawn from [0, random_high].")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 5, "GRPO steps of the first round (x eta each round).")
_ETA = flags.DEFINE_integer("eta", 2, "Keep 1/eta of the candidates per round.")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", None, "Stop after this many rounds (the best of the last wins).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Cap on a round's steps.")
_SEEDS = flags.DEFINE_list("seeds", ["100", "101"], "Seeds of every run (the score is their mean).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", None,
                                      "Held-out problems per evaluation (default: the config's).")
_AUDIT_ROWS = flags.DEFINE_integer("audit_rows", 16, "Rows the audit builds its hacks from.")
_AUDIT_THRESHOLD = flags.DEFINE_float("audit_threshold", 0.5, "A hack scoring above this discards the candidate.")
_ROLLOUTS_FROM = flags.DEFINE_string("rollouts_from", None, "A run whose stored rollouts are re-scored "
                                     "(default: the tuner's first run, the hand-written rubric's).")
_RESCORE_STEPS = flags.DEFINE_integer("rescore_steps", 5, "Re-score the last N stored steps.")
_MIN_AGREEMENT = flags.DEFINE_float("min_agreement", None, "Discard candidates whose re-scored reward agrees "
                                    "in sign with correctness on fewer episodes than this (None: report only).")
_PROPOSE = flags.DEFINE_bool("propose_criteria", False, "Ask a judge model for criteria: one more candidate.")
_JUDGE_BASE_URL = flags.DEFINE_string("judge_base_url", None, "OpenAI-compatible endpoint of the judge (…/v1).")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "The judge's model name.")
_JUDGE_API_KEY = flags.DEFINE_string("judge_api_key", "EMPTY", "The judge's API key.")
_JUDGE_WEIGHT = flags.DEFINE_float("judge_weight", 0.3, "Weight of the judge function in its candidate.")
_TASK = flags.DEFINE_string("task_description", None, "The task as shown to the judge (default: the env's).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the trainer's progress lines (else DIR/runs/*/progress.txt).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax.rubrics import criteria, tuning

    propose = None
    if _PROPOSE.value:
        if not (_JUDGE_BASE_URL.value and _JUDGE_MODEL.value):
            raise app.UsageError("--propose_criteria needs --judge_base_url and --judge_model")
        propose = criteria.ProposalSettings(base_url=_JUDGE_BASE_URL.value, model=_JUDGE_MODEL.value,
                                            api_key=_JUDGE_API_KEY.value, weight=_JUDGE_WEIGHT.value,
                                            task_description=_TASK.value)
    result = tuning.tune(
        cli.config(), cli.workdir(), grid_values=[float(v) for v in _GRID.value], tune_fns=_TUNE.value,
        num_random=_NUM_RANDOM.value,
        random_high=_RANDOM_HIGH.value, min_steps=_MIN_STEPS.value, eta=_ETA.value, max_rounds=_MAX_ROUNDS.value,
        max_steps=_MAX_STEPS.value, seeds=[int(s) for s in _SEEDS.value], audit_rows=_AUDIT_ROWS.value,
        audit_threshold=_AUDIT_THRESHOLD.value, rollouts_from=_ROLLOUTS_FROM.value,
        rescore_steps=_RESCORE_STEPS.value, min_agreement=_MIN_AGREEMENT.value, propose=propose,
        eval_examples=_EVAL_EXAMPLES.value, verbose=_VERBOSE.value)
    print(tuning.summary_table(result))
    print(json.dumps({"winner": result["winner"]["name"], "overrides": result["winner"]["overrides"],
                      "score": result["winner"]["score"]}))


if __name__ == "__main__":
    app.run(main)
