"""One process of `tests/test_multihost.py::test_batch_and_weights_move_between_any_layouts`.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT

Each process has 2 CPU devices (XLA_FLAGS from the test). Checks, on meshes whose device order
follows the processes and on one that interleaves them (as a TPU pod's physical order may):
a batch built from process blocks holds the right rows on every device, the process-local
copy of sharded weights is the whole array, and the host collectives see every process.
Exits non-zero (an AssertionError) when a check fails.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo_jax import distributed  # noqa: E402


def main(process_id: int, num_processes: int, port: int):
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    assert len(devices) == 2 * num_processes and jax.process_index() == process_id
    rows = 4 * num_processes
    full = np.arange(rows * 3).reshape(rows, 3)
    start, stop = distributed.process_block(rows)
    by_process = devices
    interleaved = sorted(devices, key=lambda d: (d.id % 2, d.process_index))  # 0a 1a 0b 1b
    assert [d.process_index for d in interleaved] != sorted(d.process_index for d in interleaved)
    for order in (by_process, interleaved):
        mesh = Mesh(np.asarray(order).reshape(1, len(order), 1), ("data", "fsdp", "tp"))
        batch = distributed.global_batch({"x": full[start:stop]},
                                         lambda ndim: NamedSharding(mesh, PartitionSpec("fsdp")), rows)["x"]
        assert batch.shape == full.shape and batch.sharding.mesh == mesh
        for shard in batch.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
        weights = jax.device_put(np.arange(32.0).reshape(16, 2), NamedSharding(mesh, PartitionSpec("fsdp")))
        local = distributed.local_copy({"w": weights}, mesh)["w"]
        assert local.is_fully_addressable and len(local.sharding.device_set) == 2
        np.testing.assert_array_equal(np.asarray(local), np.arange(32.0).reshape(16, 2))
    gathered = distributed.allgather_objects({"id": process_id, "text": "x" * (1000 * process_id)})
    assert [g["id"] for g in gathered] == list(range(num_processes))
    assert distributed.any_process(process_id == num_processes - 1)
    assert not distributed.any_process(False)
    distributed.barrier("done")
    print(f"process {process_id}: ok", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
