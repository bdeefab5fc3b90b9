"""Streamed (block-by-block) parity against whole-model parity on every built-in family: the same verdict and
the same numbers (outputs, per-layer divergence, greedy generation), with at most one block of each side
held when the cache is empty; a broken mapping is still caught; sources that cannot stream fall back to the
whole model, logged; bad settings are one-line errors before any work. Memory at scale: bench/run.py."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nnxport
from nnxport.parity import streamed
from nnxport.pipeline import lazy
from nnxport.testing.replicas import build_replica, published_config
from tests.helpers import MAPPINGS, tree_state

CONFIGS = {
    "bert": published_config("google-bert/bert-base-uncased", hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128, vocab_size=512,
                             max_position_embeddings=64, initializer_range=0.1),
    "vit": published_config("google/vit-base-patch16-224", hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                            num_labels=10, initializer_range=0.1),
    "gpt2": published_config("openai-community/gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                             n_positions=64, initializer_range=0.1),
    "decoder": published_config("meta-llama/Llama-3.2-1B", hidden_size=64, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, num_hidden_layers=3,
                                intermediate_size=128, vocab_size=512),
}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory, tiny_resnet_dir: Path) -> Callable[[str], Path]:
    built: dict[str, Path] = {"resnet": tiny_resnet_dir}

    def make(family: str) -> Path:
        if family not in built:
            built[family] = build_replica(CONFIGS[family], tmp_path_factory.mktemp(family) / family, seed=5,
                                          hub_config=True)
        return built[family]

    return make


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)


@pytest.mark.parametrize("family", ["resnet", "vit", "bert", "gpt2", "decoder"])
def test_streamed_parity_equals_whole_model_parity(family: str, replica: Callable[[str], Path], cli,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("NNXPORT_PARITY_MODE", "whole")
    res = cli("convert", replica(family), "--out", out, "-q")
    assert res.exit_code == 0, res.stderr
    whole = json.loads((out / "parity.json").read_text())
    monkeypatch.setenv("NNXPORT_PARITY_MODE", "streamed")
    monkeypatch.setenv("NNXPORT_PARITY_CACHE_MB", "0")  # every block read again on each use
    res = cli("verify", out)
    assert res.exit_code == 0, res.stderr
    assert "parity: streamed, block by block" in res.stderr
    stream = json.loads((out / "parity.json").read_text())
    assert stream["passed"] is whole["passed"] is True
    assert [o["name"] for o in stream["outputs"]] == [o["name"] for o in whole["outputs"]]
    for s, w in zip(stream["outputs"], whole["outputs"], strict=True):
        assert _close(s["max_abs_diff"], w["max_abs_diff"]), (s, w)
        assert s["passed"] is w["passed"]
    assert [x["name"] for x in stream["layers"]] == [x["name"] for x in whole["layers"]]
    assert len(stream["layers"]) >= 3
    for s, w in zip(stream["layers"], whole["layers"], strict=True):
        assert _close(s["max_rel_diff"], w["max_rel_diff"]), (s, w)
    assert stream.get("generation") == whole.get("generation")
    if family in ("gpt2", "decoder"):
        assert stream["generation"]["all_match"] is True


def test_streamed_convert_holds_at_most_one_block_per_side(replica: Callable[[str], Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With no cache, each side has one block loaded at a time, and every block is read again for each
    pass (logits, then one pass per greedy token)."""
    monkeypatch.setenv("NNXPORT_PARITY_MODE", "streamed")
    monkeypatch.setenv("NNXPORT_PARITY_CACHE_MB", "0")
    torch_live: list[int] = []
    load, release = streamed.StreamedReference._load, streamed.StreamedReference._release

    def counting_load(self: streamed.StreamedReference, block: Any) -> None:
        load(self, block)
        torch_live.append(sum(b.loaded for b in self.blocks))

    monkeypatch.setattr(streamed.StreamedReference, "_load", counting_load)
    monkeypatch.setattr(streamed.StreamedReference, "_release", release)
    nnx_live: list[int] = []
    reads: list[str] = []
    read = lazy.CheckpointBlocks._read

    def counting_read(self: lazy.CheckpointBlocks, block: str) -> dict[str, Any]:
        reads.append(block)
        nnx_live.append(len(self.kept) + (self.current is not None))
        return read(self, block)

    monkeypatch.setattr(lazy.CheckpointBlocks, "_read", counting_read)
    result = nnxport.convert(replica("decoder"), tmp_path / "out")
    assert result.passed
    assert torch_live and max(torch_live) == 1
    assert nnx_live and max(nnx_live) <= 1  # counted before the new block is held: the old one is gone
    passes = 1 + 8  # logits, then 8 greedy tokens (the prompt's pass gives the first)
    assert reads.count("layers.0") == passes
    # the tied head reads the embedding again, and the next pass starts with the block still held
    assert reads.count("embed") == passes + 1


