"""Fixtures shared by tests/unit/ and tests/e2e/: random-weight replicas of real checkpoints, in folders and
in an offline hub cache, and the in-process CLI. Plain builders and constants are in tests/helpers.py.

The hub is unreachable here, so every test builds its checkpoints locally (see nnxport.testing). The
hub environment is fixed before anything imports huggingface_hub (it reads it at import time): offline,
with a cache private to this test session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HUB = Path(tempfile.mkdtemp(prefix="nnxport-test-hub-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_HUB)
os.environ["HF_HOME"] = str(_HUB / "home")
os.environ.pop("HF_TOKEN", None)
# 8 simulated CPU devices for the --mesh tests (read by jax when its CPU backend starts).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from nnxport.testing.replicas import build_replica, published_config  # noqa: E402
from tests.helpers import TINY_RESNET  # noqa: E402


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    return _HUB


@pytest.fixture(scope="session")
def resnet50_hub(hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """microsoft/resnet-50 (full size, random weights) in the offline hub cache."""
    from nnxport.testing.hub import write_hub_cache

    folder = build_replica(published_config("microsoft/resnet-50"), tmp_path_factory.mktemp("r50"))
    write_hub_cache(hub_cache, "microsoft/resnet-50", folder)
    return "microsoft/resnet-50"


@pytest.fixture(scope="session")
def resnet18_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """microsoft/resnet-18 (basic blocks, full size, random weights) in a plain folder."""
    folder = tmp_path_factory.mktemp("r18") / "resnet-18"
    return build_replica(published_config("microsoft/resnet-18"), folder)


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bottleneck ResNet (2 stages) in a plain folder: fast to convert."""
    return build_replica(TINY_RESNET, tmp_path_factory.mktemp("tiny") / "tiny-resnet", seed=1)


@pytest.fixture
def cli() -> Callable[..., Any]:
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from nnxport.cli import app

    runner = CliRunner()

    def run(*args: str | os.PathLike[str], input: str | None = None) -> Any:
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return run

