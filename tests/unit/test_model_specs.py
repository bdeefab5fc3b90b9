"""The models room: each family's config.json -> frozen spec is a pure function, every family has its parity
harness, and the models' sharding annotations give the default ``--mesh`` layout, which a mapping's
``shard:`` overrides."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import nnxport
from nnxport.models import FAMILIES
from nnxport.models.base import ParityHarness, annotated_shards
from nnxport.pipeline.manifest import read_manifest
from nnxport.pipeline.plan import abstract_state
from nnxport.testing.published import PUBLISHED
from nnxport.testing.replicas import build_replica, published_config
from tests.helpers import MAPPINGS

TINY_LLAMA = published_config("meta-llama/Llama-3.2-1B", hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_hidden_layers=1, intermediate_size=128,
                              vocab_size=512, tie_word_embeddings=False)
BUILT_IN = [(name, repo) for name in sorted(PUBLISHED) for repo in PUBLISHED[name]]


@pytest.mark.parametrize(("name", "repo"), BUILT_IN, ids=[repo for _, repo in BUILT_IN])
def test_resolve_is_pure_and_gives_a_frozen_spec(name: str, repo: str) -> None:
    family = FAMILIES[name]
    config = published_config(repo)
    before = copy.deepcopy(config)
    spec = family.resolve(config)
    assert config == before
    assert dataclasses.is_dataclass(spec) and family.resolve(config) == spec
    field = dataclasses.fields(spec)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, None)
    assert isinstance(family.parity, ParityHarness)


def test_annotations_give_the_megatron_layout() -> None:
    family = FAMILIES["decoder"]
    _, state = abstract_state(family, TINY_LLAMA, {})
    flat = nnx.to_flat_state(nnx.get_partition_spec(state))
    specs = {".".join(map(str, p)): v.get_value() for p, v in flat}
    assert specs["layers.0.attn.q.kernel"] == PartitionSpec("data", "model")
    assert specs["layers.0.mlp.down.kernel"] == PartitionSpec("model", "data")
    assert specs["embed.embedding"] == PartitionSpec("model", "data")
    assert specs["norm.scale"] == PartitionSpec()
    shards = annotated_shards(state)
    assert shards["lm_head.kernel"] == (("data",), ("model",))
    assert "norm.scale" not in shards and "layers.0.input_norm.scale" not in shards


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_mapping_shard_overrides_the_annotation(tmp_path: Path) -> None:
    """A rule without ``shard`` takes the model's annotation; ``shard: [null, null]`` replicates."""
    src = build_replica(TINY_LLAMA, tmp_path / "llama", seed=2)
    text = (MAPPINGS / "decoder.yaml").read_text()
    embed = "    to: 'embed.embedding'\n    shard: [model, data]\n"
    qkv = "    to: 'layers.\\1.attn.\\2.kernel'\n    shard: [data, model]\n"
    assert embed in text and qkv in text
    text = text.replace(embed, "    to: 'embed.embedding'\n").replace(
        qkv, "    to: 'layers.\\1.attn.\\2.kernel'\n    shard: [null, null]\n")
    mapping = tmp_path / "decoder.yaml"
    mapping.write_text(text)
    nnxport.convert(src, tmp_path / "out", mapping=str(mapping), mesh="data=2,model=4", parity=False)
    specs = read_manifest(tmp_path / "out")["partition_specs"]
    assert specs["embed.embedding"] == ["model", "data"]        # the model's annotation
    assert "layers.0.attn.q.kernel" not in specs                # overridden: replicated
    assert specs["layers.0.attn.o.kernel"] == ["model", "data"]  # the mapping's (same as the annotation)
