"""Restore speed: ``nnxport.load`` of a converted folder, and, for contrast, every tensor of its source
read from the safetensors (nnxport's own reader, stored dtype), timed in one fresh interpreter; the seconds
and bytes go to a JSON file.

    python bench/load.py CONVERTED_DIR SOURCE_DIR REPORT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from flax import nnx

import nnxport
from nnxport.sources.folder import open_source


def main() -> None:
    folder, source, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    t = time.perf_counter()
    model = nnxport.load(folder)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(leaves)
    load_s = time.perf_counter() - t
    nbytes = sum(x.nbytes for x in leaves)
    del model, leaves
    t = time.perf_counter()
    with open_source(str(source)) as src:
        for key in src.tensors:
            src.read(key)
    source_s = time.perf_counter() - t
    report.write_text(json.dumps({"load_s": load_s, "source_s": source_s, "bytes": nbytes}))


if __name__ == "__main__":
    main()
