"""Meshes and logical-axis sharding on 8 simulated CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import left_padded_batch, make_hf_model, save_hf_model
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding
from grpo_jax.models import ModelConfig, PRESETS, abstract_model, create_model, load_hf, param_count


@jax.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions, segment_ids)


def _spec(var):
    return var[...].sharding.spec


def test_eight_devices_available():
    assert len(jax.devices()) == 8


def test_mesh_shapes_and_errors():
    mesh = sharding.make_mesh(data=2, fsdp=-1, tp=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tp": 2}
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tp": 1}
    assert dict(sharding.mesh_from_config({"data": 1, "fsdp": 4, "tp": 2}).shape) == \
        {"data": 1, "fsdp": 4, "tp": 2}
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert one.size == 1
    with pytest.raises(sharding.ShardingError, match="needs 12 devices"):
        sharding.make_mesh(data=3, fsdp=2, tp=2)
    with pytest.raises(sharding.ShardingError, match="at most one axis"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.make_mesh(data=1, fsdp=-1, tp=3)


def test_logical_rules_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh(data=1, fsdp=2, tp=4)
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), (2, 64, 128), mesh) == P(None, "fsdp", "tp")
    # 2 KV heads cannot be split 4 ways: replicated on tp, still sharded on fsdp.
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh) == \
        P(None, "fsdp", None, None)
    assert sharding.logical_to_spec(("batch", None), (8, 5), mesh) == P("fsdp", None)
    mesh2 = sharding.make_mesh(data=2, fsdp=2, tp=2)
    assert sharding.logical_to_spec(("batch", None), (8, 5), mesh2) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", None), (6, 5), mesh2) == P("data", None)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama", seed=7), str(tmp_path_factory.mktemp("llama")))


def test_load_hf_on_fsdp_tp_mesh_matches_one_device(llama_dir):
    mesh = sharding.make_mesh(data=1, fsdp=2, tp=4)
    single = load_hf(llama_dir)
    sharded = load_hf(llama_dir, mesh=mesh)
    # Parameters really are sharded, each device holding only its piece.
    assert _spec(sharded.layers.wq) == P(None, "fsdp", "tp", None)
    assert _spec(sharded.layers.wo) == P(None, "tp", None, "fsdp")
    assert _spec(sharded.layers.w_gate) == P(None, "fsdp", "tp")
    assert _spec(sharded.layers.w_down) == P(None, "tp", "fsdp")
    assert _spec(sharded.lm_head) == P(None, "fsdp")  # vocab 97 is prime: replicated over tp
    shard = sharded.layers.w_gate[...].addressable_shards[0].data
    assert shard.shape == (3, 32, 28)
    assert len(sharded.layers.w_gate[...].addressable_shards) == 8
    tokens, mask, positions = left_padded_batch([4, 16, 9, 12, 16, 1, 7, 3], 16, seed=3)
    args = [jnp.asarray(a) for a in (tokens, positions, mask)]
    ref = np.asarray(_forward(single, *args))
    batch = sharding.batch_sharding(mesh)
    got = _forward(sharded, *[jax.device_put(a, batch) for a in args])
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)


@pytest.mark.parametrize("axes", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_created_model_same_on_any_mesh(axes):
    cfg = ModelConfig(model_type="qwen2", vocab_size=128, d_model=64, n_heads=8, n_kv_heads=4,
                      head_dim=8, d_ff=96, qkv_bias=True, tie_embeddings=True)
    single = create_model(cfg, seed=1)
    mesh = sharding.make_mesh(*axes)
    sharded = create_model(cfg, seed=1, mesh=mesh)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, 128)
    ref = _forward(single, tokens, None, None)
    got = _forward(sharded, jax.device_put(tokens, sharding.batch_sharding(mesh)), None, None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    if axes[2] == 8:
        assert _spec(sharded.embed) == P("tp", None)


# Published parameter counts (HF safetensors metadata / model cards).
PUBLISHED = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_eval_shape_of_full_size_models(name):
    model = abstract_model(PRESETS[name])
    leaves = jax.tree.leaves(model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert param_count(model) == PUBLISHED[name]
    assert PRESETS[name].num_params() == PUBLISHED[name]
