"""The experiment config schema: `default_config()`, every field commented.

Configs in `configs/` start from it (through `grpo_jax.config_utils`, which validates a config
and makes the library's typed settings from it).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                         # root of all randomness: per-step keys are fold_in(key, step)
    c.platform = "auto"                # cpu | gpu | tpu | auto (the run's devices): the platform
    #                                    choices of `grpo_jax.platform` (gradient forms, chunk sizes)
    c.allow_config_change = False      # resume a workdir whose config.json differs in what was built

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = placeholder(str)  # HF checkpoint directory; None = build from the fields below
    c.model.dtype = "float32"          # compute dtype: float32 | bfloat16 (accelerators)
    c.model.param_dtype = "float32"    # storage/master dtype of the trained weights: float32 keeps
    #                                    master weights under bfloat16 compute; "bfloat16" turns
    #                                    masters off (half the weight memory; updates below
    #                                    bfloat16's resolution are lost)
    c.model.remat = "dots"             # what a layer keeps for the backward: none | dots | full
    # Kernels and layouts; None = the platform's (`grpo_jax.platform`, docs/accelerators.md):
    c.model.attention = placeholder(str)  # training attention: xla | cudnn | splash
    c.model.kv_layout = placeholder(str)  # KV cache: head_major | seq_major
    c.model.decode_attention = placeholder(str)  # over the KV cache: full | blocked | pallas_gpu
    c.model.model_type = "qwen2"       # from-scratch architecture: llama | qwen2 | qwen3
    c.model.vocab_size = 0             # 0 = the tokenizer's vocabulary size
    c.model.d_model = 128              # hidden size
    c.model.n_layers = 4               # decoder layers
    c.model.n_heads = 4                # attention heads
    c.model.n_kv_heads = 2             # key/value heads (grouped-query attention)
    c.model.head_dim = 32              # per-head dimension
    c.model.d_ff = 384                 # MLP hidden size
    c.model.max_position_embeddings = 256  # context length of a from-scratch model
    c.model.tie_embeddings = True      # share the input embedding and the output head

    c.lora = ml_collections.ConfigDict()  # LoRA adapters (docs/lora.md): the base frozen
    c.lora.rank = 0                    # adapter rank; 0 = full fine-tuning
    c.lora.alpha = 16.0                # scale alpha / rank
    c.lora.dropout = 0.0               # must be 0: log-probs must not be random (ratios, KL)
    c.lora.targets = "wq,wk,wv,wo,w_gate,w_up,w_down"  # the adapted projections

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = placeholder(str)  # HF tokenizer dir; None = model.hf_path, or train one (below)
    c.tokenizer.train_vocab_size = 320  # vocabulary of the sentencepiece model trained for tiny tasks
    c.tokenizer.corpus_rows = 2000     # training rows whose demonstrations form its corpus

    c.env = ml_collections.ConfigDict()
    c.env.name = "calculator"          # a registered env (`grpo_jax.envs.registry`: calculator |
    #                                    arithmetic | countdown | gsm8k) or "package.module:function"
    #                                    (a plug-in: load_environment(**kwargs) -> Environment)
    c.env.kwargs = ml_collections.ConfigDict()  # keyword arguments of the env class
    c.env.rubric_weights = ml_collections.ConfigDict()  # reward function -> weight overrides (0 = metric only)
    # The rubric from config (docs/environments.md): {metric: weight | {"weight": w, "fn": name,
    # **arguments}} with fn a grpo_jax.rubrics factory (correct_answer, format_reward,
    # overlong_penalty, tool_used ...; token rewards overlong_reward, length_metric ...) or a
    # "package.module:function"; empty = the env's own rubric, which this replaces.
    c.env.rubric = ml_collections.ConfigDict()
    c.env.rubric.funcs = ml_collections.ConfigDict()
    # The rows from config (`grpo_jax.envs.datasets`); type None = the env's own data.
    c.env.dataset = ml_collections.ConfigDict()
    c.env.dataset.type = placeholder(str)      # jsonl | hf | tfds
    c.env.dataset.train = placeholder(str)     # jsonl: path of the train split
    c.env.dataset.test = placeholder(str)      # jsonl: path of the test split
    c.env.dataset.path = placeholder(str)      # hf: hub name or local directory (datasets.load_dataset)
    c.env.dataset.name = placeholder(str)      # hf: configuration; tfds: dataset name
    c.env.dataset.data_dir = placeholder(str)  # hf / tfds: data directory (tfds: already prepared)
    c.env.dataset.split = placeholder(str)     # hf / tfds: split to read; None = train / test
    c.env.dataset.question = "question"        # record field of the question
    c.env.dataset.answer = "answer"            # record field of the gold answer
    c.env.dataset.prompt = placeholder(str)    # record field of a message list used as the prompt
    c.env.dataset.info = ()                    # record fields copied into the row's "info"
    # name = "group": {task: {"name": env name, "kwargs": {...}, "weight": share of the rows}}.
    c.env.envs = ml_collections.ConfigDict()
    c.env.num_train = 4000             # training problems (procedural tasks generate them)
    c.env.data_seed = 0                # seed of the procedural datasets (train/test disjoint)

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0                    # warm-start steps on the env's gold demonstrations (0 = none)
    c.sft.batch_size = 32              # demonstrations per step
    c.sft.learning_rate = 3e-3         # AdamW peak learning rate (cosine decay, warm-up below)
    c.sft.warmup_steps = 20            # linear warm-up steps
    c.sft.num_demos = 2000             # demonstrations built from training rows
    c.sft.mixed_steps = 0              # then steps on demos of which direct_answer_fraction skip the tool
    c.sft.mixed_learning_rate = 1e-3   # peak learning rate of those steps
    c.sft.direct_answer_fraction = 0.0  # tool envs: share of mixed demos that skip the tool (env.no_tool_completion)
    c.sft.mixed_trained_tokens = placeholder(int)  # N: mixed demos train only their first N completion
    #                                    tokens (the choice); None = all
    c.sft.seed = placeholder(int)      # seed of the initial weights and the warm start; None =
    #                                    seed (set: GRPO under several seeds from one warm start)
    c.sft.cache_dir = placeholder(str)  # warm-started weights kept here per (seed, model, env,
    #                                    sft) and reused: ablation variants share one warm start
    c.sft.log_every = 50               # progress line every N steps

    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0       # rollout temperature (the train step scores at the same one)
    c.sampling.top_k = 0               # 0 = off
    c.sampling.top_p = 1.0             # 1 = off
    c.sampling.min_p = 0.0             # 0 = off
    c.sampling.max_new_tokens = 32     # tokens per assistant turn
    c.sampling.prompt_bucket = 32      # prompt lengths rounded up to a multiple (fewer compiles)
    c.sampling.batch_bucket = 8        # prompt counts rounded up to a multiple (fewer compiles)
    # ... and then to batch_bucket x a power of two: a multi-turn rollout's later turns carry
    # however many episodes are still running, which would compile one sampler per multiple.
    c.sampling.geometric_batch_buckets = True
    # The sampler reads a compute-dtype copy of the weights gathered over fsdp once per rollout
    # (kept split over tp); False: the train layout (models whose gathered copy does not fit).
    c.sampling.gather_weights = True

    c.rollout = ml_collections.ConfigDict()
    c.rollout.group_size = 8           # completions per prompt (G)
    c.rollout.max_turns = 3            # assistant turns per episode
    c.rollout.max_seq_len = 192        # sequence budget of an episode (<= the model's context)
    c.rollout.mask_truncated = False   # no loss on truncated episodes (DAPO's overlong filtering)
    c.rollout.length_multiple = 32     # trajectory length rounded up to a multiple (fewer compiles)
    c.rollout.mode = "engine"          # engine (continuous batching, caches kept) | lockstep (baseline)

    c.engine = ml_collections.ConfigDict()  # the rollout engine (rollout.mode = "engine"; docs/engine.md)
    c.engine.slots = placeholder(int)  # episodes decoded at once; None: a step's episodes on this process
    c.engine.prefill_chunk = 128       # tokens a slot prefills per call
    c.engine.prefill_rows = 4          # slots prefilled per call
    c.engine.decode_steps = 8          # decode steps per call (the host hands out results that often)

    c.grpo = ml_collections.ConfigDict()
    c.grpo.loss_type = "grpo"          # grpo | bnpo | dr_grpo | dapo | gspo | cispo
    c.grpo.advantage_scale = "group"   # group | batch | none (Dr. GRPO)
    c.grpo.advantage_baseline = "mean"  # mean | leave_one_out (RLOO: the other rewards' mean)
    c.grpo.epsilon = 0.2               # clip range below: ratio >= 1 - epsilon
    c.grpo.epsilon_high = placeholder(float)  # clip range above; None = epsilon (cispo needs it set)
    c.grpo.delta = placeholder(float)  # two-sided clip cap of the ratio (INTELLECT-2); None = off
    c.grpo.beta = 0.0                  # KL(pi || pi_ref) weight (grpo.kl_estimator); > 0 keeps a reference
    c.grpo.kl_estimator = "k3"         # k1 | k2 | k3 (Schulman 2020) for the beta term and the kl metric
    c.grpo.importance_sampling_level = "token"  # token | sequence (GSPO)
    c.grpo.num_iterations = 1          # mu: updates per batch of rollouts
    c.grpo.pack = True                 # several episodes per train row of rollout.max_seq_len tokens
    #                                    (`grpo_jax.packing`; the same update, less padding); False:
    #                                    one episode per row, padded to the step's longest
    c.grpo.micro_batch_size = placeholder(int)  # rows per gradient-accumulation step (packed: rows
    #                                    of rollout.max_seq_len tokens); None = the batch
    c.grpo.micro_batch_tokens = placeholder(int)  # packed only, instead of micro_batch_size: token
    #                                    positions per micro-batch (rows = this // rollout.max_seq_len)
    c.grpo.chunk_size = placeholder(int)  # vocabulary chunk of the log-prob computation; None = by
    #                                    platform (`grpo_jax.platform`: 1024 on CPU, 8192 elsewhere)
    c.grpo.tis_cap = placeholder(float)  # cap C of the sampler -> trainer importance weight
    #                                    (staleness, kernel mismatch); None = off (the sampler's
    #                                    log-probs are then the old policy's)
    c.grpo.tis_mode = "truncate"       # truncate (TIS: w = min(w, C)) | mask (MIS: no loss where w > C)
    c.grpo.tis_level = "token"         # token | sequence (w of a sequence: exp of its summed log-ratio)
    c.grpo.entropy_coef = 0.0          # entropy bonus: loss - coef x entropy (same normalisation)
    c.grpo.high_entropy_fraction = placeholder(float)  # rho: train only the top rho of tokens by
    #                                    entropy (Wang et al. 2025 use 0.2); None = every token
    c.grpo.num_mini_batches = 1        # optimizer updates per pass over the batch (PPO mini-batches)
    c.grpo.ref_sync_every = 0          # beta > 0: the reference becomes the current policy every N
    #                                    steps; 0 = frozen at the start
    c.grpo.multi_reward = "sum"        # sum (weighted sum, then group advantages) | normalize_then_sum
    #                                    (GDPO: each function's group advantages, weighted and summed)
    c.grpo.credit = "episode"          # episode (one advantage per episode) | turn (per-turn returns
    #                                    of the env's turn rewards, `grpo_jax.credit`)
    c.grpo.turn_discount = 1.0         # gamma of the per-turn returns (credit = "turn")
    c.grpo.dynamic_sampling = False    # DAPO: drop groups whose rewards do not vary, roll out more
    #                                    prompts until the batch holds prompts_per_step groups
    c.grpo.max_sampling_rounds = 4     # rollouts per step at most under dynamic_sampling (then the
    #                                    batch is filled up with dropped groups, logged)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4       # peak learning rate
    c.optim.schedule = "constant"      # constant | linear | cosine
    c.optim.warmup_steps = 0           # linear warm-up updates
    c.optim.weight_decay = 0.0         # AdamW decoupled weight decay
    c.optim.b2 = 0.99                  # Adam second-moment decay
    c.optim.max_grad_norm = ml_collections.FieldReference(1.0, field_type=float)  # global-norm
    #                                    gradient clipping; None = off

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 50             # GRPO steps (one batch of rollouts and its updates each)
    c.train.prompts_per_step = 8       # prompts per step; the batch is prompts * group_size rows
    c.train.log_every = 1              # progress line every N steps (metrics.jsonl gets every step)
    c.train.eval_every = 25            # evaluate every N steps (and before the first, after the last)
    c.train.staleness = 0              # k: rollouts sample from weights up to k updates old, while
    #                                    the update runs (one-step off-policy overlap); 0 = synchronous
    c.train.store_rollouts = True      # each step's episodes, scores and advantages to workdir/rollouts/
    #                                    (`grpo_jax.rollout_store`: re-score them with another rubric)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 100          # held-out problems
    c.eval.correct_fn = "correct_answer"  # rubric function that decides correctness
    c.eval.greedy = True               # greedy accuracy
    c.eval.k = placeholder(int)        # samples per problem for pass@k / mean@k; None = off
    c.eval.temperature = 1.0           # temperature of those samples
    c.eval.num_samples_logged = 3      # conversations written to samples.txt per evaluation

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1                    # pure data parallelism
    c.mesh.fsdp = -1                   # fully sharded data parallelism (-1 = remaining devices)
    c.mesh.tp = 1                      # tensor parallelism

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 25            # save every N steps (and on SIGTERM and at the end)
    c.checkpoint.keep = 3              # checkpoints kept
    c.checkpoint.async_save = True     # write in the background
    return c
