"""Orbax checkpoints of the train state plus a JSON record of everything else needed to resume.

A checkpoint at step s holds the `TrainState` (policy parameters, optimizer state, step, root
key) as a sharded array tree, and a small JSON `meta` dict (data position, the metrics row of
step s, the config). Every process calls `save`/`restore` together (orbax coordinates the
writes); arrays are restored straight into the shardings of the abstract target.

Saving is asynchronous: `save` returns once the arrays are copied off the devices and the
write finishes in the background; `wait()` blocks until it is on disk. A checkpoint that fails to
restore (corrupt or truncated files) is reported and the previous one is tried, so one bad
write never loses the whole run; once an older one restores, the run that owns the directory
moves the newer ones that did not aside to `corrupt-<step>` (kept for a post-mortem), so it can
save those steps again. When none restores (a corrupt directory, or a target that does not match:
a changed model) nothing is moved and `CheckpointError` lists every step's error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from grpo_jax import distributed
from grpo_jax.utils import CheckpointError

log = logging.getLogger(__name__)


def _is_key(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG keys -> their uint32 data (what orbax can store), and back."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree):
    def one(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


def _data_to_keys(tree, like):
    def one(x, ref):
        if not _is_key(ref):
            return x
        # An abstract key only exposes its implementation through its dtype.
        impl = jax.random.key_impl(ref) if isinstance(ref, jax.Array) else getattr(ref.dtype, "_impl", None)
        return jax.random.wrap_key_data(x, impl=impl)
    return jax.tree.map(one, tree, like)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, owner: bool = False):
        """`owner`: the run that holds the workdir (`grpo_jax.workdir.lock`) deletes the partial saves
        of killed runs and moves corrupt checkpoints aside; a reader (eval, export) changes nothing,
        since it could delete a live run's save in progress."""
        self.directory = os.path.abspath(directory)
        self.owner = owner
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=owner)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)),
                                  meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, meta) of `step` or of the newest checkpoint that restores (moving the newer
        ones that do not aside, see the module docstring).

        `abstract_state` gives the tree structure and, through `.sharding` on its
        `jax.ShapeDtypeStruct` leaves, where each array goes.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoint under {self.directory}")
        target = _abstract_keys_to_data(abstract_state)
        errors, failed = [], []
        for candidate in candidates:
            try:
                restored = self._manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except Exception as error:  # a corrupt or partial checkpoint: try the one before
                log.error("checkpoint %d under %s does not restore (%s: %s); trying an older one",
                          candidate, self.directory, type(error).__name__, str(error)[:300])
                errors.append(f"step {candidate}: {type(error).__name__}: {str(error)[:200]}")
                failed.append(candidate)
                continue
            if failed and self.owner:  # an older one restores into this target: the newer are corrupt
                self._move_aside(failed)
            state = _data_to_keys(restored["state"], abstract_state)
            return candidate, state, dict(restored["meta"])
        raise CheckpointError(f"no checkpoint under {self.directory} restores: " + "; ".join(errors))

    def _move_aside(self, steps: list[int]):
        """Renames the step directories to `corrupt-<step>`: out of orbax's step list, so the step
        can be saved again (else `StepAlreadyExistsError`), and kept for a post-mortem."""
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target = os.path.join(self.directory, f"corrupt-{step}")
                n = 1
                while os.path.exists(target):  # corrupt twice: keep both
                    target, n = os.path.join(self.directory, f"corrupt-{step}.{n}"), n + 1
                os.rename(source, target)
                log.warning("moved checkpoint %d, which does not restore, to %s", step, target)
        distributed.barrier("checkpoint_move_aside")
        self._manager.reload()

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree):
    """`jax.ShapeDtypeStruct`s (with shardings) of a concrete tree: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        if isinstance(x, jax.Array) else x, tree)
