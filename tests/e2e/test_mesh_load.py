"""``nnxport.load(DIR, mesh=...)``: every leaf restored straight onto its partition spec (the recorded ones
of a ``--mesh`` conversion, the declared layouts of a single-device one), values equal to a single-device
load, ``nnx.get_partition_spec`` saying where each leaf is, and a jitted sharded forward pass giving the
same logits. The session has 8 simulated CPU devices (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import nnxport
from nnxport.errors import DeviceError, NnxportError, SourceError
from nnxport.testing.replicas import build_replica, published_config

TINY_LLAMA = published_config("meta-llama/Llama-3.2-1B", hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_hidden_layers=2, intermediate_size=128,
                              vocab_size=512, tie_word_embeddings=False)
TINY_GPT2 = published_config("openai-community/gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=512,
                             n_positions=64)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("meshload")
    llama = build_replica(TINY_LLAMA, root / "llama", seed=3)
    gpt2 = build_replica(TINY_GPT2, root / "gpt2", seed=4)
    out = {"single": root / "single", "mesh": root / "mesh", "gpt2": root / "gpt2-nnx"}
    nnxport.convert(llama, out["single"], parity=False)
    nnxport.convert(llama, out["mesh"], parity=False, mesh="data=2,model=4")
    nnxport.convert(gpt2, out["gpt2"], parity=False)
    return out


def leaves(model: nnx.Module) -> dict[str, jax.Array]:
    """The weights (Params, BatchStats: what the checkpoint holds; not the dropout streams' counters)."""
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def specs(model: nnx.Module) -> dict[str, PartitionSpec]:
    flat = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    return {".".join(map(str, p)): v.get_value() for p, v in flat}


def expected_spec(spec: list[Any] | None) -> PartitionSpec:
    return PartitionSpec(*[tuple(d) if isinstance(d, list) else d for d in spec or []])


def check_placed(model: nnx.Module, mesh: Mesh, want: dict[str, PartitionSpec],
                 reference: dict[str, jax.Array]) -> None:
    """Every leaf a NamedSharding on ``mesh`` with the wanted spec (replicated where absent), really split
    where sharded, tagged with that spec, and equal to the single-device load."""
    got, tags = leaves(model), specs(model)
    assert got.keys() == reference.keys()
    sharded = 0
    for path, arr in got.items():
        spec = want.get(path, PartitionSpec())
        assert isinstance(arr.sharding, NamedSharding), path
        assert arr.sharding.mesh.devices.tolist() == mesh.devices.tolist(), path
        assert arr.sharding.mesh.axis_names == mesh.axis_names, path
        assert arr.sharding.spec == spec, (path, arr.sharding.spec, spec)
        assert tags[path] == spec, (path, tags[path], spec)
        if spec != PartitionSpec():
            sharded += 1
            assert arr.addressable_shards[0].data.size < arr.size, path  # split, not replicated
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(reference[path]), err_msg=path)
        assert arr.dtype == reference[path].dtype
    assert sharded >= 10


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 512, size=(2, 12)).astype(np.int32)


def test_recorded_mesh(folders: dict[str, Path]) -> None:
    manifest = json.loads((folders["mesh"] / "nnxport.json").read_text())
    reference = leaves(nnxport.load(folders["single"]))
    model = nnxport.load(folders["mesh"], mesh="recorded")
    mesh = next(iter(leaves(model).values())).sharding.mesh
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    want = {p: expected_spec(s) for p, s in manifest["partition_specs"].items()}
    assert want["layers.0.attn.q.kernel"] == PartitionSpec("data", "model")
    check_placed(model, mesh, want, reference)


def test_a_mesh_object_and_another_shape(folders: dict[str, Path]) -> None:
    manifest = json.loads((folders["mesh"] / "nnxport.json").read_text())
    want = {p: expected_spec(s) for p, s in manifest["partition_specs"].items()}
    reference = leaves(nnxport.load(folders["single"]))
    mesh = Mesh(np.array(jax.devices()[::-1]).reshape(2, 4), ("data", "model"))  # devices in another order
    check_placed(nnxport.load(folders["mesh"], mesh=mesh), mesh, want, reference)
    other = nnxport.load(folders["mesh"], mesh="data=4,model=2")
    mesh42 = next(iter(leaves(other).values())).sharding.mesh
    assert dict(mesh42.shape) == {"data": 4, "model": 2}
    check_placed(other, mesh42, want, reference)


def test_single_device_conversion_onto_a_mesh(folders: dict[str, Path]) -> None:
    reference_model = nnxport.load(folders["single"])
    annotated = {p: s for p, s in specs(reference_model).items() if s != PartitionSpec()}
    assert annotated  # the family annotates its kernels and embeddings
    model = nnxport.load(folders["single"], mesh="data=2,model=4")
    mesh = next(iter(leaves(model).values())).sharding.mesh
    check_placed(model, mesh, annotated, leaves(reference_model))
    # The layout a single-device conversion recorded equals the one a --mesh conversion used.
    recorded = json.loads((folders["mesh"] / "nnxport.json").read_text())["partition_specs"]
    assert annotated == {p: expected_spec(s) for p, s in recorded.items()}


