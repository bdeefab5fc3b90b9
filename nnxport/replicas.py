"""Random-weight replicas of published checkpoints, built offline with transformers.

The Hugging Face hub is not always reachable (it is not on our CI machines), so the demo, the tests and
the benchmarks build checkpoints that have the real architectures, key names, shapes and dtypes, with
random weights. Every float tensor is randomised — BatchNorm running statistics and norm scales included —
so that a mapping mistake anywhere changes the outputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

#: Published configs (architecture fields only; label names are replaced by LABEL_i).
PUBLISHED: dict[str, dict[str, Any]] = {
    "microsoft/resnet-50": {
        "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
        "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64,
        "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
        "num_channels": 3, "num_labels": 1000,
    },
    "microsoft/resnet-18": {
        "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
        "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "embedding_size": 64,
        "layer_type": "basic", "hidden_act": "relu", "downsample_in_first_stage": False,
        "num_channels": 3, "num_labels": 1000,
    },
}


def published_config(repo_id: str, **overrides: Any) -> dict[str, Any]:
    """The published config of ``repo_id`` with ``overrides`` applied."""
    config = copy.deepcopy(PUBLISHED[repo_id])
    config.update(overrides)
    return config


def build_replica(
    config: dict[str, Any],
    out: Path,
    *,
    seed: int = 0,
    base_model: bool = False,
    max_shard_size: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight transformers checkpoint for ``config`` into folder ``out``.

    ``base_model`` saves the headless model (e.g. ResNetModel: keys without the ``resnet.`` prefix).
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = dict(config)
    archs = config.pop("architectures", None) or []
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    model: Any = (transformers.AutoModel.from_config(hf_config) if base_model
                  else getattr(transformers, archs[0])(hf_config))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)  # must stay positive
            elif name.endswith(("normalization.weight", "norm.weight", "LayerNorm.weight")):
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
    saved = json.loads(cfg_path.read_text())
    saved["architectures"] = [type(model).__name__]
    cfg_path.write_text(json.dumps(saved, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m nnxport.replicas REPO_ID --hub-cache DIR``: put a replica of REPO_ID into a hub-style
    cache (once; an existing snapshot is kept)."""
    import argparse
    import sys
    import tempfile

    from nnxport.source import write_hub_cache

    parser = argparse.ArgumentParser(prog="python -m nnxport.replicas", description=main.__doc__)
    parser.add_argument("repo_id", choices=sorted(PUBLISHED))
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
