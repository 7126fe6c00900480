"""midas_jax: MIDAS (middle-layer gradual stacking) pre-training in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="midas_jax",
    version="0.1.0",
    description="Pre-train language models with MIDAS middle-layer gradual stacking in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["midas_jax", "midas_jax.*"]),
    python_requires=">=3.11",
    # The model, growth and train step need only the first group; seqio/tensorflow are imported
    # lazily by the data layer.
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "gin-config>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboard>=2.18",
        "matplotlib>=3.8",  # evaluation and analysis plots (PNG, Agg backend)
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9.6",
        "lm-eval>=0.4.13",  # evaluation.harness; its core needs no torch (brings datasets)
        "safetensors>=0.4",  # HF export/import with its numpy API
    ],
    # tpu: libtpu for the installed jax, which also AOT-compiles for TPU slices on any machine
    # (python -m midas_jax.aot); the tests use it, so launch/test.sh installs it.
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
                    "tpu": ["jax[tpu]"],
                    # hf: check exports against transformers (tests/test_interop.py); ~1-6 GB
                    "hf": ["transformers>=5", "torch>=2.1", "sentencepiece", "protobuf"]},
    entry_points={"console_scripts": ["midas-train=midas_jax.train:main"]},
)
