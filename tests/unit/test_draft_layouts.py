"""The draft's handling of the issue-16 layouts on hand-made specs (nnxport/mapping/draft_layouts.py):
per-expert keys stacked only when they are experts 0..E-1 of one shape, what is left said per key, parts of
a checkpoint that the model lacks ignored only when every leaf is filled. Converted drafts of real replicas
are tests/e2e/test_draft_layouts.py."""

from __future__ import annotations

from typing import Any

import pytest

from nnxport.mapping.analysis import TensorSpec, analyze
from nnxport.mapping.draft import draft_mapping
from nnxport.mapping.draft_layouts import stack_groups

F = "float32"


def _moe(experts: list[int], e_model: int = 4) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    sources = {"model.layers.0.attn.q_proj.weight": TensorSpec((16, 8), F)}
    for e in experts:
        sources[f"model.layers.0.moe.experts.{e}.w1.weight"] = TensorSpec((12, 8), F)
        sources[f"model.layers.0.moe.experts.{e}.w3.weight"] = TensorSpec((12, 8), F)
        sources[f"model.layers.0.moe.experts.{e}.w2.weight"] = TensorSpec((8, 12), F)
    targets = {"layers.0.attn.q.kernel": TensorSpec((8, 16), F),
               "layers.0.mlp.experts.gate": TensorSpec((e_model, 8, 12), F),
               "layers.0.mlp.experts.up": TensorSpec((e_model, 8, 12), F),
               "layers.0.mlp.experts.down": TensorSpec((e_model, 12, 8), F)}
    return sources, targets


def test_per_expert_keys_become_stack_rules_in_index_order() -> None:
    sources, targets = _moe([0, 1, 2, 3])
    d = draft_mapping(sources, targets, {}, "decoder")
    assert d.complete and d.placed == 13
    analysis = analyze(d.mapping, sources, targets, {})
    assert not analysis.problems
    by_target = {a.targets[0]: a for a in analysis.assignments}
    # w1 is the gate, w3 the up projection (Mixtral's and Llama's names), experts in index order
    assert by_target["layers.0.mlp.experts.gate"].sources == tuple(
        f"model.layers.0.moe.experts.{e}.w1.weight" for e in range(4))
    assert by_target["layers.0.mlp.experts.up"].sources[0].endswith("experts.0.w3.weight")
    assert ("  - from: '^model\\.layers\\.0\\.moe\\.experts\\.(\\d+)\\.w2\\.weight$'\n"
            "    to: 'layers.0.mlp.experts.down'\n"
            "    ops: [{transpose: [1, 0]}, {stack: {axis: 0, by: '\\1', order: indices}}]\n") in d.text


def test_experts_with_a_gap_are_not_stacked_and_each_key_says_why() -> None:
    sources, targets = _moe([0, 1, 3], e_model=3)
    assert stack_groups(sources) == {}  # 0, 1, 3 is not 0..E-1
    d = draft_mapping(sources, targets, {}, "decoder")
    assert not d.complete and len(d.unplaced) == 9


def test_stack_of_the_wrong_count_is_listed_per_key() -> None:
    sources, targets = _moe([0, 1, 2], e_model=4)  # three experts stored, four in the model
    d = draft_mapping(sources, targets, {}, "decoder")
    assert len(d.unplaced) == 9 and len(d.unfilled) == 3
    line = ("#   model.layers.0.moe.experts.2.w2.weight  [8, 12] float32  (per-expert key (3 experts at "
            "'model.layers.0.moe.experts.*.w2.weight'): no stacked model leaf [3, ...] fits it; a rule "
            "ending in {stack: {axis: 0, by: <the expert group>, order: indices}} would gather them)")
    assert line in d.text.splitlines()


def test_a_part_the_model_lacks_is_ignored_only_when_every_leaf_is_filled() -> None:
    sources = {"lm.layers.0.fc.weight": TensorSpec((8, 4), F), "lm.layers.1.fc.weight": TensorSpec((8, 4), F),
               "vision.patch.weight": TensorSpec((3, 3), F), "vision.norm.weight": TensorSpec((5,), F)}
    targets = {"layers.0.fc.kernel": TensorSpec((4, 8), F), "layers.1.fc.kernel": TensorSpec((4, 8), F)}
    d = draft_mapping(sources, targets, {}, "decoder")
    assert d.complete and set(d.ignored) == {"vision.patch.weight", "vision.norm.weight"}
    assert "  - '^vision\\.'\n" in d.text
    d2 = draft_mapping(sources, {**targets, "head.kernel": TensorSpec((7, 2), F)}, {}, "decoder")
    assert not d2.complete and set(d2.unplaced) == {"vision.patch.weight", "vision.norm.weight"}
    assert "'^vision\\.'" not in d2.text


