"""SIGINT / SIGTERM in the middle of a conversion: exit 130 / 143, nothing left that looks finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_conversion_cleans_up(resnet50_hub: str, tmp_path: Path, sig: int, code: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "nnxport", "convert", resnet50_hub, "--out", "out"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.nnxport-partial-") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder
