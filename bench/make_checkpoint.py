"""Write a random-weight bf16 checkpoint shaped like meta-llama/Llama-3.2-1B (or ``--repo``), in hub format.

Key names and shapes come from transformers' ``LlamaForCausalLM`` built on the meta device (no memory,
no random init) from nnxport's copy of the published config; ``tie_word_embeddings`` is true for
Llama-3.2-1B, so there is no ``lm_head.weight``. The values look like trained weights to a compressor:
matrices normal(0, 0.02), norm scales 1 + normal(0, 0.02), rounded to bf16 (uniform random bits would
compress far better or worse than real weights). The folder gets ``model-0000N-of-0000M.safetensors``
shards of about equal size (3, or more so that none exceeds 5 GB), ``model.safetensors.index.json`` and
the published ``config.json`` (with ``num_hidden_layers`` overridden), as on the hub.

A finished folder has ``bench.json`` (written last); an existing one with the same parameters is
reused, so the checkpoints are built once per machine (under ``.bench/``, which git ignores).

    python bench/make_checkpoint.py .bench/llama-3.2-1b-16l --layers 16
    python bench/make_checkpoint.py .bench/llama-3.1-8b --repo meta-llama/Llama-3.1-8B
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

REPO_ID = "meta-llama/Llama-3.2-1B"
SHARDS = 3
SHARD_MAX_BYTES = 5 * 10**9
STAMP = "bench.json"
VALUES = "normal(0, 0.02)"


def config_for(layers: int | None, repo: str = REPO_ID) -> dict[str, Any]:
    """The published config.json fields of ``repo``, with ``num_hidden_layers = layers`` if given."""
    from nnxport.testing.replicas import published_config

    return published_config(repo, **({} if layers is None else {"num_hidden_layers": layers}))


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every saved tensor of ``LlamaForCausalLM(config)``, in state-dict order, from a meta-device model.

    Tied parameters appear once (``named_parameters`` drops duplicates); persistent buffers are kept
    (Llama has none: its rotary ``inv_freq`` is not persistent)."""
    import torch
    import transformers

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **cfg)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(hf_config)
    persistent = set(model.state_dict())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    return shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """normal(0, 0.02) in bf16 (1 + normal(0, 0.02) for 1-D tensors: norm scales), made in float32 pieces
    of 64M values so that a large tensor never has a float32 copy whole."""
    out = np.empty(shape, dtype=ml_dtypes.bfloat16)
    flat = out.reshape(-1)
    step = 64 * 2**20
    for start in range(0, flat.size, step):
        piece = rng.standard_normal(min(step, flat.size - start), dtype=np.float32)
        piece *= np.float32(0.02)
        if len(shape) == 1:
            piece += np.float32(1.0)
        flat[start:start + piece.size] = piece.astype(ml_dtypes.bfloat16)
    return out


def split_shards(shapes: dict[str, tuple[int, ...]], parts: int) -> list[list[str]]:
    """Consecutive runs of keys with about ``total / parts`` bytes each (the way save_pretrained cuts)."""
    sizes = {k: 2 * int(np.prod(s)) for k, s in shapes.items()}
    target = sum(sizes.values()) / parts
    shards: list[list[str]] = [[]]
    acc = 0
    for key, size in sizes.items():
        if acc >= target * len(shards) and len(shards) < parts:
            shards.append([])
        shards[-1].append(key)
        acc += size
    return shards


def make_checkpoint(folder: Path, layers: int | None, *, seed: int = 0, repo: str = REPO_ID
                    ) -> dict[str, Any]:
    """Write the checkpoint into ``folder`` (reused when its stamp matches); returns the stamp:
    ``{"repo", "layers", "seed", "values", "tensors", "bytes"}``."""
    from safetensors.numpy import save_file

    stamp_path = folder / STAMP
    if stamp_path.is_file():
        stamp: dict[str, Any] = json.loads(stamp_path.read_text())
        if (stamp.get("repo"), stamp.get("layers"), stamp.get("seed"), stamp.get("values")) == (
                repo, layers, seed, VALUES):
            return stamp
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = config_for(layers, repo)
    shapes = tensor_shapes(config)
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    total = 0
    total_bytes = sum(2 * int(np.prod(s)) for s in shapes.values())
    shards = split_shards(shapes, max(SHARDS, -(-total_bytes // SHARD_MAX_BYTES)))
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: random_bf16(shapes[k], rng) for k in keys}
        total += sum(a.nbytes for a in tensors.values())
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    stamp = {"repo": repo, "layers": layers, "seed": seed, "values": VALUES, "tensors": len(shapes),
             "bytes": total}
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers [default: published]")
    parser.add_argument("--repo", default=REPO_ID, help=f"published config to follow [default: {REPO_ID}]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stamp = make_checkpoint(args.folder, args.layers, seed=args.seed, repo=args.repo)
    print(f"{args.folder}: {stamp['tensors']} tensors, {stamp['bytes'] / 1e9:.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
