"""Logical-axis rules: overrides from a config, and the parameter shardings they give."""

import pytest

from longrope_jax.sharding.init import param_shardings
from longrope_jax.sharding.rules import DEFAULT_RULES, rules_from_config
from tests.sharding.sharded_model import CONFIG, flat, mesh_of, normalize


def test_rules_from_config_replaces_in_place_and_appends_new_names():
    rules = rules_from_config({"embed": "fsdp", "vocab": None, "mlp": ["tensor"], "experts": "data,fsdp"})
    expected = dict(DEFAULT_RULES, embed="fsdp", vocab=None, experts=("data", "fsdp"))
    assert [name for name, _ in rules] == [name for name, _ in DEFAULT_RULES] + ["experts"]
    assert dict(rules) == expected
    hash(rules)  # a Flax module attribute must be hashable
    assert rules_from_config() == DEFAULT_RULES
    assert rules_from_config([("embed", "fsdp"), ("embed", "seq")])[2:4] == (("embed", "fsdp"), ("embed", "seq"))


@pytest.mark.parametrize("overrides, message", [
    ({"embed": "model"}, "logical axis rule 'embed': unknown mesh axis 'model'"),
    ({"mlp": ("tensor", "tesnor")}, "unknown mesh axis 'tesnor'"),
    ({"mlp": ("tensor", "tensor")}, "mesh axis repeated"),
    ([("embed",)], "expected a (logical name, mesh axes) pair"),
])
def test_rules_from_config_rejects_bad_overrides(overrides, message):
    with pytest.raises(ValueError) as e:
        rules_from_config(overrides)
    assert message in str(e.value)


def test_param_shardings_follow_overridden_rules():
    mesh = mesh_of("fsdp4_tensor2")
    rules = rules_from_config({"embed": "fsdp", "vocab": None, "mlp": None})
    shardings = flat(param_shardings(CONFIG, mesh, rules))
    assert normalize(shardings["embed_tokens/embedding"].spec, 2) == (None, "fsdp")
    assert normalize(shardings["layers_0/mlp/up_proj/kernel"].spec, 2) == ("fsdp", None)
    assert normalize(shardings["layers_0/self_attn/q_proj/kernel"].spec, 3) == ("fsdp", "tensor", None)
