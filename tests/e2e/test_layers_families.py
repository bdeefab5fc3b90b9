"""Per-layer parity on every built-in family (small configs of the real architectures), through the CLI:
a correct mapping gives a non-empty list of pairs that all agree, a mapping broken in one block or layer
exits 3 and names exactly that block or layer as the first jump, with every layer before it within
tolerance; verify rebuilds the pairs. The rule itself on synthetic data is tests/unit/test_layers.py."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nnxport.testing.replicas import build_replica, published_config
from tests.helpers import MAPPINGS

# --------------------------------------------------------------------------------- the built-in families

BERT = published_config("google-bert/bert-base-uncased", hidden_size=64, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=128, vocab_size=512,
                        max_position_embeddings=64, initializer_range=0.1)
VIT = published_config("google/vit-base-patch16-224", hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                       num_labels=10, initializer_range=0.1)
GPT2 = published_config("openai-community/gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=512,
                        n_positions=64, initializer_range=0.1)
LLAMA = published_config("meta-llama/Llama-3.2-1B", hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_hidden_layers=3, intermediate_size=128,
                         vocab_size=512)
CONFIGS = {"bert": BERT, "vit": VIT, "gpt2": GPT2, "decoder": LLAMA}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory, tiny_resnet_dir: Path) -> Callable[[str], Path]:
    built: dict[str, Path] = {"resnet": tiny_resnet_dir}

    def make(family: str) -> Path:
        if family not in built:
            built[family] = build_replica(CONFIGS[family], tmp_path_factory.mktemp(family) / family, seed=3,
                                          hub_config=True)
        return built[family]

    return make


def _convert(cli: Callable[..., Any], source: Path, out: Path, *args: str | Path, code: int = 0
             ) -> dict[str, Any]:
    res = cli("convert", source, "--out", out, "-q", *args)
    assert res.exit_code == code, res.stderr
    assert "Traceback" not in res.stderr
    return json.loads((out / "parity.json").read_text())


# Pairs every family must have (reference module, NNX module), including blocks and fused projections.
EXPECTED = {
    "resnet": [("resnet.embedder", "stem"),
               ("resnet.encoder.stages.1.layers.1.layer.0.normalization", "stages.1.blocks.1.bn0"),
               ("resnet.encoder.stages.1.layers.0.shortcut", "stages.1.blocks.0.shortcut"),
               ("resnet.encoder.stages.1.layers.1", "stages.1.blocks.1"), ("classifier.1", "classifier")],
    "bert": [("bert.embeddings", "embeddings"),
             ("bert.encoder.layer.2.attention.self.key", "layers.2.attn.k"),
             ("bert.encoder.layer.2.intermediate.dense", "layers.2.mlp.up"),
             ("bert.encoder.layer.2", "layers.2"), ("cls.predictions", "mlm")],
    "vit": [("vit.embeddings.patch_embeddings.projection", "patch_embed"),
            ("vit.layers.1.attention.q_proj+vit.layers.1.attention.k_proj+vit.layers.1.attention.v_proj",
             "layers.1.attn.qkv"), ("vit.layers.1.attention", "layers.1.attn"),
            ("vit.layers.1.mlp", "layers.1.mlp"), ("vit.layers.1", "layers.1"), ("classifier", "classifier")],
    "gpt2": [("transformer.h.2.attn.c_attn", "layers.2.attn.q+layers.2.attn.k+layers.2.attn.v"),
             ("transformer.h.2.attn", "layers.2.attn"), ("transformer.h.2", "layers.2"),
             ("transformer.ln_f", "ln_f")],
    "decoder": [("model.layers.2.self_attn.k_proj", "layers.2.attn.k"),
                ("model.layers.2.mlp", "layers.2.mlp"), ("model.layers.2", "layers.2"),
                ("model.norm", "norm")],
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_correct_mapping_pairs_the_layers_and_they_all_agree(family: str, replica: Callable[[str], Path],
                                                             tmp_path: Path, cli) -> None:
    report = _convert(cli, replica(family), tmp_path / "out")
    assert report["passed"] is True
    layers = report["layers"]
    pairs = [(d["name"], d["target"]) for d in layers]
    assert set(EXPECTED[family]) <= set(pairs)
    assert len(pairs) == len(set(pairs)) >= 15
    assert all(d["within_tolerance"] and d["max_rel_diff"] < 1e-5 for d in layers), layers
    assert report["first_jump"] is None
    if family == "decoder":  # the NNX decoder reads its embedding with jnp.take, not Embed.__call__
        assert [(s["name"], s["reason"]) for s in report["layers_skipped"]] == [
            ("model.embed_tokens", "the NNX model does not call this module")]
    else:
        assert report["layers_skipped"] == []
    md = (tmp_path / "out" / "parity.md").read_text()
    assert "## Per-layer divergence" in md and "No jump" in md


def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def _add_rules(text: str, rules: str) -> str:
    """``rules`` (YAML list items) first in the mapping's ``rules:`` (a mapping may end with ``tie:``)."""
    return _edit(text, "\nrules:\n", "\nrules:\n" + rules)


