"""The draft's core (nnxport.mapping.draft), shapes only: on hand-made specs (transposes, reshapes,
concat/split, regex generalisation, what is left) and, at the published sizes, the same plan as the
built-in mapping. The drafts converted through the CLI are tests/e2e/test_draft.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from nnxport.mapping.analysis import TensorSpec, analyze
from nnxport.mapping.draft import draft_mapping
from nnxport.pipeline.plan import abstract_state, resolve_mapping, target_specs
from nnxport.testing.replicas import published_config

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
    from nnxport.models import resolve_family

    config = published_config(repo)
    sources = _meta_specs(config)
    builtin = resolve_mapping(None, config)
    family = resolve_family(builtin.model)
    _, state = abstract_state(family, config, family.options(config, sources.keys()))
    targets = target_specs(state)
    d = draft_mapping(sources, targets, config, family.name)
    assert d.complete, (d.unplaced[:3], d.unfilled[:3], d.problems[:3])
    assert _plan(d.mapping, sources, targets, config) == _plan(builtin, sources, targets, config)
