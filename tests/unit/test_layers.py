"""Per-layer parity (nnxport.parity.layerwise) on synthetic data: the jump rule and the layout alignment,
module pairing on synthetic assignments, the report and its plot, and a failing forward pass. The same on
every built-in family, through the CLI, is tests/e2e/test_layers_families.py."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from nnxport.parity.layerwise import LayerDiff, LayerGroup, align, compare_layers, first_jump, layer_groups
from nnxport.parity.report import PARITY_PNG, ParityReport

# ---------------------------------------------------------------------------------------- the jump rule


def test_first_jump_is_the_first_layer_above_tolerance_and_ten_times_everything_before() -> None:
    assert first_jump([1e-7, 3e-7, 2e-7, 0.4, 0.9, 0.8], threshold=1e-3) == 3


def test_no_jump_when_every_layer_is_within_tolerance_however_steep_the_rise() -> None:
    assert first_jump([1e-9, 1e-7, 1e-5, 9e-4], threshold=1e-3) is None


def test_gradual_growth_past_the_tolerance_is_not_a_jump() -> None:
    # bf16-like accumulation: each layer at most 3x the one before, crossing the threshold 1e-2 gradually
    errors = [2e-3, 5e-3, 9e-3, 1.5e-2, 3e-2, 6e-2]
    assert first_jump(errors, threshold=1e-2) is None
    assert first_jump(errors, threshold=1e-2, factor=1.5) == 3  # the factor is what separates the two


def test_the_level_is_the_largest_error_so_far_not_the_last_one() -> None:
    # layer 2 dips; layer 3 is 10x layer 2 but not 10x layer 1: no jump there; layer 4 is
    assert first_jump([1e-4, 8e-4, 1e-5, 1.5e-3, 0.5], threshold=1e-3) == 4


def test_a_first_layer_above_tolerance_is_a_jump_and_non_finite_errors_are_infinite() -> None:
    assert first_jump([0.2, 0.3], threshold=1e-3) == 0
    assert first_jump([1e-7, None, 0.5], threshold=1e-3) == 1
    assert first_jump([], threshold=1e-3) is None


# ------------------------------------------------------------------------------------------ alignment


def test_align_transposes_nchw_reference_activations_when_the_family_says_so() -> None:
    ref = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # N C H W
    got = ref.transpose(0, 2, 3, 1).copy()                                # N H W C
    aligned = align(ref, got, channels_first=True)
    assert aligned is not None and aligned[1] == "nchw->nhwc"
    np.testing.assert_array_equal(aligned[0], got)


def test_align_keeps_four_d_activations_of_text_models_as_they_are() -> None:
    # Qwen3's q_norm output is [B, T, heads, head_dim] on both sides: no transpose without channels_first
    ref = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    aligned = align(ref, ref.copy(), channels_first=False)
    assert aligned is not None and aligned[1] == "same"
    np.testing.assert_array_equal(aligned[0], ref)


def test_align_reshapes_only_where_no_element_can_move() -> None:
    x = np.arange(16 * 8, dtype=np.float32)
    pos = align(x.reshape(1, 16, 8), x.reshape(16, 8), channels_first=False)  # torch [1, T, D], NNX [T, D]
    assert pos is not None and pos[1] == "reshape" and pos[0].shape == (16, 8)
    heads = align(x.reshape(2, 4, 4, 4), x.reshape(2, 4, 16), channels_first=False)  # [B,T,H,D] vs [B,T,H*D]
    assert heads is not None and heads[0].shape == (2, 4, 16)
    # [B, H, T, D] against [B, T, H*D] would need a transpose that nothing tells us about: refused
    assert align(x.reshape(2, 2, 8, 4), x.reshape(2, 8, 8), channels_first=False) is None
    assert align(x.reshape(16, 8), x[:64].reshape(8, 8), channels_first=False) is None  # sizes differ


# -------------------------------------------------------------------------------------------- pairing

def _assign(sources: list[str], targets: list[str], tied_from: str | None = None) -> Any:
    return SimpleNamespace(sources=tuple(sources), targets=tuple(targets), tied_from=tied_from)


# A torch block whose Sequential holds all its weights (ResNetBottleNeckLayer.layer), a torch attention that
# also holds the LayerNorm nnxport's attention leaves to its layer (BertAttention), a fused split (GPT-2's
# c_attn) and a gathered concat (ViT's query/key/value), and a tie.
ASSIGNMENTS = [
    _assign(["blk.layer.0.conv.weight"], ["block.conv0.kernel"]),
    _assign(["blk.layer.0.norm.weight"], ["block.bn0.scale"]),
    _assign(["blk.layer.1.conv.weight"], ["block.conv1.kernel"]),
    _assign(["att.self.q.weight"], ["attn.q.kernel"]),
    _assign(["att.self.k.weight"], ["attn.k.kernel"]),
    _assign(["att.out.dense.weight"], ["attn.o.kernel"]),
    _assign(["att.out.LayerNorm.weight"], ["attn_norm.scale"]),
    _assign(["h.c_attn.weight"], ["split.q.kernel", "split.k.kernel", "split.v.kernel"]),
    _assign(["h.c_attn.bias"], ["split.q.bias", "split.k.bias", "split.v.bias"]),
    _assign(["v.query.weight", "v.key.weight", "v.value.weight"], ["qkv.kernel"]),
    _assign([], ["head.kernel"], tied_from="block.conv0.kernel"),
]


def test_modules_pair_when_they_hold_exactly_the_same_weights() -> None:
    groups = {(g.sources, g.targets) for g in layer_groups(ASSIGNMENTS) if not g.fused}
    assert (("blk.layer.0.conv",), ("block.conv0",)) in groups            # the leaf name dropped
    assert (("blk", "blk.layer"), ("block",)) in groups                    # a block and its wrapper
    assert (("att.self.q",), ("attn.q",)) in groups
    assert (("att.out.LayerNorm",), ("attn_norm",)) in groups
    # BertAttention-like: its weights include the LayerNorm, NNX's attn does not: no pair at either level
    paired = {m for g in groups for side in g for m in side}
    assert not paired & {"att", "att.self", "att.out", "attn"}
    assert not any(t[0].startswith("head") for _, t in groups)            # a tie pairs nothing
    by_target = {g.targets: g for g in layer_groups(ASSIGNMENTS) if not g.fused}
    assert by_target[("block",)].direct_source is None and by_target[("block.conv0",)].direct_target


def test_split_and_gathered_weights_pair_one_module_with_several_in_mapping_order() -> None:
    fused = {(g.sources, g.targets) for g in layer_groups(ASSIGNMENTS) if g.fused}
    assert fused == {(("h.c_attn",), ("split.q", "split.k", "split.v")),
                     (("v.query", "v.key", "v.value"), ("qkv",))}


def test_source_keys_are_renamed_to_the_references_names_before_pairing() -> None:
    names = {"blk.layer.0.conv.weight": "model.blk.layer.0.conv.weight"}
    groups = layer_groups(ASSIGNMENTS[:1], names)
    assert [(g.sources, g.targets) for g in groups] == [
        (("model", "model.blk", "model.blk.layer", "model.blk.layer.0", "model.blk.layer.0.conv"),
         ("block", "block.conv0"))]
    assert layer_groups(ASSIGNMENTS[:1], {}) == []  # keys the reference does not have pair nothing


def _out(order: int, arr: np.ndarray) -> tuple[int, np.ndarray]:
    return order, arr


def test_wrappers_pair_outermost_with_outermost_and_owners_with_owners() -> None:
    rng = np.random.default_rng(0)
    block_out, seq_out = rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    conv = rng.standard_normal((2, 8))
    groups = [LayerGroup(("blk", "blk.layer"), ("block",)),
              LayerGroup(("inter", "inter.dense"), ("mlp.up",), direct_source="inter.dense",
                         direct_target="mlp.up")]
    act = rng.standard_normal((2, 8))
    ref = {"blk.layer": _out(1, seq_out), "blk": _out(2, block_out), "inter.dense": _out(3, conv),
           "inter": _out(4, act)}
    got = {"block": block_out.copy(), "mlp.up": conv.copy()}
    layers, skipped = compare_layers(groups, ref, got, threshold=1e-3, channels_first=False)
    assert [(d.name, d.target) for d in layers] == [("blk", "block"), ("inter.dense", "mlp.up")]
    assert all(d.max_abs_diff == 0.0 and d.within_tolerance for d in layers) and not skipped


def test_text_activations_are_compared_at_unpadded_positions_only() -> None:
    ref = np.ones((2, 4, 3))
    got = ref.copy()
    got[1, 3] = 100.0  # a padded position
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    (d,), _ = compare_layers([LayerGroup(("a",), ("b",), "a", "b")], {"a": _out(0, ref)}, {"b": got},
                             threshold=1e-3, channels_first=False, mask=mask)
    assert d.shape == [7, 3] and d.max_abs_diff == 0.0


def test_modules_one_side_never_calls_are_reported_not_compared() -> None:
    groups = [LayerGroup(("model.embed_tokens",), ("embed",), "model.embed_tokens", "embed"),
              LayerGroup(("layers",), ("stack",))]  # containers: neither side calls them
    layers, skipped = compare_layers(groups, {"model.embed_tokens": _out(0, np.ones((2, 3)))}, {},
                                     threshold=1e-3, channels_first=False)
    assert layers == []
    assert [(s.name, s.target, s.reason) for s in skipped] == [
        ("model.embed_tokens", "embed", "the NNX model does not call this module")]


def test_non_finite_outputs_are_reported_as_such() -> None:
    got = np.array([[1.0, np.nan]])
    (d,), _ = compare_layers([LayerGroup(("a",), ("b",), "a", "b")], {"a": _out(0, np.ones((1, 2)))},
                             {"b": got}, threshold=1e-3, channels_first=False)
    assert d.max_rel_diff is None and d.max_abs_diff is None and not d.within_tolerance


# ------------------------------------------------------------------------------------- report and plot

def _report(errors: list[float | None]) -> ParityReport:
    layers = [LayerDiff(name=f"l.{i}", target=f"t.{i}", shape=[2, 3], max_abs_diff=e, max_rel_diff=e,
                        mean_abs_diff=e, max_abs_reference=1.0, layout="same",
                        within_tolerance=e is not None and e <= 1e-3) for i, e in enumerate(errors)]
    return ParityReport(passed=False, reference="transformers.X", inputs=[], tolerance={"atol": 1e-4,
                        "rtol": 1e-3}, outputs=[], dtype="float32", layers=layers, layer_threshold=1e-3,
                        first_jump=first_jump(errors, 1e-3))


def test_the_report_names_the_first_jump_in_json_and_markdown() -> None:
    report = _report([1e-7, 2e-7, 0.5, None])
    doc = report.to_json()
    assert doc["first_jump"] == {"index": 2, "name": "l.2", "target": "t.2", "max_rel_diff": 0.5,
                                 "max_rel_diff_before": 2e-7}
    assert [d["name"] for d in doc["layers"]] == ["l.0", "l.1", "l.2", "l.3"]
    assert doc["layer_rule"] == {"metric": "max_rel_diff", "threshold": 1e-3, "jump_factor": 10.0}
    md = report.to_markdown("x")
    assert "**First jump: `l.2`** (NNX `t.2`" in md and "| 3 | `l.3` | `t.3` | [2, 3] | non-finite |" in md
    assert PARITY_PNG not in md


def test_long_layer_lists_show_the_rows_around_the_jump() -> None:
    report = _report([1e-7] * 100 + [0.5] + [0.6] * 99)
    md = report.to_markdown("x")
    assert "| 100 | `l.100` |" in md and "| 89 | `l.89` |" not in md and "| 90 | `l.90` |" in md
    assert "Layers 90-129 of 200 shown" in md


def test_without_matplotlib_no_plot_is_written_and_a_stale_one_is_removed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch
                                                                          ) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    stale = tmp_path / PARITY_PNG
    stale.write_bytes(b"old")
    assert _report([1e-7, 0.5]).write_plot(stale) is False
    assert not stale.exists()


def test_with_matplotlib_the_plot_is_a_small_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / PARITY_PNG
    assert _report([1e-7, 2e-7, 0.5, None, 0.7]).write_plot(path) is True
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (700, 300) and len(data) < 200_000


def test_a_failing_forward_pass_leaves_the_model_as_it_was() -> None:
    from flax import nnx

    from nnxport.parity.layerwise import nnx_outputs

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def broken(m: nnx.Module, x: Any) -> Any:
        m(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        nnx_outputs(broken, model, np.ones((1, 3), np.float32))
    assert not hasattr(model, "__captures__")
    assert "_does_capturing" not in dir(type(model).__call__)
    out, captured = nnx_outputs(lambda m, x: m(x), model, np.ones((1, 3), np.float32))
    assert list(captured) == [""] and np.allclose(captured[""], out)
