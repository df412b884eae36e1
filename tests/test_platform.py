"""Platform choices are made on the host, once, and nothing traced asks JAX for its backend."""

import pathlib
import re

import jax
import pytest

from grpo_jax import components, config_utils, platform


def test_choices_by_name_and_by_devices():
    assert platform.choices("cuda") == platform.choices("gpu")
    assert platform.choices("cpu").cpu_weight_grad and platform.choices("cpu").logprob_chunk == 1024
    for name in ("gpu", "tpu"):
        c = platform.choices(name)
        assert not c.cpu_weight_grad and c.logprob_chunk == 8192
    assert platform.choices("gpu").decode_chunk > 1  # no host round trip per token on GPU
    assert platform.choices("auto") == platform.choices("cpu")  # the devices of this machine
    assert platform.of_devices(jax.devices()[:2]) == "cpu"
    with pytest.raises(ValueError, match="platform 'metal'"):
        platform.choices("metal")


def test_the_run_takes_its_choices_from_the_config():
    config = config_utils.default_config()
    assert components.platform_choices(config).platform == "cpu"
    config.platform = "tpu"
    assert components.platform_choices(config) == platform.choices("tpu")
    assert components.train_config(config).chunk_size == 8192
    config.grpo.chunk_size = 512  # a hand-set chunk wins
    assert components.train_config(config).chunk_size == 512
    config.platform = "gpu"
    with pytest.raises(config_utils.ConfigError, match="platform"):
        bad = config_utils.default_config()
        bad.platform = "metal"
        config_utils.validate(bad)


def test_no_backend_read_in_library_code():
    """A program traced on a CPU host for `cuda` or `tpu` must not pick CPU paths: only
    `grpo_jax/platform.py` may look at the devices."""
    root = pathlib.Path(__file__).resolve().parents[1] / "grpo_jax"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "platform.py" and re.search(r"default_backend\(\)", p.read_text())]
    assert offenders == []


def test_missing_checkpoint_and_tokenizer_dirs_are_named_before_anything_loads(tmp_path):
    for field in ("model.hf_path", "tokenizer.path"):
        config = config_utils.default_config()
        group, name = field.split(".")
        config[group][name] = str(tmp_path / "nowhere")
        with pytest.raises(config_utils.ConfigError, match=f"{field}.*is not a directory"):
            config_utils.validate(config)
