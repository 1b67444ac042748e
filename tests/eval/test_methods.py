"""Method specs (`none`, `default`, `KIND:FACTOR`, `longrope:FILE`) -> the RopeScaling they name, and bad specs."""

import json

import pytest

from longrope_jax.eval.methods import parse_method, parse_methods
from longrope_jax.rope import RopeScaling
from tests.eval.tiny_eval import ORIG, eval_model_config


def test_method_specs_build_the_rope_scaling_they_name(tmp_path):
    cfg = eval_model_config(rope_scaling=RopeScaling("linear", factor=3.0))
    factors = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIG,
               "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.0, 2.0, 3.0, 4.0], "start_tokens": 4}
    (tmp_path / "rope_scaling.json").write_text(json.dumps(factors))
    hf_config = {"model_type": "phi3", "max_position_embeddings": 128, "original_max_position_embeddings": 16,
                 "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4,
                                                         "long_factor": [2.0] * 4}}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    want = {
        "none": RopeScaling("linear", factor=3.0),
        "default": RopeScaling(),
        "linear:4": RopeScaling("linear", factor=4.0),
        "ntk:4": RopeScaling("ntk", factor=4.0),
        "dynamic:2.5": RopeScaling("dynamic", factor=2.5),
        "yarn:4": RopeScaling("yarn", factor=4.0, original_max_position_embeddings=24),
        "llama3:8": RopeScaling("llama3", factor=8.0, original_max_position_embeddings=24, low_freq_factor=1.0,
                                high_freq_factor=4.0),
        f"longrope:{tmp_path / 'rope_scaling.json'}": RopeScaling(
            "longrope", factor=4.0, original_max_position_embeddings=ORIG, short_factor=(1.0, 1.1, 1.2, 1.3),
            long_factor=(1.0, 2.0, 3.0, 4.0), start_tokens=4),
        f"longrope:{tmp_path / 'config.json'}": RopeScaling(
            "longrope", original_max_position_embeddings=16, short_factor=(1.0,) * 4, long_factor=(2.0,) * 4),
    }
    for spec, scaling in want.items():
        assert parse_method(spec, cfg, original_length=24) == scaling, spec
    # Unnamed specs are named by themselves; no spec at all is the model's own RoPE.
    methods, specs = parse_methods(["pi=linear:4", "yarn:4"], cfg)
    assert specs == {"pi": "linear:4", "yarn:4": "yarn:4"}
    assert methods["yarn:4"].original_max_position_embeddings == ORIG  # default: max_position_embeddings
    assert parse_methods(None, cfg)[0] == {"model": cfg.rope_scaling}


@pytest.mark.parametrize("spec, message", [
    ("rope:2", "method spec 'rope:2': unknown kind 'rope'"),
    ("linear:two", "method spec 'linear:two': expected linear:FACTOR with a number, got 'two'"),
    ("yarn:0.5", "method spec 'yarn:0.5': rope_scaling.factor: expected a number >= 1, got 0.5"),
    ("none:2", "method spec 'none:2': 'none' takes no argument"),
    ("longrope:missing.json", "missing.json not found"),
    ("longrope:short.json", "method spec 'longrope:short.json': rope_scaling.short_factor: has 2 values; "
                            "expected rotary_dim/2 = 4"),
    ("longrope:yarn.json", "has rope_type 'yarn'; expected a 'longrope' rope_scaling"),
])
def test_bad_method_specs_name_the_value(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.json").write_text(json.dumps({"rope_type": "longrope", "short_factor": [1, 1],
                                                     "long_factor": [2, 2]}))
    (tmp_path / "yarn.json").write_text(json.dumps({"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        parse_method(spec, eval_model_config())
