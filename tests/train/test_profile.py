"""`--config.profile.steps=N,M` writes an XProf trace of those training steps."""

import pytest

from longrope_jax.train.profile import parse_steps
from longrope_jax.train.trainer import train
from tests.tiny import tiny_train_config


def test_profile_steps_write_an_xprof_trace_of_those_steps(kjv_dir, tmp_path):
    c = tiny_train_config(kjv_dir, train__steps=3, profile__steps="2,3", checkpoint__every_steps=3,
                          eval__every_steps=0)
    train(c, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_no_profile_by_default(kjv_dir, tmp_path):
    train(tiny_train_config(kjv_dir, train__steps=2, checkpoint__every_steps=2, eval__every_steps=0), tmp_path)
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("text", ["0,2", "3,2", "a,b", "1,2,3", "-1"])
def test_bad_profile_steps_name_the_key(text):
    with pytest.raises(ValueError, match=r"config.profile.steps .*expected 'N,M' with 1 <= N <= M"):
        parse_steps(text)


def test_profile_steps_parse():
    assert (parse_steps(""), parse_steps("4"), parse_steps(" 2, 5 ")) == (None, (4, 4), (2, 5))
