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

from absl import app, logging

from grpo_jax import cli


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
    cli.initialize_distributed()
    import jax

    from grpo_jax import trainer
    from grpo_jax.report import before_after_table

    summary = trainer.run(cli.config(), cli.workdir())
    if jax.process_index() == 0:
        print(before_after_table(summary))
        print(json.dumps({k: v for k, v in summary.items() if k != "state"}, default=float))


if __name__ == "__main__":
    app.run(main)
