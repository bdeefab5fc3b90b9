"""Restoring without nnxport: the README's two blocks (Orbax v1 ``load`` and the classic
``StandardCheckpointer`` on ``checkpoint/state``) run as written on a bfloat16 conversion and give exactly
the leaves ``nnxport.load`` gives; the manifest's ``leaves`` and ``layout`` say what is stored and how, and
docs/cli.md documents every manifest field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import nnxport

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```python\n(.*?)^```\n", re.S | re.M)


def restore_blocks() -> list[str]:
    section = README[README.index("### Restoring without nnxport"):]
    section = section[:re.search(r"\n##+ ", section).start()]  # up to the next heading
    return FENCE.findall(section)


@pytest.fixture(scope="module")
def converted(tiny_resnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder holding ``resnet-50-nnx``, the name the README's blocks use (here a small ResNet,
    stored in bfloat16 so that the dtype must come from the manifest)."""
    scratch = tmp_path_factory.mktemp("readme-restore")
    nnxport.convert(tiny_resnet_dir, scratch / "resnet-50-nnx", parity=False, dtype="bfloat16")
    return scratch


CHECK = """
import nnxport as _n
_ref = _n.load("resnet-50-nnx")
_want = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(_ref))}
_got = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
assert _got.keys() == _want.keys(), sorted(set(_got) ^ set(_want))
for _p, _v in _want.items():
    assert _got[_p].dtype == _v.dtype, (_p, _got[_p].dtype, _v.dtype)
    assert np.array_equal(np.asarray(_got[_p]), np.asarray(_v)), _p
print("SAME", len(_got), sorted({str(v.dtype) for v in _got.values()}))
"""


def test_the_readme_has_both_blocks() -> None:
    blocks = restore_blocks()
    assert len(blocks) == 2
    assert "ocp.load(" in blocks[0] and "experimental.v1" in blocks[0]
    assert 'StandardCheckpointer' in blocks[1] and '"checkpoint" / "state"' in blocks[1]
    for code in blocks:  # nnxport is used for the model class only
        assert re.findall(r"^(?:from|import) (nnxport\S*)", code, re.M) == ["nnxport.models.resnet"]
        for step in ("nnx.eval_shape", "nnx.split", "nnx.replace_by_pure_dict", "nnx.merge"):
            assert step in code
    marked = [m.start() for m in re.finditer("<!-- pipeline-test -->", README)]
    for code in blocks:  # tests/test_readme.py runs them on the real resnet-50 too
        at = README.index(code)
        assert any(0 < at - m < 40 for m in marked), "a restore block is not marked <!-- pipeline-test -->"


@pytest.mark.parametrize("which", [0, 1], ids=["orbax-v1-load", "standard-checkpointer"])
def test_readme_restore_block_gives_nnxport_loads_leaves(which: int, converted: Path) -> None:
    code = restore_blocks()[which]
    if "import numpy as np" not in code:
        code = "import numpy as np\n" + code
    proc = subprocess.run([sys.executable, "-c", code + CHECK], cwd=converted, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "SAME 62 ['bfloat16']", proc.stdout


def test_the_classic_api_needs_checkpoint_state(converted: Path) -> None:
    """What the README says of the layout: the pytree lies in checkpoint/state, not checkpoint/."""
    ckpt = (converted / "resnet-50-nnx" / "checkpoint").absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        assert checkpointer.metadata(ckpt / "state") is not None
        with pytest.raises(FileNotFoundError, match="_METADATA"):
            checkpointer.restore(ckpt)


def test_leaves_and_layout(converted: Path) -> None:
    folder = converted / "resnet-50-nnx"
    manifest = json.loads((folder / "nnxport.json").read_text())
    assert manifest["layout"] == {"images": "NHWC", "linear_kernels": "[in, out]", "conv_kernels": "HWIO",
                                  "embeddings": "[vocab, hidden]"}
    model = nnxport.load(folder)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
    leaves = manifest["leaves"]
    assert leaves.keys() == flat.keys() and len(leaves) == manifest["tensors"]
    for path, var in flat.items():
        entry = leaves[path]
        assert entry["shape"] == list(var.get_value().shape), path
        assert entry["dtype"] == str(var.get_value().dtype), path
        assert entry["kind"] == ("BatchStat" if isinstance(var, nnx.BatchStat) else "Param"), path
    assert leaves["stem.bn.mean"]["kind"] == "BatchStat" and leaves["stem.bn.scale"]["kind"] == "Param"
    assert leaves["stem.bn.mean"]["dtype"] == leaves["stem.conv.kernel"]["dtype"] == "bfloat16"  # --dtype
    config = manifest["model"]["config"]
    # HWIO: torch's [out, in, kh, kw] stem convolution, transposed; [in, out]: the classifier.
    assert leaves["stem.conv.kernel"]["shape"] == [7, 7, config["num_channels"], config["embedding_size"]]
    assert leaves["classifier.kernel"]["shape"] == [config["hidden_sizes"][-1], len(config["id2label"])]
    images = np.zeros((1, 32, 32, config["num_channels"]), np.float32)  # NHWC
    assert model(images).shape == (1, len(config["id2label"]))


def test_docs_list_every_manifest_field(converted: Path) -> None:
    docs = (ROOT / "docs" / "cli.md").read_text()
    table = docs[docs.index("<!-- json-schema: manifest -->"):]
    table = table[:table.index("\n\n", table.index("|"))]
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| ([a-z]+) \|", table, re.M))
    types = {"string": str, "integer": int, "object": dict, "array": list}
    manifest = json.loads((converted / "resnet-50-nnx" / "nnxport.json").read_text())
    assert set(manifest) <= set(documented), sorted(set(manifest) - set(documented))
    for key, value in manifest.items():
        assert isinstance(value, types[documented[key]]), (key, value)
    assert {"leaves", "layout", "artifacts", "mesh", "partition_specs", "device"} <= set(documented)
