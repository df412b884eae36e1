"""`build(config, workdir) -> Run`: what a run is made of, built from its config.

    run = build(config, workdir)     env, tokenizer, model, mesh, the step settings, optimizer,
                                     train step, the datasets, the root key
    state = run.init_state()         or restore(run, checkpointer)
    run.policy(state.params)         the policy as an NNX module

Kept apart from the training loop so that notebooks, `experiments/*.py` and the tests build
exactly what `trainer.run` builds. The pieces (`build_env`, `build_tokenizer`, `build_model`,
`train_config` ...) are importable on their own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any

import jax
from flax import nnx

from grpo_jax import config_utils, distributed, sft
from grpo_jax import sharding as sharding_lib
from grpo_jax import tokenizer as tokenizer_lib
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.envs import datasets, registry
from grpo_jax.models import lora
from grpo_jax.evaluation import EvalConfig
from grpo_jax.engine import EngineConfig
from grpo_jax.rollout import RolloutConfig, check_template
from grpo_jax.sampling import SamplingConfig
from grpo_jax.train_step import TrainConfig, init_train_state, make_train_step, split_params

log = logging.getLogger(__name__)

# Markup of the tasks' protocols, kept whole by a trained sentencepiece model.
TASK_SYMBOLS = ("<calc>", "</calc>", "<answer>", "</answer>", "<think>", "</think>")


def build_env(env_config):
    """The env `env_config.name` (`grpo_jax.envs.registry`) with `env_config.kwargs`; "group" makes
    an `EnvGroup` of `env_config.envs`. `env_config.dataset` (when its type is set) replaces its
    rows, `env_config.rubric.funcs` (when set) its rubric, and `env_config.rubric_weights`
    reweights the rubric's functions (docs/environments.md)."""
    plain = lambda value: value.to_dict() if hasattr(value, "to_dict") else dict(value)  # noqa: E731
    kwargs = plain(env_config.kwargs)
    dataset = config_utils.dataset_spec(env_config) if "dataset" in env_config else None
    if env_config.name == "group":
        kwargs["envs"] = plain(env_config.envs)
    if env_config.name == "single_turn" and dataset is not None:
        kwargs["dataset"] = dataset
    env = registry.make_env(env_config.name, **kwargs)
    if dataset is not None and env_config.name != "single_turn":
        env.replace_dataset(datasets.dataset_from_config(dataset))
    funcs = plain(env_config.rubric.funcs) if "rubric" in env_config else {}
    if funcs:
        old = env.rubric
        env.rubric = registry.rubric_from_config(funcs, env.parser, timeout_s=old.timeout_s,
                                                 isolation=old.isolation)
    weights = dict(env_config.get("rubric_weights") or {})
    if weights:  # e.g. a rubric ablation: {"strict_format": 0.0, "tool_used": 0.0}
        env.rubric = env.rubric.reweighted(weights)
    return env


def build_tokenizer(config, env, workdir: str):
    """The HF tokenizer of `tokenizer.path` (or of the model), else a sentencepiece model trained
    on the task's demonstrations and kept in `workdir/tokenizer` (reused on resume)."""
    path = config.tokenizer.path or config.model.hf_path
    if path:
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        sp_model = os.path.join(path, "tokenizer.model")
        if os.path.exists(sp_model) and not any(os.path.exists(os.path.join(path, f)) for f in hf_files):
            # A sentencepiece model with its chat template (what a tiny task's export writes).
            return tokenizer_lib.from_sentencepiece(sp_model)
        return tokenizer_lib.from_pretrained(path)
    directory = os.path.join(workdir, "tokenizer")
    model_file = os.path.join(directory, "tokenizer.model")
    if os.path.exists(model_file):
        return tokenizer_lib.from_sentencepiece(model_file)
    rows = env.dataset("train", n=config.tokenizer.corpus_rows, seed=config.env.data_seed)
    corpus = []
    for prompt, completion in sft.demonstrations(env, rows):
        corpus.extend(m["content"] for m in prompt + completion)
        corpus.append(env.parser.format(answer=rows[0]["answer"]))
    log.info("training a %d-piece sentencepiece model on %d texts", config.tokenizer.train_vocab_size, len(corpus))
    return tokenizer_lib.train_sentencepiece(corpus, directory, vocab_size=config.tokenizer.train_vocab_size,
                                             extra_symbols=TASK_SYMBOLS)


