"""nnxport inspect-keys: every source key, with and without a mapping, as table / json / tsv."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from tests.helpers import RESNET_YAML


def _source_keys(resnet50_hub: str, hub_cache: Path) -> list[str]:
    (snap,) = (hub_cache / "models--microsoft--resnet-50" / "snapshots").iterdir()
    with safe_open(snap / "model.safetensors", framework="numpy") as f:
        return sorted(f.keys())


def test_json_lists_all_320_keys_with_targets(resnet50_hub: str, hub_cache: Path, cli) -> None:
    res = cli("inspect-keys", resnet50_hub, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    keys = doc["keys"]
    assert [k["key"] for k in keys] == _source_keys(resnet50_hub, hub_cache)
    assert len(keys) == 320
    assert doc["mapping"] == "resnet" and doc["problems"] == [] and doc["unfilled_targets"] == []
    by_key = {k["key"]: k for k in keys}
    stem = by_key["resnet.embedder.embedder.convolution.weight"]
    assert stem == {"key": "resnet.embedder.embedder.convolution.weight", "shape": [64, 3, 7, 7],
                    "dtype": "float32", "status": "mapped", "target": "stem.conv.kernel",
                    "ops": ["transpose(2,3,1,0)"], "target_shape": [7, 7, 3, 64], "problem": None,
                    "targets": ["stem.conv.kernel"], "target_shapes": [[7, 7, 3, 64]], "note": None}
    assert sum(k["status"] == "ignored" for k in keys) == 53
    assert sum(k["status"] == "mapped" for k in keys) == 267


def test_tsv_one_key_per_line_key_first(resnet50_hub: str, hub_cache: Path, cli) -> None:
    res = cli("inspect-keys", resnet50_hub, "--format", "tsv")
    assert res.exit_code == 0, res.stderr
    header, *lines = res.stdout.splitlines()
    assert header == "key\tshape\tdtype\tstatus\ttarget\tops\ttarget_shape"
    assert [line.split("\t")[0] for line in lines] == _source_keys(resnet50_hub, hub_cache)
    fields = dict((line.split("\t")[0], line.split("\t")) for line in lines)
    assert fields["classifier.1.weight"] == ["classifier.1.weight", "1000x2048", "float32", "mapped",
                                             "classifier.kernel", "transpose(1,0)", "2048x1000"]
    assert all(len(line.split("\t")) == 7 for line in lines)


def test_table_and_broken_mapping_statuses(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    res = cli("inspect-keys", tiny_resnet_dir)
    assert res.exit_code == 0 and "stem.conv.kernel" in res.stdout
    bad = RESNET_YAML.replace(
        "to: 'stem.bn.var'", "to: 'stem.bn.nope'")
    (tmp_path / "bad.yaml").write_text(bad)
    res = cli("inspect-keys", tiny_resnet_dir, "--mapping", tmp_path / "bad.yaml", "--format", "json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    (row,) = [k for k in doc["keys"] if k["key"] == "resnet.embedder.embedder.normalization.running_var"]
    assert row["status"] == "bad-target" and "stem.bn.nope" in row["problem"]
    assert doc["unfilled_targets"] == ["stem.bn.var"]


def test_without_config_lists_keys_only(tiny_resnet_dir: Path, tmp_path: Path, cli) -> None:
    lone = tmp_path / "lone.safetensors"  # no config.json beside it
    lone.write_bytes((tiny_resnet_dir / "model.safetensors").read_bytes())
    res = cli("inspect-keys", lone, "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["mapping"] is None and all(k["status"] is None for k in doc["keys"])