def _resnet_swap_one_block(text: str, swap: tuple[str, str]) -> str:
    """Rules with ``swap`` (two BatchNorm leaves) exchanged in stage 1, block 1 only."""
    leaves = {"mean": "running_mean", "var": "running_var", "scale": "weight", "bias": "bias"}
    for leaf in swap:
        text = _edit(text, f"normalization\\.{leaves[leaf]}$'\n    to: 'stages.\\1.blocks.\\2.bn\\3.{leaf}'",
                     f"normalization\\.{leaves[leaf]}$'\n    to: 'stages.\\1.blocks.\\2.bn\\3.{leaf}'\n"
                     f"  # stage 1 block 1 swapped below")
        text = _edit(text, f"'^(?:resnet\\.)?encoder\\.stages\\.(\\d+)\\.layers\\.(\\d+)\\.layer\\.(\\d+)\\."
                           f"normalization\\.{leaves[leaf]}$'",
                     f"'^(?:resnet\\.)?encoder\\.stages\\.(?!1\\.layers\\.1\\.)(\\d+)\\.layers\\.(\\d+)\\.layer\\."
                     f"(\\d+)\\.normalization\\.{leaves[leaf]}$'")
    a, b = swap
    return _add_rules(text, "".join(
        f"  - from: '^(?:resnet\\.)?encoder\\.stages\\.1\\.layers\\.1\\.layer\\.(\\d+)\\.normalization"
        f"\\.{leaves[src]}$'\n    to: 'stages.1.blocks.1.bn\\1.{dst}'\n" for src, dst in ((a, b), (b, a))))


