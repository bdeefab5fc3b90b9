"""nnxport mapping draft: the draft of a checkpoint's mapping, unedited, converts with parity passing for
ResNet, ViT, BERT and the decoder families (small configs of the real architectures; full size is slow).
The core on hand-made specs and full-size plans are tests/unit/test_draft_core.py."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nnxport.mapping.schema import load_mapping_text
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config

TINY_VIT = published_config("google/vit-base-patch16-224", hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                            num_labels=10, initializer_range=0.1)
TINY_BERT = published_config("google-bert/bert-base-uncased", hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128, vocab_size=512,
                             max_position_embeddings=64, initializer_range=0.1)
TINY_DECODER = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512}
TINY_GPT2 = published_config("openai-community/gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                             n_positions=64)
TINY_LLAMA = published_config("meta-llama/Llama-3.2-1B", **TINY_DECODER, tie_word_embeddings=False)


def _draft(cli: Callable[..., Any], source: str | Path, *args: str) -> Any:
    return cli("mapping", "draft", source, *args)


def _draft_converts(cli: Callable[..., Any], source: str | Path,
                    tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """Draft, write it unedited, convert with it: (draft text, parity report); both must succeed."""
    res = _draft(cli, source)
    assert res.exit_code == 0, res.stderr
    assert "0 not placed; 0 model leaves not filled" in res.stderr
    load_mapping_text(res.stdout, name="draft")  # valid mapping YAML
    path = tmp_path / "draft.yaml"
    path.write_text(res.stdout)
    conv = cli("convert", source, "--mapping", path, "--out", tmp_path / "out", "--format", "json")
    assert conv.exit_code == 0, conv.stderr
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["passed"] is True and json.loads(conv.stdout)["mapping"] == "draft"
    return res.stdout, report


def test_resnet_draft_converts_unedited(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    text, report = _draft_converts(cli, tiny_resnet_dir, tmp_path)
    assert "  - '\\.num_batches_tracked$'" in text  # buffers: one ignore entry, not a rule each
    # per-index keys generalised with backreferences: the block convs are one rule
    assert ("  - from: '^resnet\\.encoder\\.stages\\.(\\d+)\\.layers\\.(\\d+)\\.layer\\.(\\d+)\\.convolution"
            "\\.weight$'\n    to: 'stages.\\1.blocks.\\2.conv\\3.kernel'\n"
            "    ops: [{transpose: [2, 3, 1, 0]}]") in text
    assert ("  - from: '^classifier\\.1\\.weight$'\n    to: 'classifier.kernel'\n"
            "    ops: [{transpose: [1, 0]}]") in text
    assert report["outputs"][0]["max_abs_diff"] < 1e-4


def test_vit_draft_converts_unedited(tmp_path: Path, cli) -> None:
    folder = build_replica(TINY_VIT, tmp_path / "vit", seed=1, hub_config=True)
    text, _ = _draft_converts(cli, folder, tmp_path)
    # the fused qkv kernel: three transposed Linear weights joined in the order the leaf's name spells
    assert ("from: '^vit\\.encoder\\.layer\\.(\\d+)\\.attention\\.attention\\.(query|key|value)\\.weight$'\n"
            "    to: 'layers.\\1.attn.qkv.kernel'\n"
            "    ops: [{transpose: [1, 0]}, {concat: {axis: 1, by: '\\2', order: [query, key, value]}}]"
            ) in text
    assert "to: 'cls_token'\n    ops: [{reshape: [64]}]" in text  # [1, 1, 64] -> [64]


def test_bert_draft_converts_unedited(tmp_path: Path, cli) -> None:
    folder = build_replica(TINY_BERT, tmp_path / "bert", seed=1, hub_config=True)
    text, _ = _draft_converts(cli, folder, tmp_path)
    # up and down projections told apart by shape ([128, 64] -> [64, 128]), q/k/v by name
    assert "intermediate\\.dense\\.weight$'\n    to: 'layers.\\1.mlp.up.kernel'" in text
    assert "self\\.query\\.weight$'\n    to: 'layers.\\1.attn.q.kernel'" in text


def test_gpt2_draft_splits_c_attn_and_keeps_conv1d_layout(tmp_path: Path, cli) -> None:
    folder = build_replica(copy.deepcopy(TINY_GPT2), tmp_path / "gpt2", seed=1, hub_config=True)
    # as the hub's original checkpoint: no `transformer.` prefix, with the causal-mask buffers
    import numpy as np

    edit_safetensors(folder, rename=lambda k: k.removeprefix("transformer."),
                     add={f"h.{i}.attn.bias": np.ones((1, 1, 64, 64), np.float32) for i in range(2)})
    text, _ = _draft_converts(cli, folder, tmp_path)
    assert ("to: ['layers.\\1.attn.q.kernel', 'layers.\\1.attn.k.kernel', 'layers.\\1.attn.v.kernel']\n"
            "    ops: [{split: {axis: 1, parts: 3}}]") in text
    # Conv1D stores [in, out]: the non-square c_fc says so, so the square c_proj is not transposed either
    assert "attn\\.c_proj\\.weight$'\n    to: 'layers.\\1.attn.o.kernel'\n" in text
    assert "  - '^h\\.\\d+\\.attn\\.bias$'" in text


def test_llama_draft_converts_unedited(tmp_path: Path, cli) -> None:
    folder = build_replica(copy.deepcopy(TINY_LLAMA), tmp_path / "llama", seed=1, hub_config=True)
    text, _ = _draft_converts(cli, folder, tmp_path)
    assert "to: 'lm_head.kernel'\n    ops: [{transpose: [1, 0]}]" in text


def test_incomplete_draft_is_marked_and_exits_1(tmp_path: Path, cli) -> None:
    """A stored copy of a tied head has no leaf in the model: the draft says so and exits 1."""
    folder = build_replica(published_config("meta-llama/Llama-3.2-1B", **TINY_DECODER), tmp_path / "tied",
                           seed=1, hub_config=True)
    import numpy as np

    edit_safetensors(folder, add={"lm_head.weight": np.zeros((512, 64), np.float32)})
    res = _draft(cli, folder)
    assert res.exit_code == 1
    assert "# NOT PLACED: source keys that no rule covers" in res.stdout
    assert ("#   lm_head.weight  [512, 64] float32  (the shape of model.embed_tokens.weight -> "
            "embed.embedding: if it is a stored copy of tied weights, ignore it)") in res.stdout
    assert re.search(r"incomplete.*1 not placed", res.stderr)
    mapping = load_mapping_text(res.stdout, name="draft")  # still valid YAML, every other key placed
    assert not any(r.pattern.search("lm_head.weight") for r in mapping.rules)


def test_draft_errors_are_one_line(tmp_path: Path, tiny_resnet_dir: Path, cli) -> None:
    res = _draft(cli, tiny_resnet_dir, "--model", "nosuchfamily")
    assert res.exit_code == 1 and "unknown model family 'nosuchfamily'" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    # a model whose leaves nothing fits
    res = _draft(cli, tiny_resnet_dir, "--model", "bert", "--config", _write(tmp_path / "c.json", TINY_BERT))
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    # no config.json recognised and no --model
    cfg = _write(tmp_path / "odd.json", {"model_type": "nosuch"})
    res = _draft(cli, tiny_resnet_dir, "--config", cfg)
    assert res.exit_code == 1 and "pass --model" in res.stderr


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------- full size

@pytest.mark.slow
@pytest.mark.parametrize("repo", ["microsoft/resnet-50", "google/vit-base-patch16-224",
                                  "google-bert/bert-base-uncased"])
def test_full_size_draft_converts_unedited(repo: str, tmp_path: Path, cli) -> None:
    folder = build_replica(published_config(repo), tmp_path / "model", seed=3, hub_config=True)
    _draft_converts(cli, folder, tmp_path)
