r"""Supervised warm start only: trains on the env's demonstrations and writes an HF checkpoint.

    python experiments/sft.py --config configs/NAME.py --workdir DIR

Uses the config's `sft` fields; writes DIR/sft_model (weights, config.json, tokenizer files),
which another config can start from with `--config.model.hf_path=DIR/sft_model`.
(`experiments/train.py` runs the same warm start itself when `config.sft.steps` or `config.sft.mixed_steps` > 0.)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax.metrics import MetricsWriter
    from grpo_jax.trainer import Experiment

    exp = Experiment(_CONFIG.value, _WORKDIR.value)
    writer = MetricsWriter(_WORKDIR.value, total_steps=_CONFIG.value.sft.steps + _CONFIG.value.sft.mixed_steps)
    exp.warm_start(writer)
    writer.close()
    out = os.path.join(_WORKDIR.value, "sft_model")
    exp.save_policy(exp.init_state().params, out)
    print(f"wrote the warm-started model to {out}")


if __name__ == "__main__":
    app.run(main)
