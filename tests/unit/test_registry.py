"""Every family is reachable: its published configs pick one built-in mapping that targets it, the mapping
files it names exist, and its abstract model for each published config has exactly as many parameters as
the transformers reference (built on torch's meta device: no memory, no weights)."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from nnxport import api
from nnxport.mapping.schema import select_mapping
from nnxport.models import FAMILIES
from nnxport.testing.published import PUBLISHED as CONFIGS

PUBLISHED = [(family, repo) for family in FAMILIES.values() for repo in CONFIGS.get(family.name, {})]


def test_every_family_publishes_configs_and_names_existing_mappings() -> None:
    names = {m.name: m for m in api.builtin_mappings()}
    for family in FAMILIES.values():
        assert CONFIGS.get(family.name), family.name
        for stem in family.mappings:
            assert stem in names, f"{family.name}: mapping {stem} missing"
            assert names[stem].model == family.name
    targeted = {m.model for m in names.values()}
    assert targeted <= set(FAMILIES)


@pytest.mark.parametrize(("family", "repo"), PUBLISHED, ids=[repo for _, repo in PUBLISHED])
def test_published_config_selects_the_family_mapping_and_builds(family, repo: str) -> None:
    config = dict(CONFIGS[family.name][repo])
    mapping = select_mapping(config, api.builtin_mappings())
    assert mapping.model == family.name and mapping.name in family.mappings
    family.check_config(config)
    model = nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0), {}))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert ours == _reference_parameters(family.parity.reference_class(config, {}), config), repo


def _reference_parameters(cls_name: str, config: dict) -> int:
    """Unique parameters of the transformers class (tied ones once), built on the meta device."""
    import torch
    import transformers

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(hf_config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