def test_fused_name_splits_even_where_a_piece_has_another_leafs_shape() -> None:
    """Phi-3: qkv_proj [q + k + v, H] transposed is [H, 128], the MLP gate kernel's shape too."""
    sources = {"l.0.attn.qkv_proj.weight": TensorSpec((128, 64), F),
               "l.0.mlp.gate_up_proj.weight": TensorSpec((256, 64), F),
               "l.0.mlp.down_proj.weight": TensorSpec((64, 128), F)}
    targets = {"layers.0.attn.q.kernel": TensorSpec((64, 64), F),
               "layers.0.attn.k.kernel": TensorSpec((64, 32), F),
               "layers.0.attn.v.kernel": TensorSpec((64, 32), F),
               "layers.0.mlp.gate.kernel": TensorSpec((64, 128), F),
               "layers.0.mlp.up.kernel": TensorSpec((64, 128), F),
               "layers.0.mlp.down.kernel": TensorSpec((128, 64), F)}
    d = draft_mapping(sources, targets, {}, "decoder")
    assert d.complete
    by_target = {a.targets[0]: a for a in analyze(d.mapping, sources, targets, {}).assignments}
    assert by_target["layers.0.mlp.gate.kernel"].sources == ("l.0.mlp.gate_up_proj.weight",)
    assert by_target["layers.0.attn.q.kernel"].sources == ("l.0.attn.qkv_proj.weight",)


# --------------------------------------------------------------------------- full size, shapes only (slow)

def _hub_layout(specs: dict[str, TensorSpec], model_type: str) -> dict[str, TensorSpec]:
    """transformers 5's fused expert tensors (what its state dict holds) back in the hub's per-expert layout
    (what save_pretrained writes): Mixtral's block_sparse_moe.experts.N.w1/w3/w2, the others'
    mlp.experts.N.gate_proj/up_proj/down_proj."""
    names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, TensorSpec] = {}
    for k, v in specs.items():
        base = k.rsplit(".", 1)[0] + "."
        if model_type == "mixtral":
            base = base.replace(".mlp.", ".block_sparse_moe.")
        if k.endswith(".mlp.experts.gate_up_proj"):
            e, two_i, h = v.shape
            for n in range(e):
                for name in names[:2]:
                    out[f"{base}{n}.{name}.weight"] = TensorSpec((two_i // 2, h), v.dtype)
        elif k.endswith(".mlp.experts.down_proj"):
            for n in range(v.shape[0]):
                out[f"{base}{n}.{names[2]}.weight"] = TensorSpec(v.shape[1:], v.dtype)
        elif model_type == "mixtral" and k.endswith(".mlp.gate.weight"):
            out[k.replace(".mlp.", ".block_sparse_moe.")] = v
        else:
            out[k] = v
    return out


def _plan(mapping: Any, sources: dict[str, TensorSpec], targets: dict[str, TensorSpec],
          config: dict[str, Any]) -> dict[str, Any]:
    """target -> (source keys, piece index, ops); the ops left out for splits, which the draft may write
    as transpose-then-split where the mapping splits first (the same tensors); a stack's ``order=indices``
    (the experts must be exactly 0..E-1) dropped, since the default natural order stacks the same tensors."""
    analysis = analyze(mapping, sources, targets, config)
    assert not analysis.problems, analysis.problems[:3]
    out = {}
    for a in analysis.assignments:
        ops = [op.describe().replace(",order=indices", "") for op in a.ops]
        for i, t in enumerate(a.targets):
            out[t] = (a.sources, i, None if any(o.startswith("split") for o in ops) else ops)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("repo", [
    "google/gemma-2-2b", "google/gemma-3-1b-pt", "microsoft/Phi-3-mini-4k-instruct", "microsoft/phi-4",
    "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V3"])
def test_full_size_draft_of_the_new_layouts_plans_what_the_builtin_mapping_plans(repo: str) -> None:
    """At the published sizes (keys and shapes from transformers on the meta device, the experts in the
    hub's per-expert layout): the draft fills every leaf from the same keys as the built-in mapping."""
    from nnxport.models import resolve_family
    from nnxport.pipeline.plan import abstract_state, resolve_mapping, target_specs
    from nnxport.testing.replicas import published_config
    from tests.unit.test_draft_core import _meta_specs

    config = published_config(repo)
    sources = _hub_layout(_meta_specs(config), config["model_type"])
    builtin = resolve_mapping(None, config)
    family = resolve_family(builtin.model)
    _, state = abstract_state(family, config, family.options(config, sources.keys()))
    targets = target_specs(state)
    d = draft_mapping(sources, targets, config, family.name)
    assert d.complete, (d.unplaced[:3], d.unfilled[:3], d.problems[:3])
    assert _plan(d.mapping, sources, targets, config) == _plan(builtin, sources, targets, config)
