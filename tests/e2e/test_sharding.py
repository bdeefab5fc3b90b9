"""``--mesh``: targets laid out as the mapping's ``shard`` entries say, each device's part read from the file
on its own, and the checkpoint equal bit for bit to the unsharded conversion; multi-host with two local
processes. The test session has 8 simulated CPU devices (conftest sets XLA_FLAGS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import nnxport
from nnxport.errors import MappingError
from nnxport.mapping.schema import load_mapping_text
from nnxport.models import get_family
from nnxport.pipeline.manifest import read_manifest
from nnxport.pipeline.output import CHECKPOINT, set_path
from nnxport.pipeline.plan import abstract_state
from nnxport.placement import build_mesh, partition_spec
from nnxport.sources.base import Source
from nnxport.sources.folder import open_source
from nnxport.testing.replicas import build_replica, edit_safetensors, published_config
from tests.helpers import MAPPINGS, free_port, run_subprocess

TINY_LLAMA = published_config("meta-llama/Llama-3.2-1B", hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_hidden_layers=2, intermediate_size=128,
                              vocab_size=512, tie_word_embeddings=False)
TINY_GPT2 = published_config("openai-community/gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=512,
                             n_positions=64)
TINY_VIT = published_config("google/vit-base-patch16-224", hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                            num_labels=10)
MESH = "data=2,model=4"

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shard")
    out = {
        "llama": build_replica(TINY_LLAMA, root / "llama", seed=3),
        "gpt2": build_replica(TINY_GPT2, root / "gpt2", seed=4),
        "vit": build_replica(TINY_VIT, root / "vit", seed=5),
    }
    # Untied config but no stored lm_head: the head is filled from the embedding by the mapping's tie.
    out["llama-tiefill"] = build_replica(TINY_LLAMA, root / "llama-tiefill", seed=6)
    edit_safetensors(out["llama-tiefill"], drop=["lm_head.weight"])
    return out


def restore(folder: Path, shardings: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """The checkpoint's arrays by dotted target, restored with Orbax given the abstract state; onto the
    named shardings when given, else onto one device."""
    manifest = read_manifest(folder)
    family = get_family(manifest["model"]["family"])
    _, abstract = abstract_state(family, manifest["model"]["config"], manifest["model"]["options"])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(abstract)}
    import orbax.checkpoint.experimental.v1 as ocp

    target: dict[Any, Any] = {}
    for dotted, leaf in flat.items():
        sharding = (shardings or {}).get(dotted, one)
        set_path(target, dotted, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      create=True)
    tree = ocp.load((folder / CHECKPOINT).absolute(), target)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def requested(folder: Path) -> dict[str, NamedSharding]:
    """The shardings the manifest records, on a mesh like the conversion's."""
    manifest = read_manifest(folder)
    mesh = build_mesh(manifest["mesh"])
    specs = manifest["partition_specs"]
    return {t: NamedSharding(mesh, PartitionSpec(*(tuple(d) if isinstance(d, list) else d for d in spec)))
            for t, spec in specs.items()}


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit", "llama-tiefill"])
def test_sharded_conversion_equals_unsharded_bit_for_bit(name: str, sources: dict[str, Path],
                                                         tmp_path: Path) -> None:
    nnxport.convert(sources[name], tmp_path / "one", parity=False)
    # (transformers refuses a checkpoint without the head its config asks for: no parity for the tie fill)
    parity = name != "llama-tiefill"
    sharded = nnxport.convert(sources[name], tmp_path / "mesh", mesh=MESH, parity=parity)
    assert sharded.passed is (True if parity else None)  # parity of the sharded checkpoint
    assert sharded.manifest["mesh"] == {"data": 2, "model": 4}
    wanted = requested(tmp_path / "mesh")
    assert wanted, "the built-in mapping shards nothing"
    a, b = restore(tmp_path / "one"), restore(tmp_path / "mesh", wanted)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
        if key in wanted:
            assert b[key].sharding.is_equivalent_to(wanted[key], a[key].ndim), key
            assert len({str(s.index) for s in b[key].addressable_shards}) > 1, f"{key} is not split"


def test_requested_specs_follow_the_mapping(sources: dict[str, Path], tmp_path: Path) -> None:
    nnxport.convert(sources["llama"], tmp_path / "mesh", mesh=MESH, parity=False)
    specs = read_manifest(tmp_path / "mesh")["partition_specs"]
    assert specs["layers.0.attn.q.kernel"] == ["data", "model"]
    assert specs["layers.1.mlp.down.kernel"] == ["model", "data"]
    assert specs["embed.embedding"] == ["model", "data"]
    assert "norm.scale" not in specs  # no shard entry: replicated


