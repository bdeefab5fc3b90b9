"""nnxport mapping draft: the draft of a checkpoint's mapping, unedited, converts with parity passing for
ResNet, ViT, BERT and the decoder families (small configs of the real architectures; full size is slow);
the core on hand-made specs: transposes, reshapes, concat/split, regex generalisation, what is left."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nnxport.mapping.analysis import TensorSpec, analyze
from nnxport.mapping.draft import draft_mapping
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


# ----------------------------------------------------------------------------------- the core on specs

def _specs(**shapes: tuple[int, ...]) -> dict[str, TensorSpec]:
    return {k.replace("__", "."): TensorSpec(s, "float32") for k, s in shapes.items()}


def _check(sources: dict[str, TensorSpec], targets: dict[str, TensorSpec]) -> Any:
    d = draft_mapping(sources, targets, {}, "resnet")
    analysis = analyze(d.mapping, sources, targets, {})
    return d, analysis


def test_core_places_by_shape_and_generalises() -> None:
    sources = {f"net.blocks.{i}.{name}": TensorSpec(shape, "float32") for i in range(3)
               for name, shape in (("fc.weight", (8, 4)), ("fc.bias", (8,)), ("norm.weight", (8,)),
                                   ("conv.weight", (8, 4, 3, 3)))}
    targets = {f"layers.{i}.{name}": TensorSpec(shape, "float32") for i in range(3)
               for name, shape in (("fc.kernel", (4, 8)), ("fc.bias", (8,)), ("ln.scale", (8,)),
                                   ("conv.kernel", (3, 3, 4, 8)))}
    d, analysis = _check(sources, targets)
    assert d.complete and not analysis.problems
    assert len(d.mapping.rules) == 4  # one rule per kind, for all three blocks
    by_target = {a.targets[0]: a for a in analysis.assignments}
    assert by_target["layers.2.fc.kernel"].sources == ("net.blocks.2.fc.weight",)
    assert [op.describe() for op in by_target["layers.1.conv.kernel"].ops] == ["transpose(2,3,1,0)"]
    assert [op.describe() for op in by_target["layers.0.fc.kernel"].ops] == ["transpose(1,0)"]
    assert by_target["layers.0.ln.scale"].sources == ("net.blocks.0.norm.weight",)


def test_core_same_key_shape_different_targets_uses_alternations() -> None:
    """Block 0 maps elsewhere than blocks 1-2: one (\\d+) rule would take block 0 too."""
    sources = {f"blocks.{i}.fc.weight": TensorSpec((6, 4) if i == 0 else (8, 4), "float32") for i in range(3)}
    targets = {"first.fc.kernel": TensorSpec((4, 6), "float32"),
               **{f"rest.{i}.fc.kernel": TensorSpec((4, 8), "float32") for i in (1, 2)}}
    d, analysis = _check(sources, targets)
    assert d.complete and not analysis.problems
    assert {a.targets[0]: a.sources[0] for a in analysis.assignments} == {
        "first.fc.kernel": "blocks.0.fc.weight", "rest.1.fc.kernel": "blocks.1.fc.weight",
        "rest.2.fc.kernel": "blocks.2.fc.weight"}


def test_core_concat_in_the_order_the_fused_name_spells() -> None:
    sources = {f"enc.{i}.attn.{n}.weight": TensorSpec((4, 4), "float32") for i in range(2)
               for n in ("value", "query", "key")}
    targets = {f"layers.{i}.attn.qkv.kernel": TensorSpec((4, 12), "float32") for i in range(2)}
    d, analysis = _check(sources, targets)
    assert d.complete and not analysis.problems and len(d.mapping.rules) == 1
    (a0, a1) = sorted(analysis.assignments, key=lambda a: a.targets)
    assert a1.sources == ("enc.1.attn.query.weight", "enc.1.attn.key.weight", "enc.1.attn.value.weight")
    assert [op.describe() for op in a0.ops] == ["transpose(1,0)",
                                                "concat(axis=1,by=\\2,order=query,key,value)"]


def test_core_split_with_unequal_parts_notes_a_guessed_order() -> None:
    sources = _specs(blk__fused__weight=(6, 4))
    targets = _specs(layers__a__kernel=(4, 2), layers__b__kernel=(4, 4))
    d, analysis = _check(sources, targets)
    assert d.complete and not analysis.problems
    assert "split: {axis: 1, sizes: [2, 4]}" in d.text
    assert d.notes == ("order a, b is a guess (by name): check it",)
    assert "  # NOTE: order a, b is a guess (by name): check it\n  - from: '^blk\\.fused\\.weight$'" in d.text


def test_core_marks_what_it_cannot_place() -> None:
    sources = _specs(a__weight=(3, 5), mystery__weight=(7, 7, 7))
    targets = _specs(a__kernel=(5, 3), other__kernel=(2, 2))
    d = draft_mapping(sources, targets, {}, "resnet")
    assert not d.complete and d.unplaced == ("mystery.weight",) and d.unfilled == ("other.kernel",)
    assert "#   mystery.weight  [7, 7, 7] float32" in d.text and "#   other.kernel  [2, 2] float32" in d.text
    assert d.placed == 1
    assert d.problems == ()  # the analysis of the draft finds nothing but what it lists


def test_core_refuses_when_nothing_fits() -> None:
    from nnxport.errors import NnxportError

    with pytest.raises(NnxportError, match="no source key fits any leaf"):
        draft_mapping(_specs(a__weight=(3, 5)), _specs(b__kernel=(2, 2)), {}, "resnet")


# ----------------------------------------------------------------------------------------- full size

@pytest.mark.slow
@pytest.mark.parametrize("repo", ["microsoft/resnet-50", "google/vit-base-patch16-224",
                                  "google-bert/bert-base-uncased"])
def test_full_size_draft_converts_unedited(repo: str, tmp_path: Path, cli) -> None:
    folder = build_replica(published_config(repo), tmp_path / "model", seed=3, hub_config=True)
    _draft_converts(cli, folder, tmp_path)


# ------------------------------------------------------------------- full-size plans, shapes only

def _meta_specs(config: dict[str, Any]) -> dict[str, TensorSpec]:
    """The keys and shapes save_pretrained writes for ``config``, from a model on the meta device (no
    memory, no weights): tied copies are not stored."""
    import torch
    import transformers

    config = copy.deepcopy(config)
    arch = config.pop("architectures")[0]
    hf = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = getattr(transformers, arch)(hf)
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} \
        if getattr(hf, "tie_word_embeddings", False) else set()
    return {k: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in model.state_dict().items() if k not in tied}


def _plan(mapping: Any, sources: dict[str, TensorSpec], targets: dict[str, TensorSpec],
          config: dict[str, Any]) -> dict[str, Any]:
    analysis = analyze(mapping, sources, targets, config)
    assert not analysis.problems, analysis.problems[:3]
    return {t: (a.sources, [op.describe() for op in a.ops], i) for a in analysis.assignments
            for i, t in enumerate(a.targets)}


# Not ViT: transformers 5 renames ViT's keys in memory (layers.N.attention.q_proj) and back on save.
@pytest.mark.parametrize("repo", [
    "openai-community/gpt2", "meta-llama/Llama-3.2-1B",
    *(pytest.param(r, marks=pytest.mark.slow) for r in (
        "microsoft/resnet-50", "google-bert/bert-base-uncased", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen3-0.6B",
        "mistralai/Mistral-7B-v0.1")),
])
def test_full_size_draft_plans_what_the_builtin_mapping_plans(repo: str) -> None:
    """At the published sizes, the draft fills every leaf from the same keys through the same ops as the
    hand-written mapping (the decoder families included)."""
    from nnxport import api
    from nnxport.models import resolve_family

    config = published_config(repo)
    sources = _meta_specs(config)
    builtin = api.resolve_mapping(None, config)
    family = resolve_family(builtin.model)
    _, state = api.abstract_state(family, config, family.options(config, sources.keys()))
    targets = api.target_specs(state)
    d = draft_mapping(sources, targets, config, family.name)
    assert d.complete, (d.unplaced[:3], d.unfilled[:3], d.problems[:3])
    assert _plan(d.mapping, sources, targets, config) == _plan(builtin, sources, targets, config)
