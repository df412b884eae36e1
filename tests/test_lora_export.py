"""LoRA export: our adapters as a PEFT directory that `peft.PeftModel` applies to the HF base, and
the merged model as a plain HF checkpoint, both checked on logits against our unmerged forward."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import nnx
from hf_fixtures import hf_config, hf_logits, left_padded_batch, make_hf_model, save_hf_model

from grpo_jax.models import CheckpointError, create_model, from_hf_config, load_hf
from grpo_jax.models.lora import LoRAParam
from grpo_jax.models.peft_io import load_peft, save_merged_hf, save_peft

RANK, ALPHA = 4, 8.0
CASES = [("qwen2", None), ("llama", None), ("qwen3", ("wq", "wo", "w_down"))]  # (family, lora_targets)


@jax.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions, segment_ids)


def _ours(model, tokens, mask, positions):
    return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


def _lora_model(path, targets=None, seed=0):
    """The HF checkpoint at `path` loaded with rank-RANK adapters (new ones change nothing),
    then set to random non-zero values."""
    extra = {"lora_targets": targets} if targets else {}
    model = load_hf(path, dtype="float32", lora_rank=RANK, lora_alpha=ALPHA, **extra)
    base = load_hf(path, dtype="float32")
    tokens = jax.numpy.arange(8)[None] % 50 + 3
    np.testing.assert_array_equal(model(tokens), base(tokens))
    adapters = nnx.state(model, LoRAParam)
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree_util.tree_unflatten(
        treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
    return model


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def exported(request, tmp_path_factory):
    family, targets = request.param
    root = tmp_path_factory.mktemp(family)
    base = save_hf_model(make_hf_model(family, seed=3), str(root / "base"))
    model = _lora_model(base, targets)
    save_peft(model, str(root / "adapter"), base_model_name_or_path=base)
    tokens, mask, positions = left_padded_batch([7, 12, 3], 12, seed=5)
    batch = (tokens, mask, positions)
    return family, model, base, str(root), batch, _ours(model, *batch)


def test_peft_applies_our_adapters(exported):
    family, model, base, root, batch, ours = exported
    mask = batch[1] > 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    base_logits = hf_logits(hf, *batch)
    peft_model = peft.PeftModel.from_pretrained(hf, os.path.join(root, "adapter")).eval()
    # Every adapter PEFT built was loaded (a missing key leaves its B at PEFT's zero init).
    b = {n: p for n, p in peft_model.named_parameters() if ".lora_B." in n}
    assert len(b) == model.config.n_layers * len(model.config.lora_targets)
    assert all(p.abs().max() > 0 for p in b.values())
    got = hf_logits(peft_model, *batch)
    assert np.abs(got - ours)[mask].max() < 1e-4, family
    # The check can fail: the adapters change the logits well beyond the tolerance.
    assert np.abs(base_logits - ours)[mask].max() > 1e-2


def test_adapter_config_is_peft_lora(exported):
    family, model, base, root, _, _ = exported
    with open(os.path.join(root, "adapter", "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", RANK, ALPHA, base)
    loaded = peft.PeftConfig.from_pretrained(os.path.join(root, "adapter"))
    assert sorted(loaded.target_modules) == cfg["target_modules"]
    assert (loaded.lora_dropout, loaded.use_rslora, loaded.fan_in_fan_out) == (0.0, False, False)


def test_merged_export_matches(exported):
    family, model, _, root, batch, ours = exported
    out = os.path.join(root, "merged")
    save_merged_hf(model, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert np.abs(hf_logits(hf, *batch) - ours)[batch[1] > 0].max() < 1e-4, family


def test_load_peft_reads_what_peft_saves(exported):
    """PEFT's own `save_pretrained` of our adapters (its full config, its key names) loads back
    into a LoRA model bit for bit; a rank mismatch is refused by name."""
    _, model, base, root, _, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    resaved = os.path.join(root, "resaved")
    peft.PeftModel.from_pretrained(hf, os.path.join(root, "adapter")).save_pretrained(resaved)
    fresh = create_model(model.config, seed=7)
    nnx.update(fresh, jax.tree_util.tree_map(jnp.zeros_like, nnx.state(model, LoRAParam)))
    load_peft(fresh, resaved)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(fresh, LoRAParam)),
                    jax.tree_util.tree_leaves(nnx.state(model, LoRAParam))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = create_model(model.config.replace(lora_rank=RANK * 2), seed=0)
    with pytest.raises(CheckpointError, match="r=4"):
        load_peft(other, resaved)


def test_save_peft_needs_adapters(tmp_path):
    model = create_model(from_hf_config(hf_config("llama").to_dict()), seed=0)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft(model, str(tmp_path / "a"), "base")
    assert not os.path.exists(tmp_path / "a")
