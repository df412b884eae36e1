r"""Evaluates a run: `python experiments/eval.py --config configs/NAME.py --workdir DIR [--step N]`.

Restores the newest checkpoint of DIR (or step N; the untrained model when DIR has none) and
prints one JSON line of held-out metrics (eval/accuracy, eval/tool_call_rate, pass@k ...).
Runs on several processes like `experiments/train.py` (same flags); process 0 prints.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed (see experiments/train.py).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax import distributed

    distributed.maybe_initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.trainer import Experiment

    exp = Experiment(_CONFIG.value, _WORKDIR.value)
    checkpointer = Checkpointer(os.path.join(_WORKDIR.value, "checkpoints"))
    if checkpointer.latest_step() is None:
        step, params = 0, exp.init_state().params
    else:
        step, state, _, _ = exp.restore(checkpointer, _STEP.value)
        params = state.params
    metrics, _ = exp.evaluate(params, step)
    checkpointer.close()
    if jax.process_index() == 0:
        print(json.dumps({"step": step, **metrics}))


if __name__ == "__main__":
    app.run(main)
