"""The seed guide's way ("Porting PyTorch weights to NNX" in the Flax "From PyTorch to Jax and Flax"
guide): load the PyTorch state dict, turn each tensor into a ``jax.Array`` with ``jnp.asarray``, cast it
to the target dtype, and save the lot with Orbax. No key mapping and no model (the mapping is cheap next
to the copies), so this measures the guide's data path only.

numpy has no bf16 that torch will hand over (``jnp.asarray`` of a bf16 tensor raises "Got unsupported
ScalarType BFloat16"), so bf16 tensors go through float32 (``t.float().numpy()``) and are cast back with
``.astype(jnp.bfloat16)``, the guide's ``tensor.astype(state_dict[key].dtype)``: the result keeps the
checkpoint's bf16. The state dict comes from ``safetensors.torch.load_file`` per shard.

    python bench/seed_way.py CHECKPOINT_DIR OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import torch
from safetensors.torch import load_file


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """The guide's ``jnp.asarray(tensor)``, through float32 for dtypes numpy cannot take from torch."""
    if tensor.dtype in (torch.bfloat16, torch.float16):
        dtype = jnp.bfloat16 if tensor.dtype == torch.bfloat16 else jnp.float16
        return jnp.asarray(tensor.float().numpy()).astype(dtype)
    return jnp.asarray(tensor.numpy())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python bench/seed_way.py CHECKPOINT_DIR OUT_DIR")
    source, out = Path(args[0]), Path(args[1]).absolute()
    state_dict: dict[str, torch.Tensor] = {}
    for path in sorted(source.glob("*.safetensors")):
        state_dict.update(load_file(path))
    jax_state: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        *parents, leaf = key.split(".")
        node = jax_state
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = to_jax(tensor)
    shutil.rmtree(out, ignore_errors=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, jax_state)
        ckptr.wait_until_finished()


if __name__ == "__main__":
    main()
