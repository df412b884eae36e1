"""A train.staleness = 1 run on one device (XLA:CPU refuses the overlap on several), for
tests/test_variants.py: prints which weights sampled each step and the trained rows as JSON."""

import json
import sys

import jax
import jax.numpy as jnp

from grpo_jax import trainer
from grpo_jax.collector import Collector
from grpo_jax.metrics import read_metrics
from test_variants import _config, _trained

seen = {}
original = Collector.collect_with


def recording(self, policy, step):
    seen[step] = float(jnp.sum(jax.tree.leaves(policy)[0]))  # which weights sampled the step
    return original(self, policy, step)


Collector.collect_with = recording
out = trainer.run(_config(**{"train.staleness": 1, "sft.mixed_steps": 0}), sys.argv[1])
print(json.dumps({"seen": seen, "rows": _trained(read_metrics(sys.argv[1])), "last_step": out["last_step"],
                  "devices": jax.device_count()}))
