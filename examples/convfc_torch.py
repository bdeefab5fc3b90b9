"""The PyTorch original of :class:`examples.convfc.ConvFc` (the seeds' conv + fc model, configurable).

``python -m examples.convfc_torch OUT_DIR`` writes a random-weight checkpoint (``model.safetensors``) and
its config (``config.yaml``) into OUT_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

CONFIG: dict[str, Any] = {"in_channels": 3, "channels": 4, "kernel_size": 2, "image_size": 6,
                          "num_classes": 2}


class TorchConvFc(torch.nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        k, size = int(config["kernel_size"]), int(config["image_size"])
        self.conv = torch.nn.Conv2d(int(config["in_channels"]), int(config["channels"]), kernel_size=k,
                                    padding="valid")
        side = size - k + 1
        self.fc = torch.nn.Linear(int(config["channels"]) * side * side, int(config["num_classes"]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv(images)                 # [N, C, H, W]
        x = x.reshape(x.shape[0], -1)         # flattened in (C, H, W) order
        return self.fc(x)


def save_checkpoint(out: Path, config: dict[str, Any] | None = None, *, seed: int = 0) -> Path:
    """A random-weight TorchConvFc saved as ``out/model.safetensors`` with ``out/config.yaml``."""
    import yaml
    from safetensors.torch import save_file

    config = dict(CONFIG if config is None else config)
    torch.manual_seed(seed)
    model = TorchConvFc(config)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out / "model.safetensors"


if __name__ == "__main__":
    print(save_checkpoint(Path(sys.argv[1])), file=sys.stderr)
