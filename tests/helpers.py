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


# ------------------------------------------------------------------ causal LMs against transformers

def lm_reference(folder: Path) -> Any:
    """The transformers model of a replica ``folder`` (its config.json's architecture), float32, eager
    attention, eval mode."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32,
                                                       attn_implementation="eager").eval()


def lm_reference_logits(folder: Path, harness: Any, inputs: list[Any]) -> np.ndarray:
    """The reference's parity logits (``harness.run_reference``) on ``inputs``."""
    return harness.run_reference(lm_reference(folder), inputs)["logits"]


def lm_generate_reference(folder: Path, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    """transformers' greedy ``generate`` of ``new`` tokens (no eos stopping): prompt + new tokens."""
    import torch

    model = lm_reference(folder)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=new,
                             do_sample=False)
    return out.numpy()


def lm_gradients_match(src: Path, out: Path, tmp: Path, *, vocab: int) -> None:
    """Assert that d sum(logits * R) / d every parameter of the conversion ``out`` (train mode) equals
    torch's for the replica ``src``: torch's gradients, saved under the source's key names, are converted
    with the same mapping (every op of a mapping is a linear rearrangement, so the gradient of a target is
    the ops applied to its source's gradient)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers.core_model_loading import revert_weight_conversion

    import nnxport

    ids = np.random.default_rng(7).integers(0, vocab, size=(2, 12))
    ref = lm_reference(src).train()
    logits = ref(input_ids=torch.from_numpy(ids)).logits
    weights = np.random.default_rng(3).standard_normal(tuple(logits.shape)).astype(np.float32)
    (logits * torch.from_numpy(weights)).sum().backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad
             for k, p in ref.named_parameters(remove_duplicate=False)}
    saved = revert_weight_conversion(ref, grads)
    keys = load_file(str(src / "model.safetensors"))
    folder = tmp / "grads"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    save_file({k: saved[k].detach().numpy() for k in keys}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    nnxport.convert(folder, tmp / "grads-nnx", parity=False)
    flat = lambda state: {".".join(map(str, p)): np.asarray(v.get_value())  # noqa: E731
                          for p, v in nnx.to_flat_state(state)}
    expected = flat(nnx.state(nnxport.load(tmp / "grads-nnx"), nnx.Param))

    model = nnxport.load(out)
    model.train()

    def loss(m: Any) -> jax.Array:
        return jnp.sum(m(jnp.asarray(ids, jnp.int32)).astype(jnp.float32) * weights)

    got = flat(nnx.grad(loss)(model))
    assert got and set(got) == set(expected)
    for path, g in got.items():
        scale = float(np.abs(expected[path]).max())
        diff = float(np.abs(g - expected[path]).max())
        assert diff <= 1e-4 * scale + 1e-6, f"d loss / d {path}: max |Δ| {diff:.3g} (max |g| {scale:.3g})"