def test_a_mapping_shard_override_is_honoured(folders: dict[str, Path]) -> None:
    """gpt2.yaml's MLP rule keeps mlp.c_proj at [data, model], over its row-parallel annotation."""
    manifest = json.loads((folders["gpt2"] / "nnxport.json").read_text())
    assert manifest["leaves"]["layers.0.mlp.c_proj.kernel"]["shard"] == [["data"], ["model"]]
    model = nnxport.load(folders["gpt2"], mesh="data=2,model=4")
    assert specs(model)["layers.0.mlp.c_proj.kernel"] == PartitionSpec("data", "model")
    assert leaves(model)["layers.0.mlp.c_proj.kernel"].sharding.spec == PartitionSpec("data", "model")


def test_jitted_sharded_forward_gives_the_same_logits(folders: dict[str, Path]) -> None:
    ids = tokens()
    mask = np.ones_like(ids)
    forward = nnx.jit(lambda m, x, k: m(x, k))
    expected = np.asarray(forward(nnxport.load(folders["single"]), ids, mask))
    model = nnxport.load(folders["mesh"], mesh="recorded")
    mesh = next(iter(leaves(model).values())).sharding.mesh
    x = jax.device_put(ids, NamedSharding(mesh, PartitionSpec("data")))
    k = jax.device_put(mask, NamedSharding(mesh, PartitionSpec("data")))
    logits = forward(model, x, k)
    assert isinstance(logits.sharding, NamedSharding) and logits.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


def test_generation_on_a_sharded_model_equals_one_device(folders: dict[str, Path]) -> None:
    """nnxport.generate runs on a model loaded onto the recorded mesh (its cache and steps are jitted
    over sharded weights) and gives the tokens the single-device model gives."""
    ids = tokens()[:, :6]
    one = np.asarray(nnxport.generate(nnxport.load(folders["single"]), ids, max_new_tokens=5))
    model = nnxport.load(folders["mesh"], mesh="recorded")
    assert any(len(a.sharding.device_set) > 1 for a in leaves(model).values())
    sharded = np.asarray(nnxport.generate(model, ids, max_new_tokens=5))
    assert sharded.shape == (2, 11)
    np.testing.assert_array_equal(sharded, one)


def test_an_older_manifest_falls_back_to_the_annotations(folders: dict[str, Path], tmp_path: Path) -> None:
    """A single-device manifest without ``leaves`` (written before it existed): the model's annotations."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folders["single"], old)
    manifest = json.loads((old / "nnxport.json").read_text())
    del manifest["leaves"], manifest["layout"]
    (old / "nnxport.json").write_text(json.dumps(manifest))
    model = nnxport.load(old, mesh="data=2,model=4")
    want = {p: s for p, s in specs(nnxport.load(folders["single"])).items() if s != PartitionSpec()}
    assert {p: s for p, s in specs(model).items() if s != PartitionSpec()} == want


def test_mesh_errors_are_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    with pytest.raises(NnxportError, match="records no mesh") as e:
        nnxport.load(folders["single"], mesh="recorded")
    assert "\n" not in str(e.value)
    with pytest.raises(NnxportError, match="not both"):
        nnxport.load(folders["mesh"], mesh="recorded", device="cpu")
    with pytest.raises(DeviceError, match="needs 16 devices"):
        nnxport.load(folders["mesh"], mesh="data=4,model=4")
    big = tmp_path / "big"
    shutil.copytree(folders["mesh"], big)
    manifest = json.loads((big / "nnxport.json").read_text())
    manifest["mesh"] = {"data": 4, "model": 4}
    (big / "nnxport.json").write_text(json.dumps(manifest))
    with pytest.raises(DeviceError, match=r"recorded mesh data=4,model=4 needs 16 devices, jax sees 8") as e:
        nnxport.load(big, mesh="recorded")
    assert "\n" not in str(e.value) and str(big / "nnxport.json") in str(e.value)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m["partition_specs"].update({"embed.embedding": ["tensor", None]}), "partition_specs.embed"),
    (lambda m: m["partition_specs"].update({"embed.embedding": ["model", "model"]}), "partition_specs.embed"),
    (lambda m: m["partition_specs"].update({"../x": ["model"]}), "partition_specs.../x"),
    (lambda m: m["partition_specs"].update({"embed.embedding": ["model", None, None]}),
     "partition_specs.embed.embedding: 3 entries for a leaf of 2 dimensions"),
    (lambda m: m["mesh"].update({"bad axis": 2}), "mesh.bad axis"),
    (lambda m: m["leaves"]["embed.embedding"].update({"shard": [["model"]]}), "leaves.embed.embedding.shard"),
    (lambda m: m["leaves"]["embed.embedding"].update({"kind": "Cache"}), "leaves.embed.embedding.kind"),
    (lambda m: m["leaves"]["embed.embedding"].update({"shape": [-1]}), "leaves.embed.embedding.shape"),
    (lambda m: m.update({"layout": {"images": 3}}), "layout.images"),
])
def test_the_fields_a_mesh_load_reads_are_validated(folders: dict[str, Path], tmp_path: Path, edit: Any,
                                                   field: str) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folders["mesh"], bad)
    manifest = json.loads((bad / "nnxport.json").read_text())
    edit(manifest)
    (bad / "nnxport.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match=f"nnxport.json: {field}") as e:
        nnxport.load(bad, mesh="recorded")
    assert "\n" not in str(e.value)
