"""Fixtures shared by tests/unit/ and tests/e2e/: random-weight replicas of real checkpoints, in folders and
in an offline hub cache, and the in-process CLI. Plain builders and constants are in tests/helpers.py.

The hub is unreachable here, so every test builds its checkpoints locally (see nnxport.testing). The
hub environment is fixed before anything imports huggingface_hub (it reads it at import time): offline,
with a cache private to this test session.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
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

from nnxport.sources import safetensors as safetensors_mod  # noqa: E402
from nnxport.testing.replicas import build_replica, published_config  # noqa: E402
from tests.helpers import TINY_RESNET, Opens  # noqa: E402


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


# ------------------------------------------------- hostile inputs: what was opened, and hangs

@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> Opens:
    seen = Opens()

    def record(path: Any) -> None:
        if isinstance(path, str | bytes | os.PathLike):
            with contextlib.suppress(ValueError, OSError):  # a NUL in the name: nothing can be opened
                seen.paths.append(os.path.realpath(os.fsdecode(path)))

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def opened(path: Any, *args: Any, **kwargs: Any) -> Any:
            record(path)
            return fn(path, *args, **kwargs)

        return opened

    monkeypatch.setattr(os, "open", wrap(os.open))
    monkeypatch.setattr(builtins, "open", wrap(builtins.open))
    monkeypatch.setattr(io, "open", wrap(io.open))
    monkeypatch.setattr(safetensors_mod, "safe_open", wrap(safetensors_mod.safe_open))
    return seen


@pytest.fixture
def alarm() -> Iterator[None]:
    """A hang (a FIFO opened for reading, an alias bomb) fails the test after 60 s instead of blocking the
    suite: the alarm repeats every 2 s, since code with a broad ``except`` may swallow one."""

    def fire(signum: int, frame: object) -> None:
        raise TimeoutError("the command hung")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, 60, 2)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
