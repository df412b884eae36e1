r"""Evaluates a run: `python experiments/eval.py --config configs/NAME.py --workdir DIR [--step N]`.

Restores the newest checkpoint of DIR (or step N; the untrained model when DIR has none) and
prints one JSON line of held-out metrics (eval/accuracy, eval/tool_call_rate, pass@k ...).
Runs on several processes like `experiments/train.py` (same flags); process 0 prints.
"""

import json
import os

from absl import app, flags, logging

from grpo_jax import cli

_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cli.initialize_distributed()
    import jax

    from grpo_jax import components
    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.evaluation import evaluate_run

    run = components.build(cli.config(), cli.workdir())
    checkpointer = Checkpointer(os.path.join(cli.workdir(), "checkpoints"))
    if checkpointer.latest_step() is None:
        step, params = 0, run.init_state().params
    else:
        step, state, _, _ = components.restore(run, checkpointer, _STEP.value)
        params = state.params
    metrics, _ = evaluate_run(run, params, step)
    checkpointer.close()
    if jax.process_index() == 0:
        print(json.dumps({"step": step, **metrics}))


if __name__ == "__main__":
    app.run(main)
