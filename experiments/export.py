r"""Writes a trained policy as an HF checkpoint directory (loadable by transformers).

    python experiments/export.py --config configs/NAME.py --workdir DIR --out OUT_DIR [--step N]
"""

import os

from absl import app, flags, logging

from grpo_jax import cli

_OUT = flags.DEFINE_string("out", None, "Directory for the HF checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax import components
    from grpo_jax.checkpoint import Checkpointer

    run = components.build(cli.config(), cli.workdir())
    checkpointer = Checkpointer(os.path.join(cli.workdir(), "checkpoints"))
    step, state, _, _ = components.restore(run, checkpointer, _STEP.value)
    checkpointer.close()
    cli.export_policy(run, state.params, _OUT.value)
    print(f"wrote the policy of step {step} to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
