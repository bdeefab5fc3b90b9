"""Random-weight replicas of published checkpoints, built offline with transformers.

The Hugging Face hub is not always reachable (it is not on our CI machines), so the demo, the tests and
the benchmarks build checkpoints that have the real architectures, key names, shapes and dtypes, with
random weights. Every float tensor is randomised — BatchNorm running statistics and norm scales included —
so that a mapping mistake anywhere changes the outputs. The configs come from
:mod:`nnxport.testing.published`.

``python -m nnxport.testing.replicas REPO_ID --hub-cache DIR`` puts one into a hub-style cache.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nnxport.testing.published import published, published_config

__all__ = ["build_replica", "edit_safetensors", "published_config"]


def build_replica(
    config: dict[str, Any],
    out: Path,
    *,
    seed: int = 0,
    base_model: bool = False,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    hub_config: bool = False,
) -> Path:
    """Write a random-weight transformers checkpoint for ``config`` into folder ``out``.

    ``base_model`` saves the headless model (e.g. ResNetModel: keys without the ``resnet.`` prefix).
    ``hub_config`` writes ``config`` itself as config.json, as the hub has it (older field names such
    as ``rope_scaling`` included), instead of what this transformers version's ``save_pretrained``
    writes.
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = copy.deepcopy(config)
    archs = config.pop("architectures", None) or []
    model_type = config.pop("model_type")
    # for_model fills nested dicts (rope_scaling) in place: give it its own copy.
    hf_config = transformers.AutoConfig.for_model(model_type, **copy.deepcopy(config))
    torch.manual_seed(seed)
    model: Any = (transformers.AutoModel.from_config(hf_config) if base_model
                  else getattr(transformers, archs[0])(hf_config))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)  # must stay positive
            elif name.endswith("weight") and tensor.ndim == 1:  # norm scales (initialised to 1)
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    # save_pretrained writes config.json; make its architectures match what was saved.
    cfg_path = out / "config.json"
    saved = {"model_type": model_type, **config} if hub_config else json.loads(cfg_path.read_text())
    saved["architectures"] = [type(model).__name__]
    cfg_path.write_text(json.dumps(saved, indent=2) + "\n")
    return out


def edit_safetensors(folder: Path, *, add: dict[str, Any] | None = None, drop: Iterable[str] = (),
                     rename: Callable[[str], str] | None = None) -> None:
    """Rewrite every ``*.safetensors`` file of ``folder`` (and its index) the way older or differently
    saved checkpoints look: ``add`` tensors (numpy arrays, into the first file), ``drop`` keys, ``rename``
    keys (e.g. strip a ``bert.`` prefix)."""
    import ml_dtypes  # noqa: F401  (bf16 through numpy)
    from safetensors.numpy import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    dropped = set(drop)
    weight_map: dict[str, str] = {}
    for i, path in enumerate(files):
        tensors = {k: v for k, v in load_file(path).items() if k not in dropped}
        if rename is not None:
            tensors = {rename(k): v for k, v in tensors.items()}
        if i == 0 and add:
            tensors.update(add)
        save_file(tensors, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, path.name))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m nnxport.testing.replicas REPO_ID --hub-cache DIR``: put a replica of REPO_ID into a
    hub-style cache (once; an existing snapshot is kept)."""
    import argparse
    import sys
    import tempfile

    from nnxport.testing.hub import write_hub_cache

    parser = argparse.ArgumentParser(prog="python -m nnxport.testing.replicas", description=main.__doc__)
    parser.add_argument("repo_id", choices=sorted(published()))
    parser.add_argument("--hub-cache", type=Path, required=True)
    args = parser.parse_args(argv)
    repo_dir = args.hub_cache / ("models--" + args.repo_id.replace("/", "--"))
    if (repo_dir / "refs" / "main").is_file():
        print(f"replica of {args.repo_id} already in {args.hub_cache}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_replica(published_config(args.repo_id), Path(tmp) / "model")
        snapshot = write_hub_cache(args.hub_cache, args.repo_id, Path(tmp) / "model")
    print(f"wrote a random-weight replica of {args.repo_id} to {snapshot}", file=sys.stderr)


if __name__ == "__main__":
    main()
