"""SIGINT / SIGTERM in the middle of a conversion: exit 130 / 143, nothing left that looks finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ROOT, convert_until_staging, free_port


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_conversion_cleans_up(resnet50_hub: str, tmp_path: Path, sig: int, code: int) -> None:
    proc = convert_until_staging(resnet50_hub, tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)})
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


# ------------------------------------------------------------- issue 12: interrupts at every point of a run

#: small write groups: a save of the ~240 MB replica below is nearly always in flight
GROUPS = {"NNXPORT_WRITE_GROUP_MB": "16", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-shaped replica of ~240 MB (fp32): its streaming write takes ~15 groups of 16 MB."""
    from nnxport.testing.replicas import build_replica, published_config

    cfg = published_config("meta-llama/Llama-3.2-1B", num_hidden_layers=4, hidden_size=768,
                           intermediate_size=3072, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                           vocab_size=32000)
    return build_replica(cfg, tmp_path_factory.mktemp("llama") / "llama")


def _staging(cwd: Path) -> Path | None:
    return next((p for p in cwd.iterdir() if p.name.startswith(".out.nnxport-partial-")), None)


def _in_staging(*parts: str) -> Callable[[Path, list[str]], bool]:
    def seen(cwd: Path, lines: list[str]) -> bool:
        staging = _staging(cwd)
        return staging is not None and staging.joinpath(*parts).exists()

    return seen


MARKERS: dict[str, Callable[[Path, list[str]], bool]] = {
    # the source is resolved: planning (mapping, abstract model) runs, or has just ended
    "planning": lambda cwd, lines: any("INFO: source " in line for line in lines),
    "read-place": _in_staging(),  # the staging folder exists: tensors are read and placed
    "save-in-flight": _in_staging("checkpoint.partial_save.orbax-checkpoint-tmp"),  # Orbax writes a group
    "finalize": _in_staging("checkpoint.partial_save", "state"),  # the groups are merged into one
    "parity": _in_staging("checkpoint"),  # the checkpoint is final: parity (or the manifest) runs
}
CASES = [("planning", signal.SIGTERM), ("read-place", signal.SIGINT), ("save-in-flight", signal.SIGINT),
         ("save-in-flight", signal.SIGTERM), ("finalize", signal.SIGTERM), ("parity", signal.SIGINT)]


def _interrupt(argv: list[str], cwd: Path, sig: int, marker: Callable[[Path, list[str]], bool],
               env: dict[str, str]) -> tuple[int, str, float]:
    """Run ``python -m nnxport ARGV``, send ``sig`` once ``marker`` holds; (exit code, stderr, seconds
    from the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "nnxport", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not marker(cwd, lines):
        assert proc.poll() is None, f"the run ended before the marker: {''.join(lines)}"
        assert time.monotonic() < deadline, "the marker never showed"
        time.sleep(0.005)
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    took = time.monotonic() - sent
    reader.join(10)
    return proc.returncode, "".join(lines), took


def _assert_interrupted(code: int, stderr: str, took: float, sig: int, cwd: Path) -> None:
    assert code == (130 if sig == signal.SIGINT else 143), stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    tail = [line for line in stderr.splitlines() if not line.startswith("nnxport: ")]  # logs, progress
    assert len(tail) == 1 and tail[0].startswith(("interrupted (SIGINT)", "terminated (SIGTERM)")), stderr
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())  # neither the output nor its staging folder
    assert took < 10, f"{took:.1f} s from the signal to the exit"


@pytest.mark.parametrize(("point", "sig"), CASES, ids=[f"{p}-{signal.Signals(s).name}" for p, s in CASES])
def test_interrupt_at_every_point_of_a_streaming_conversion(point: str, sig: int, llama_dir: Path,
                                                             tmp_path: Path) -> None:
    parity = [] if point == "parity" else ["--no-parity"]
    code, stderr, took = _interrupt(["convert", str(llama_dir), "--out", "out", *parity], tmp_path, sig,
                                    MARKERS[point], GROUPS)
    _assert_interrupted(code, stderr, took, sig, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_unreachable_coordinator_waits_visibly_and_obeys_signals(sig: int, tiny_resnet_dir: Path,
                                                                  tmp_path: Path) -> None:
    argv = ["convert", str(tiny_resnet_dir), "--out", "out", "--mesh", "data=1", "--coordinator",
            f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1"]
    waiting = "waiting for coordinator 127.0.0.1:"
    code, stderr, took = _interrupt(argv, tmp_path, sig, lambda _, lines: any(waiting in x for x in lines),
                                    {"PYTHONPATH": str(ROOT)})
    _assert_interrupted(code, stderr, took, sig, tmp_path)


def test_unreachable_coordinator_gives_up_after_its_timeout(tiny_resnet_dir: Path, tmp_path: Path) -> None:
    argv = ["convert", str(tiny_resnet_dir), "--out", "out", "--mesh", "data=1", "--coordinator",
            f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1", "-q"]
    t = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NNXPORT_COORDINATOR_TIMEOUT": "2"}
    res = subprocess.run([sys.executable, "-m", "nnxport", *argv], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error: --coordinator 127.0.0.1:") and "within 2 s" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert time.monotonic() - t < 30 and list(tmp_path.iterdir()) == []


class _SignalsItselfWhenCollected:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, where Python ignores what it raises


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost exception itself
def test_a_signal_lost_in_a_callback_is_raised_at_the_next_check() -> None:
    from nnxport import interrupt

    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        interrupt.install()
        obj = _SignalsItselfWhenCollected()
        del obj  # "Exception ignored in ... __del__": the Terminated raised by the handler is lost
        assert interrupt.received() == signal.SIGTERM
        with pytest.raises(interrupt.Terminated):
            interrupt.check()
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised, while cleanup runs
            interrupt.check()
        with pytest.raises(interrupt.Terminated):  # the first signal is the one reported
            interrupt.check()
    finally:
        interrupt.reset()
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
