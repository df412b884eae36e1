"""`components.build`, the env registry, the config schema and `config_utils.parse_args`."""

import sys
import types

import pytest

from grpo_jax import components, config_utils
from grpo_jax.envs import registry
from grpo_jax.envs.arithmetic import ArithmeticEnv


def _tiny():
    c = config_utils.default_config()
    c.model.d_model, c.model.n_layers, c.model.head_dim, c.model.d_ff = 32, 1, 8, 64
    c.env.name, c.env.kwargs.difficulty, c.env.kwargs.system_prompt = "arithmetic", "easy", ""
    c.env.num_train, c.tokenizer.corpus_rows = 16, 50
    c.sampling.max_new_tokens, c.rollout.max_turns, c.rollout.max_seq_len = 8, 1, 96
    c.rollout.group_size, c.train.prompts_per_step, c.eval.num_examples = 2, 4, 2  # 8 rows: 8 devices
    return c.lock()


def test_build_makes_the_run_and_its_settings_from_the_config(tmp_path):
    config = _tiny()
    run = components.build(config, str(tmp_path))
    assert isinstance(run.env, ArithmeticEnv) and len(run.train_rows) == 16 and len(run.eval_rows) == 2
    assert run.train.loss_type == config.grpo.loss_type and run.train.epsilon_high is None
    assert run.rollout.group_size == 2 and run.sampling.max_new_tokens == 8 and run.eval.k is None
    assert not run.uses_reference and run.mesh.size == 8
    state = run.init_state()
    assert run.policy(state.params).config == run.model.config
    assert (tmp_path / "tokenizer" / "tokenizer.model").exists()


def test_off_is_none_and_a_placeholder_still_takes_a_value():
    c = config_utils.default_config()
    assert (c.grpo.tis_cap, c.grpo.epsilon_high, c.grpo.micro_batch_size, c.eval.k) == (None, None, None, None)
    c.grpo.tis_cap = 0.5
    assert config_utils.train_config(c).tis_cap == 0.5
    assert not config_utils.train_config(c).use_sampler_logps_as_old
    c.optim.max_grad_norm = None  # clipping off
    with pytest.raises(TypeError):
        c.grpo.tis_cap = "high"


@pytest.mark.parametrize("field,value,match", [
    ("grpo.num_iterations", 0, "config.grpo.num_iterations: num_iterations must be >= 1"),
    ("grpo.beta", -1.0, "config.grpo.beta"),
    ("sampling.top_p", 0.0, "config.sampling.top_p"),
    ("rollout.max_turns", 0, "config.rollout.max_turns"),
    ("eval.k", 0, "config.eval.k"),
])
def test_the_settings_checks_are_the_config_checks_naming_the_field(field, value, match):
    c = config_utils.default_config()
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(config_utils.ConfigError, match=match):
        config_utils.validate(c)


def test_envs_by_name_registered_and_plug_in(monkeypatch):
    assert {"calculator", "arithmetic", "countdown", "gsm8k", "single_turn", "group"} <= \
        set(registry.registered_names())
    module = types.ModuleType("my_plugin_envs")
    module.load_environment = lambda **kwargs: ArithmeticEnv(**kwargs)
    monkeypatch.setitem(sys.modules, "my_plugin_envs", module)
    env = registry.make_env("my_plugin_envs:load_environment", difficulty="easy")
    assert isinstance(env, ArithmeticEnv)
    c = config_utils.default_config()
    c.env.name = "my_plugin_envs:load_environment"
    config_utils.validate(c)
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    registry.register_env("mine", lambda **kwargs: ArithmeticEnv(**kwargs))
    assert isinstance(registry.make_env("mine"), ArithmeticEnv)
    c.env.name = "chess"
    with pytest.raises(config_utils.ConfigError, match=r"config.env.name: 'chess'.*calculator.*mine"):
        config_utils.validate(c)
    c.env.name = "my_plugin_envs:missing"
    with pytest.raises(config_utils.ConfigError, match="config.env.name.*missing"):
        config_utils.validate(c)


def test_parse_args():
    defaults = {"runlocal": False, "model_dir": None, "steps": 1, "lr": 0.5}
    assert config_utils.parse_args("", defaults) == defaults
    assert config_utils.parse_args("runlocal, model_dir=/m,steps=3,lr=1e-3", defaults) == \
        {"runlocal": True, "model_dir": "/m", "steps": 3, "lr": 1e-3}
    assert config_utils.parse_args("runlocal=false", defaults)["runlocal"] is False
    with pytest.raises(config_utils.ConfigError, match="'stpes'.*steps"):
        config_utils.parse_args("stpes=3", defaults)