def test_each_device_part_is_read_alone(sources: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharded targets are read part by part (never the whole tensor for one device); replicated ones are
    read whole, once."""
    reads: list[tuple[str, tuple[tuple[int, int], ...]]] = []
    real_box, real_read = Source.read_box, Source.read

    def read_box(self: Source, key: str, box: Any) -> np.ndarray:
        reads.append((key, tuple(box)))
        return real_box(self, key, box)

    def read(self: Source, key: str) -> np.ndarray:
        reads.append((key, tuple((0, n) for n in self.tensors[key].shape)))
        return real_read(self, key)

    monkeypatch.setattr(Source, "read_box", read_box)
    monkeypatch.setattr(Source, "read", read)
    nnxport.convert(sources["llama"], tmp_path / "mesh", mesh=MESH, parity=False)
    with open_source(sources["llama"]) as src:
        shapes = {k: t.shape for k, t in src.tensors.items()}
    q = [box for key, box in reads if key == "model.layers.0.self_attn.q_proj.weight"]
    # q_proj.weight [64 out, 64 in] -> kernel [in, out] split [data=2, model=4]: 8 parts of 16 x 32.
    assert sorted(q) == sorted({((o, o + 16), (i, i + 32)) for o in range(0, 64, 16) for i in (0, 32)})
    for key, box in reads:
        whole = tuple((0, n) for n in shapes[key])
        if "norm" in key:
            assert box == whole
        else:
            assert box != whole, f"{key} was read whole for one device"
    norm = [k for k, _ in reads if k == "model.norm.weight"]
    assert len(norm) == 1  # replicated over 8 devices, read once


def test_partition_spec_drops_what_the_mesh_cannot_do() -> None:
    mesh = build_mesh({"data": 2, "model": 4})
    assert partition_spec((("data",), ("model",)), (64, 128), mesh) == (PartitionSpec("data", "model"), [])
    assert partition_spec(None, (64,), mesh) == (PartitionSpec(), [])
    spec, why = partition_spec((("model",), ("data",)), (6, 8), mesh)
    assert spec == PartitionSpec(None, "data")
    assert why == ["dimension of size 6 cannot be split 4 ways over model"]
    spec, why = partition_spec((("data", "model"), ("expert",)), (16, 8), mesh)
    assert spec == PartitionSpec(("data", "model"))
    assert why == ["axis 'expert' is not in the mesh"]


@pytest.mark.parametrize(("shard", "message"), [
    ("model", "'shard' must be a list with one entry per target dimension"),
    ("[null, 3]", "'shard' entries are null, a mesh axis name or a list of them"),
    ("[model, model]", "names mesh axis 'model' twice"),
    ("[[], model]", "'shard' entries are null"),
])
def test_bad_shard_entries_are_mapping_errors(shard: str, message: str) -> None:
    text = f"version: 1\nmodel: resnet\nrules:\n  - from: '^a$'\n    to: 'b'\n    shard: {shard}\n"
    with pytest.raises(MappingError) as e:
        load_mapping_text(text, name="m.yaml")
    assert "rule 1 (line 4" in str(e.value) and message in str(e.value)


def test_shard_rank_mismatch_is_reported_before_reading(sources: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    text = (MAPPINGS / "decoder.yaml").read_text()
    broken = text.replace("shard: [data, model]\n    ops: [{transpose: [1, 0]}]\n  - from: '^model\\.layers"
                          "\\.(\\d+)\\.self_attn\\.o_proj", "shard: [data]\n    ops: [{transpose: [1, 0]}]\n"
                          "  - from: '^model\\.layers\\.(\\d+)\\.self_attn\\.o_proj", 1)
    assert broken != text
    mapping = tmp_path / "broken.yaml"
    mapping.write_text(broken)
    monkeypatch.setattr(Source, "read", lambda *a: pytest.fail("tensor data read"))
    with pytest.raises(MappingError) as e:
        nnxport.convert(sources["llama"], tmp_path / "out", mapping=str(mapping), mesh=MESH)
    assert "'shard' has 1 entries, target 'layers.0.attn." in str(e.value)
    assert "has 2 dimensions (64, 64)" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_two_processes_write_one_checkpoint_equal_to_one_process(sources: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """Two local CPU processes of 4 devices each under jax.distributed: one checkpoint, the same bits."""
    src = sources["llama"]
    coordinator = f"127.0.0.1:{free_port()}"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "NNXPORT_DEBUG": "1"}
    out = tmp_path / "multi"
    argv = ["convert", src, "--out", out, "--mesh", MESH, "--coordinator", coordinator,
            "--num-processes", "2", "-q"]
    procs = [subprocess.Popen([sys.executable, "-m", "nnxport", *map(str, argv), "--process-id", str(i)],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    manifest = read_manifest(out)
    assert manifest["processes"] == 2 and "parity" not in manifest
    assert not list(tmp_path.glob(".*nnxport-partial*"))
    nnxport.convert(src, tmp_path / "single", mesh=MESH, parity=False)
    a, b = restore(tmp_path / "single"), restore(out, requested(out))
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    # and the result verifies against transformers
    check = run_subprocess("verify", out, "-q")
    assert check.returncode == 0, check.stderr


def test_multi_process_flags_need_a_coordinator(cli: Any, sources: dict[str, Path], tmp_path: Path) -> None:
    result = cli("convert", sources["llama"], "--out", tmp_path / "o", "--num-processes", "2")
    assert result.exit_code == 1
    assert "--num-processes / --process-id need --coordinator HOST:PORT" in result.stderr
    result = cli("convert", sources["llama"], "--out", tmp_path / "o", "--coordinator", "nope")
    assert result.exit_code == 1
    assert "--coordinator 'nope': expected HOST:PORT" in result.stderr
    assert not (tmp_path / "o").exists()
