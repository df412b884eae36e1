r"""Writes a trained policy as an HF checkpoint directory (loadable by transformers).

    python experiments/export.py --config configs/NAME.py --workdir DIR --out OUT_DIR [--step N]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_OUT = flags.DEFINE_string("out", None, "Directory for the HF checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.trainer import Experiment

    exp = Experiment(_CONFIG.value, _WORKDIR.value)
    checkpointer = Checkpointer(os.path.join(_WORKDIR.value, "checkpoints"))
    step, state, _, _ = exp.restore(checkpointer, _STEP.value)
    checkpointer.close()
    exp.save_policy(state.params, _OUT.value)
    print(f"wrote the policy of step {step} to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
