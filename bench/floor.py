"""The floor: the least any converter must do. Read every tensor of a safetensors checkpoint and save
them all in one Orbax checkpoint, with no key mapping, no model, no parity.

Tensors are read with ``safe_open(framework="numpy")`` in their stored dtype (bf16 through ml_dtypes),
nested by their dotted key names (``model.layers.0.mlp.up_proj.weight`` -> ``tree["model"]["layers"]
["0"]...``), and written with one ``orbax.checkpoint.StandardCheckpointer().save``.

    python bench/floor.py CHECKPOINT_DIR OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safe_open needs it for bf16)
import orbax.checkpoint as ocp
from safetensors import safe_open


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b.c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python bench/floor.py CHECKPOINT_DIR OUT_DIR")
    source, out = Path(args[0]), Path(args[1]).absolute()
    flat: dict[str, Any] = {}
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                flat[key] = f.get_tensor(key)
    shutil.rmtree(out, ignore_errors=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, nest(flat))
        ckptr.wait_until_finished()


if __name__ == "__main__":
    main()
