r"""Trains with GRPO: `python experiments/train.py --config configs/NAME.py[:ARGS] --workdir DIR`.

Any config field can be overridden with `--config.group.field=value` (the config is locked: a
mistyped field fails). Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/samples.txt and
DIR/checkpoints/; running the same command again resumes from the last checkpoint.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
    from grpo_jax import trainer
    from grpo_jax.report import before_after_table

    summary = trainer.run(_CONFIG.value, _WORKDIR.value)
    print(before_after_table(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "state"}, default=float))


if __name__ == "__main__":
    app.run(main)
