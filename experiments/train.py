r"""Trains with GRPO: `python experiments/train.py --config configs/NAME.py[:ARGS] --workdir DIR`.

Any config field can be overridden with `--config.group.field=value` (the config is locked: a
mistyped field fails). Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/samples.txt and
DIR/checkpoints/; running the same command again resumes from the last checkpoint.

Several processes (hosts, or one per GPU) run the same command with one shared DIR; they find
each other through `--coordinator_address`, `--num_processes`, `--process_id` (or the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables), or, with
`--distributed`, by discovery on Cloud TPU pods, SLURM and Open MPI. See the README's launch
guide.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start jax.distributed: 'on' (values not given below are discovered: TPU pods, SLURM, "
    "Open MPI), 'off', or 'auto' (when a value below is given or a multi-process SLURM/MPI "
    "launch or JAX_COORDINATOR_ADDRESS is seen).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
    from grpo_jax import distributed

    distributed.maybe_initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    from grpo_jax import trainer
    from grpo_jax.report import before_after_table

    summary = trainer.run(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(before_after_table(summary))
        print(json.dumps({k: v for k, v in summary.items() if k != "state"}, default=float))


if __name__ == "__main__":
    app.run(main)