@pytest.mark.parametrize("swap", [("mean", "var"), ("scale", "bias")], ids=["mean-var", "scale-bias"])
def test_resnet_batchnorm_swapped_in_one_block_is_named_as_the_first_jump(
        swap: tuple[str, str], replica: Callable[[str], Path], tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(_resnet_swap_one_block((MAPPINGS / "resnet.yaml").read_text(), swap))
    report = _convert(cli, replica("resnet"), tmp_path / "out", "--mapping", bad, code=3)
    _assert_first_jump(report, "resnet.encoder.stages.1.layers.1.layer.0.normalization",
                       "stages.1.blocks.1.bn0")
    if swap == ("mean", "var"):  # a running mean used as a variance is negative for some channels: NaN
        assert report["first_jump"]["max_rel_diff"] is None
    else:
        assert report["first_jump"]["max_rel_diff"] > 0.1


def test_bert_query_and_key_swapped_in_a_middle_layer_is_named_as_the_first_jump(
        replica: Callable[[str], Path], tmp_path: Path, cli) -> None:
    text = (MAPPINGS / "bert.yaml").read_text()
    for proj in ("query", "key"):
        text = _edit(text, f"'^(?:bert\\.)?encoder\\.layer\\.(\\d+)\\.attention\\.self\\.{proj}\\.weight$'",
                     f"'^(?:bert\\.)?encoder\\.layer\\.(?!1\\.)(\\d+)\\.attention\\.self\\.{proj}\\.weight$'")
    text = _add_rules(text, "".join(
        f"  - from: '^(?:bert\\.)?encoder\\.layer\\.1\\.attention\\.self\\.{src}\\.weight$'\n"
        f"    to: 'layers.1.attn.{dst}.kernel'\n    ops: [{{transpose: [1, 0]}}]\n"
        for src, dst in (("query", "k"), ("key", "q"))))
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    report = _convert(cli, replica("bert"), tmp_path / "out", "--mapping", bad, code=3)
    # Only the kernels moved: the query module's weight went to NNX k, its bias to NNX q. Such modules
    # share part of their weights; both pairs are compared, and flagged as partial.
    _assert_first_jump(report, "bert.encoder.layer.1.attention.self.query", "layers.1.attn.k",
                       "layers.1.attn.q")
    crossed = [(d["name"], d["target"]) for d in report["layers"] if d["partial"]]
    assert sorted(crossed) == [(f"bert.encoder.layer.1.attention.self.{s}", f"layers.1.attn.{t}")
                               for s in ("key", "query") for t in ("k", "q")]
    md = (tmp_path / "out" / "parity.md").read_text()
    assert "**First jump: `bert.encoder.layer.1.attention.self.query`** (NNX `layers.1.attn." in md


def test_decoder_gate_and_up_swapped_in_a_middle_layer_shows_in_that_layers_mlp(
        replica: Callable[[str], Path], tmp_path: Path, cli) -> None:
    text = _edit((MAPPINGS / "decoder.yaml").read_text(),
                 "'^model\\.layers\\.(\\d+)\\.mlp\\.(gate|up)_proj\\.weight$'",
                 "'^model\\.layers\\.(?!1\\.)(\\d+)\\.mlp\\.(gate|up)_proj\\.weight$'")
    text = _add_rules(text, "".join(
        f"  - from: '^model\\.layers\\.1\\.mlp\\.{src}_proj\\.weight$'\n"
        f"    to: 'layers.1.mlp.{dst}.kernel'\n    ops: [{{transpose: [1, 0]}}]\n"
        for src, dst in (("gate", "up"), ("up", "gate"))))
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    report = _convert(cli, replica("decoder"), tmp_path / "out", "--mapping", bad, code=3)
    # Whole modules swapped (no biases): the mapping pairs gate_proj with NNX up, whose outputs agree; the
    # error appears where the two are combined, at the input of down_proj.
    _assert_first_jump(report, "model.layers.1.mlp.down_proj", "layers.1.mlp.down")
    rows = {d["name"]: d for d in report["layers"]}
    assert rows["model.layers.1.mlp.gate_proj"]["target"] == "layers.1.mlp.up"
    assert rows["model.layers.1.mlp.gate_proj"]["within_tolerance"]


def test_gpt2_q_and_k_swapped_in_the_split_shows_at_the_attention_output(
        replica: Callable[[str], Path], tmp_path: Path, cli) -> None:
    """The fused c_attn row compares c_attn with the NNX q, k, v outputs concatenated in the mapping's order,
    so it agrees; the error appears in the attention that uses them, at its output projection."""
    text = (MAPPINGS / "gpt2.yaml").read_text()
    rules = ""
    for leaf, axis in (("weight", 1), ("bias", 0)):
        text = _edit(text, f"'^(?:transformer\\.)?h\\.(\\d+)\\.attn\\.c_attn\\.{leaf}$'",
                     f"'^(?:transformer\\.)?h\\.(?!1\\.)(\\d+)\\.attn\\.c_attn\\.{leaf}$'")
        kind = "kernel" if leaf == "weight" else "bias"
        rules += (f"  - from: '^(?:transformer\\.)?h\\.1\\.attn\\.c_attn\\.{leaf}$'\n"
                  f"    to: ['layers.1.attn.k.{kind}', 'layers.1.attn.q.{kind}', 'layers.1.attn.v.{kind}']\n"
                  f"    ops: [{{split: {{axis: {axis}, parts: 3}}}}]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(_add_rules(text, rules))
    report = _convert(cli, replica("gpt2"), tmp_path / "out", "--mapping", bad, code=3)
    _assert_first_jump(report, "transformer.h.1.attn.c_proj", "layers.1.attn.o")
    fused = next(d for d in report["layers"] if d["name"] == "transformer.h.1.attn.c_attn")
    assert fused["target"] == "layers.1.attn.k+layers.1.attn.q+layers.1.attn.v" and fused["within_tolerance"]


def _assert_first_jump(report: dict[str, Any], name: str, *targets: str) -> None:
    assert report["passed"] is False
    jump = report["first_jump"]
    assert jump is not None and jump["name"] == name and jump["target"] in targets, jump
    layers = report["layers"]
    assert layers[jump["index"]]["name"] == name
    before = layers[:jump["index"]]
    assert len(before) >= 5 and all(d["within_tolerance"] for d in before)
    assert jump["max_rel_diff_before"] < 1e-5 and not layers[jump["index"]]["within_tolerance"]
    assert math.isclose(jump["max_rel_diff_before"], max(d["max_rel_diff"] for d in before))


def test_verify_rebuilds_the_pairs_from_the_recorded_mapping(replica: Callable[[str], Path], tmp_path: Path,
                                                             cli) -> None:
    out = tmp_path / "out"
    first = _convert(cli, replica("resnet"), out)
    (out / "parity.json").unlink()
    res = cli("verify", out, "-q")
    assert res.exit_code == 0, res.stderr
    again = json.loads((out / "parity.json").read_text())
    assert [(d["name"], d["target"]) for d in again["layers"]] == [(d["name"], d["target"])
                                                                   for d in first["layers"]]
