"""Model artifacts by spec: a rope_scaling JSON file fails the same way wherever it is read (evaluation
methods and training configs)."""

import pytest

from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.rope import RopeScaling


def test_rope_json_files_fail_the_same_way_in_eval_and_training(tmp_path):
    from longrope_jax.train import config as config_lib

    (tmp_path / "list.json").write_text("[1.0, 2.0]")
    (tmp_path / "bad.json").write_text("{")
    cases = {"list.json": (ValueError, "holds a JSON list; expected a rope_scaling JSON object"),
             "bad.json": (ValueError, "is not valid JSON"),
             "missing.json": (FileNotFoundError, "not found; expected a rope_scaling JSON object")}
    for name, (error, message) in cases.items():
        with pytest.raises(error, match=f"longrope method: .*{name}.* {message}"):
            read_rope_scaling(tmp_path / name, "longrope method", 256)
        c = config_lib.default_config()
        c.rope.update(type="longrope", factors_file=str(tmp_path / name))
        with pytest.raises(error, match=f"config.rope.factors_file: .*{name}.* {message}"):
            config_lib.rope_scaling(c, RopeScaling())
