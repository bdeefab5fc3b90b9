"""Builders shared by the test modules (tests/unit/, tests/e2e/): paths, configs, mappings, small helpers.

Test modules import from here (and take fixtures from tests/conftest.py), never from one another. Nothing
here is a fixture; importing it has no side effect beyond reading the built-in ResNet mapping.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from nnxport.mapping.analysis import TensorSpec
from nnxport.testing.replicas import published_config

#: The repository's root (this file is tests/helpers.py).
ROOT = Path(__file__).resolve().parents[1]
#: The built-in mappings.
MAPPINGS = ROOT / "mappings"
RESNET_YAML = (MAPPINGS / "resnet.yaml").read_text()
#: Pieces of RESNET_YAML that tests cut out or rewrite to break the mapping.
CLS_BIAS_RULE = "  - from: '^classifier\\.1\\.bias$'\n    to: 'classifier.bias'\n"
CLS_WEIGHT_OPS = "    to: 'classifier.kernel'\n    ops: [{transpose: [1, 0]}]\n"
STEM_VAR_RULE = ("  - from: '^(?:resnet\\.)?embedder\\.embedder\\.normalization\\.running_var$'\n"
                 "    to: 'stem.bn.var'\n")

#: A small bottleneck ResNet (2 stages): fast to convert (conftest's ``tiny_resnet_dir`` is this config).
TINY_RESNET: dict[str, Any] = published_config(
    "microsoft/resnet-50", depths=[1, 2], hidden_sizes=[32, 64], embedding_size=16, num_labels=10
)


def run_subprocess(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nnxport ARGS`` in a fresh interpreter (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nnxport", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def convert_until_staging(source: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``python -m nnxport convert SOURCE --out out`` in ``cwd``; return once its staging folder
    (``.out.nnxport-partial-*``) exists, i.e. while it is writing."""
    proc = subprocess.Popen([sys.executable, "-m", "nnxport", "convert", source, "--out", "out"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.nnxport-partial-") for p in cwd.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    return proc


def convert_json(cli: Callable[..., Any], source: str | Path, out: Path, *args: str) -> dict[str, Any]:
    """``nnxport convert SOURCE --out OUT --format json ARGS`` through the ``cli`` fixture; must exit 0."""
    res = cli("convert", source, "--out", out, "--format", "json", *args)
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``folder/model.safetensors``, by key."""
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)


def copy_source(tiny: Path, tmp: Path, name: str = "src") -> Path:
    """A copy of the checkpoint folder ``tiny`` at ``tmp/name``, free to break."""
    return Path(shutil.copytree(tiny, tmp / name))


def shard(src: Path) -> Path:
    """Split src/model.safetensors into two shards with an index."""
    tensors = load_file(src / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, str(src / name))
    (src / "model.safetensors").unlink()
    weight_map = {k: name for name, ks in parts.items() for k in ks}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def spec(*shape: int, dtype: str = "float32") -> TensorSpec:
    """A fake tensor's spec: ``spec(3, 6)`` is a float32 (3, 6)."""
    return TensorSpec(tuple(shape), dtype)


def hub_response(status: int, repo: str) -> httpx2.Response:
    """The HTTP response a hub error carries: ``status`` for the model API of ``repo``."""
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo}"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for jax.distributed's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Opens:
    """Every path opened through Python (os.open, open, io.open) or safetensors' safe_open."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def inside(self, folder: Path) -> list[str]:
        root = os.path.realpath(folder)
        return [p for p in self.paths if p == root or p.startswith(root + os.sep)]


def tree_state(*roots: Path, include_roots: bool = False) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``roots`` (symlinks not followed; the roots themselves with ``include_roots``):
    path -> (mode, size, mtime_ns), what "nothing was created, changed or deleted" compares."""
    out: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        paths = [str(root)] if include_roots else []
        for dirpath, dirnames, filenames in os.walk(root):
            paths += [os.path.join(dirpath, name) for name in [*dirnames, *filenames]]
        for path in paths:
            st = os.lstat(path)
            out[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
