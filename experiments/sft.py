r"""Supervised warm start only: trains on the env's demonstrations and writes an HF checkpoint.

    python experiments/sft.py --config configs/NAME.py --workdir DIR

Uses the config's `sft` fields; writes DIR/sft_model (weights, config.json, tokenizer files),
which another config can start from with `--config.model.hf_path=DIR/sft_model`.
(`experiments/train.py` runs the same warm start itself when `config.sft.steps` or `config.sft.mixed_steps` > 0.)
"""

import os

from absl import app, logging

from grpo_jax import cli


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from grpo_jax import components, sft
    from grpo_jax.metrics import MetricsWriter

    config = cli.config()
    run = components.build(config, cli.workdir())
    writer = MetricsWriter(cli.workdir(), total_steps=config.sft.steps + config.sft.mixed_steps)
    sft.warm_start(run, writer)
    writer.close()
    out = os.path.join(cli.workdir(), "sft_model")
    cli.export_policy(run, run.init_state().params, out)
    print(f"wrote the warm-started model to {out}")


if __name__ == "__main__":
    app.run(main)
