"""grpo_jax: GRPO for LLMs in pure-functional JAX on sharded Flax NNX weights."""

from setuptools import find_packages, setup

# Runtime dependencies. PyTorch is *not* one of them: it is only used by the
# parity tests against transformers and by the peer benchmarks.
INSTALL_REQUIRES = [
    "jax>=0.6.0",
    "flax>=0.11.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "transformers>=4.51",  # tokenizers, chat templates and config/safetensors files only
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "tensorflow-datasets>=4.9.6",  # used without TensorFlow, via tfds.data_source
    "array_record>=0.5",
    "ml-collections>=0.1.1",
    "absl-py>=2.0",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "sympy>=1.12",
    "jinja2>=3.1.6",  # chat templates for sentencepiece tokenizers
    # The OpenAI-compatible server (FastAPI on uvicorn: pydantic request validation and
    # server-sent events built in) and the client agent environments are written against.
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "openai>=1.50",
]

# PyTorch is pinned: an unpinned `torch` pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"

EXTRAS = {
    "test": [TORCH, "pytest>=8", "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6", "matplotlib>=3.8",
             "peft==0.21.2"],  # tests/test_lora_export.py: PEFT applies our exported adapters
    # TRL 1.x needs Python >= 3.11; the GRPO-step benchmark uses TRL 1.16 internals.
    "bench": [TORCH, "trl==1.16.0", "accelerate>=1.10.1", "datasets>=4.7.0"],
    "notebooks": ["jupyter", "matplotlib>=3.8"],
}

setup(
    name="grpo_jax",
    version="0.1.0",
    description="Group-relative policy optimisation for LLMs in JAX / Flax NNX",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
