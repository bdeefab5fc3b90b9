"""The import baseline: the libraries a converter needs, imported and nothing else done. Its peak RSS
is what every case pays before touching a tensor.

Imports jax (and ``jax.numpy``), flax (``flax.nnx``), orbax (``orbax.checkpoint``), torch and
transformers, then asks jax for its devices (starts the CPU backend, which any program that makes an
array does).

    python bench/imports.py
"""

import flax.nnx
import jax
import jax.numpy
import orbax.checkpoint
import torch
import transformers

if __name__ == "__main__":
    jax.devices()
    assert flax.nnx and jax.numpy and orbax.checkpoint and torch and transformers