def test_cache_keeps_blocks_between_passes(replica: Callable[[str], Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNXPORT_PARITY_MODE", "streamed")
    monkeypatch.setenv("NNXPORT_PARITY_CACHE_MB", "64")
    reads: list[str] = []
    read = lazy.CheckpointBlocks._read
    monkeypatch.setattr(lazy.CheckpointBlocks, "_read",
                        lambda self, block: reads.append(block) or read(self, block))
    assert nnxport.convert(replica("decoder"), tmp_path / "out").passed
    assert sorted(reads) == sorted(set(reads))  # each block read once: 64 MB hold them all


def test_broken_mapping_is_caught_streamed(replica: Callable[[str], Path], tmp_path: Path, cli,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    text = (MAPPINGS / "decoder.yaml").read_text()
    rule = "    to: 'layers.\\1.attn.o.kernel'\n    shard: [model, data]\n    ops: [{transpose: [1, 0]}]\n"
    assert rule in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(rule, "    to: 'layers.\\1.attn.o.kernel'\n"))  # o_proj not transposed
    monkeypatch.setenv("NNXPORT_PARITY_MODE", "streamed")
    res = cli("convert", replica("decoder"), "--out", tmp_path / "out", "--mapping", broken, "-q")
    assert res.exit_code == 3, res.stderr
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["passed"] is False
    jump = report["first_jump"]
    assert jump is not None and jump["target"] == "layers.0.attn.o", jump
    assert all(d["within_tolerance"] for d in report["layers"][:jump["index"]])


def test_pickle_source_falls_back_to_the_whole_model(tiny_resnet_dir: Path, tmp_path: Path, cli,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.numpy import load_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_resnet_dir / "config.json").read_text())
    tensors = load_file(tiny_resnet_dir / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, src / "pytorch_model.bin")
    monkeypatch.setenv("NNXPORT_PARITY_MODE", "streamed")
    res = cli("convert", src, "--out", tmp_path / "out", "--allow-pickle")
    assert res.exit_code == 0, res.stderr
    assert "cannot stream: the source is not safetensors" in res.stderr


def test_auto_streams_only_above_the_limit(replica: Callable[[str], Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NNXPORT_PARITY_MODE", raising=False)
    with caplog.at_level(logging.INFO, logger="nnxport"):
        nnxport.convert(replica("gpt2"), tmp_path / "a")
    assert "parity: whole-model (it fits" in caplog.text
    caplog.clear()
    monkeypatch.setattr(streamed, "WHOLE_LIMIT_BYTES", 1000)
    with caplog.at_level(logging.INFO, logger="nnxport"):
        assert nnxport.convert(replica("gpt2"), tmp_path / "b").passed
    assert "parity: streamed, block by block" in caplog.text


@pytest.mark.parametrize(("name", "value", "message"), [
    ("NNXPORT_PARITY_MODE", "fast", "NNXPORT_PARITY_MODE must be one of auto, streamed, whole, got 'fast'"),
    ("NNXPORT_PARITY_CACHE_MB", "-1", "NNXPORT_PARITY_CACHE_MB must be a whole number of megabytes, "
                                      "got '-1'"),
    ("NNXPORT_PARITY_CACHE_MB", "9" * 12, "NNXPORT_PARITY_CACHE_MB must be a whole number of megabytes"),
])
def test_bad_streaming_settings_fail_before_any_work(name: str, value: str, message: str,
                                                     tiny_resnet_dir: Path, tmp_path: Path, cli,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    before = tree_state(tmp_path)
    res = cli("convert", tiny_resnet_dir, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert tree_state(tmp_path) == before
