"""What the `experiments/*.py` mains share: their flags and the HF export of a policy.

    from grpo_jax import cli            # defines --config, --workdir and the distributed flags
    cli.initialize_distributed()        # jax.distributed when the flags or the launcher ask
    run = components.build(cli.config(), cli.workdir())
"""

from __future__ import annotations

import os
import shutil

import jax
from absl import flags
from ml_collections import config_flags

from grpo_jax import distributed
from grpo_jax.models import save_hf

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:ARGS]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (metrics, checkpoints, tokenizer).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start jax.distributed: 'on' (values not given below are discovered: TPU pods, SLURM, "
    "Open MPI), 'off', or 'auto' (when a value below is given or a multi-process SLURM/MPI "
    "launch or JAX_COORDINATOR_ADDRESS is seen).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def config():
    return _CONFIG.value


def workdir() -> str:
    return _WORKDIR.value


def initialize_distributed() -> None:
    """Starts `jax.distributed` as the flags say (`grpo_jax.distributed.maybe_initialize`);
    call it before anything touches the devices."""
    distributed.maybe_initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def export_policy(run, params, directory: str) -> None:
    """Writes the policy of `params` (a `components.Run`'s) as an HF checkpoint directory, with
    its tokenizer files (an HF tokenizer's, or the run's trained sentencepiece model)."""
    save_hf(run.policy(params), directory)
    if jax.process_index() != 0:
        return
    if hasattr(run.tokenizer, "hf"):
        run.tokenizer.hf.save_pretrained(directory)
    else:  # a trained sentencepiece model: its files next to the weights
        source = os.path.join(run.workdir, "tokenizer")
        for name in os.listdir(source):
            shutil.copy(os.path.join(source, name), directory)