platform_choices = config_utils.platform_choices
train_config = config_utils.train_config
eval_config = config_utils.eval_config


def model_config(config, tokenizer):
    from grpo_jax.models import ModelConfig

    m = config.model
    return ModelConfig(
        model_type=m.model_type, vocab_size=m.vocab_size or tokenizer.vocab_size, d_model=m.d_model,
        n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, d_ff=m.d_ff,
        max_position_embeddings=m.max_position_embeddings, qkv_bias=m.model_type == "qwen2",
        qk_norm=m.model_type == "qwen3", tie_embeddings=m.tie_embeddings, dtype=m.dtype,
        param_dtype=m.param_dtype, remat=m.remat, **config_utils.model_platform_fields(config),
        eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
        pad_token_id=tokenizer.pad_id)


def build_model(config, tokenizer, mesh=None):
    from grpo_jax.models import create_model, load_hf

    if config.model.hf_path:
        # Under LoRA the base is frozen: stored in the compute dtype, no float32 masters.
        param_dtype = config.model.dtype if config.lora.rank else config.model.param_dtype
        model = load_hf(config.model.hf_path, dtype=config.model.dtype, param_dtype=param_dtype,
                        mesh=mesh, remat=config.model.remat,
                        **config_utils.model_platform_fields(config))
    else:
        model = create_model(model_config(config, tokenizer), seed=sft.warm_start_seed(config), mesh=mesh)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size} embeddings")
    return model


def sampling_config(config, tokenizer, model) -> SamplingConfig:
    """`config_utils.sampling_config` with the tokenizer's stop and pad ids and the model's context."""
    return config_utils.sampling_config(config, stop_token_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                                        max_length=model.config.max_position_embeddings)


def engine_config(config, tokenizer) -> EngineConfig | None:
    """`config_utils.engine_config` with the tokenizer's stop and pad ids (None: lockstep)."""
    return config_utils.engine_config(config, stop_token_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)


def rollout_config(config, tokenizer) -> RolloutConfig:
    """`config_utils.rollout_config` with the tokenizer's pad id."""
    return config_utils.rollout_config(config, pad_id=tokenizer.pad_id)


def optimizer(config, total_updates: int):
    import optax

    from grpo_jax.optim import make_optimizer

    o = config.optim
    inner = make_optimizer(o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
                           total_steps=max(total_updates, o.warmup_steps + 1), weight_decay=o.weight_decay,
                           b2=o.b2, max_grad_norm=o.max_grad_norm)
    # A non-finite gradient skips the update (the trainer then stops with a clear message).
    return optax.apply_if_finite(inner, max_consecutive_errors=1 << 30)



@dataclasses.dataclass(frozen=True)
class Run:
    """What a run is made of (`build`)."""

    config: Any                  # the experiment's ConfigDict
    workdir: str                 # where the tokenizer, metrics and checkpoints live
    mesh: Any                    # jax.sharding.Mesh of config.mesh
    env: Any                     # the Environment (config.env)
    tokenizer: Any
    model: Any                   # the NNX policy (its weights: the initial / warm-start ones)
    sampling: SamplingConfig     # rollouts' sampler settings
    rollout: RolloutConfig
    engine: EngineConfig | None  # the rollout engine's settings; None: lockstep rollouts
    train: TrainConfig
    eval: EvalConfig
    optimizer: Any               # optax transformation (non-finite updates skipped)
    train_step: Any              # `make_train_step`: (state, batch, ref_params) -> (state, metrics)
    train_rows: list             # env.dataset("train")
    eval_rows: list              # env.dataset("test")
    root_key: Any                # jax.random.key(config.seed); step s uses fold_in(root_key, s)
    uses_reference: bool         # grpo.beta > 0: a frozen copy of the initial weights is kept

    @property
    def step_mesh(self):
        """The mesh of the compiled programs (None on one device)."""
        return self.mesh if self.mesh.size > 1 else None

    def policy(self, params):
        """The policy with `params` (a train state's `nnx.Param` state) as an NNX module."""
        graphdef, _, rest = split_params(self.model)
        return nnx.merge(graphdef, params, rest)

    def sampling_policy(self, params):
        """The policy rollouts sample from. One process: the train state's own weights. Several:
        a copy on this process's devices (`distributed.local_copy`), so that each process samples
        its share of the episodes on its own, turn by turn, without waiting for the others."""
        if not distributed.is_multiprocess():
            return self.policy(params)
        graphdef, _, rest = split_params(self.model)
        return nnx.merge(graphdef, distributed.local_copy(params, self.mesh),
                         distributed.local_copy(rest, self.mesh))

    def warm_base(self):
        """The base weights when a warm start trains them under LoRA adapters (checkpointed with
        the adapters: a resumed run would otherwise rebuild the base from its seed or
        checkpoint), else None."""
        sft = self.config.sft
        if lora.has_adapters(self.model) and (sft.steps > 0 or sft.mixed_steps > 0):
            return nnx.state(self.model, lora.BASE)
        return None

    def init_state(self):
        """The train state of the model's current weights, born sharded."""
        return init_train_state(self.model, self.optimizer, self.root_key, mesh=self.step_mesh)


def shared_tokenizer(config, env, workdir: str):
    """`build_tokenizer`; with several processes, a trained one is trained by process 0 and read
    back by the others."""
    if not distributed.is_multiprocess():
        return build_tokenizer(config, env, workdir)
    tokenizer = build_tokenizer(config, env, workdir) if jax.process_index() == 0 else None
    distributed.barrier("tokenizer")
    return tokenizer or build_tokenizer(config, env, workdir)


def build(config, workdir: str | None = None) -> Run:
    """The `Run` of `config` (validated first: `ConfigError` naming the field). A trained
    tokenizer is kept in `workdir/tokenizer` (a temporary directory when None)."""
    config_utils.validate(config)
    workdir = workdir or tempfile.mkdtemp(prefix="grpo_jax_")
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding_lib.mesh_from_config(config.mesh)
    env = build_env(config.env)
    tokenizer = shared_tokenizer(config, env, workdir)
    model = build_model(config, tokenizer, mesh if mesh.size > 1 else None)
    train = train_config(config)
    opt = optimizer(config, config.train.num_steps * config.grpo.num_iterations)
    train_rows = env.dataset("train", n=config.env.num_train, seed=config.env.data_seed)
    # The chat template must keep earlier turns unchanged (token-in / token-out rollouts).
    check_template(tokenizer, env, train_rows[0])
    return Run(config=config, workdir=workdir, mesh=mesh, env=env, tokenizer=tokenizer, model=model,
               sampling=sampling_config(config, tokenizer, model), rollout=rollout_config(config, tokenizer),
               engine=engine_config(config, tokenizer), train=train, eval=eval_config(config), optimizer=opt,
               train_step=make_train_step(model, opt, train, mesh=mesh if mesh.size > 1 else None),
               train_rows=train_rows,
               eval_rows=env.dataset("test", n=config.eval.num_examples, seed=config.env.data_seed),
               root_key=jax.random.key(config.seed), uses_reference=config.grpo.beta > 0)


def restore(run: Run, checkpointer: Checkpointer, step: int | None = None):
    """(step, train state, reference params or None, meta) of a checkpoint of `run`."""
    template = run.init_state()
    base = run.warm_base()
    target = {"train": abstract_like(template),
              "ref": abstract_like(template.params) if run.uses_reference else None,
              "base": abstract_like(base) if base is not None else None}
    del template
    step, restored, meta = checkpointer.restore(target, step)
    if base is not None:  # the warm-started base under the adapters
        nnx.update(run.model, restored["base"])
    return step, restored["train"], restored["ref"], meta
