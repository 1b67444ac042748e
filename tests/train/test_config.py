"""Training configuration: unknown keys are named, and every shipped config resolves and fits its slice."""

import numpy as np
import pytest

from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.sharding.mesh import make_mesh
from longrope_jax.train import config as config_lib
from longrope_jax.train.trainer import parse_train_args
from tests.tiny import REPO


def leaves(c) -> dict:
    """{dotted key: value} of every leaf of a config (an empty section is a leaf)."""
    out = {}
    for key, value in (c.to_dict() if hasattr(c, "to_dict") else c).items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in leaves(value).items()})
        else:
            out[key] = value
    return out


def nested(flat: dict) -> dict:
    out = {}
    for dotted, value in flat.items():
        *sections, key = dotted.split(".")
        d = out
        for s in sections:
            d = d.setdefault(s, {})
        d[key] = value
    return out


def test_unknown_key_in_a_config_file_is_named():
    with pytest.raises(ValueError, match=r"config.train.stepz: unknown key"):
        config_lib.resolve({"train": {"stepz": 3}})


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")
                                         if not p.stem.startswith("extend_")))  # extend configs: test_extend
def test_shipped_configs_resolve_and_fit_their_slice(name):
    c, _ = parse_train_args(["--config", str(REPO / "configs" / f"{name}.py"), "--workdir", "x"])
    # Resolving what the file changes (over the defaults) gives back the file's every value and the
    # defaults for the rest: a merge that dropped, replaced or reset a section would show here.
    written, defaults = leaves(c), leaves(config_lib.default_config())
    changes = {k: v for k, v in written.items() if defaults.get(k, object()) != v}
    assert changes, f"{name} changes nothing"
    assert leaves(config_lib.resolve(nested(changes))) == written
    c = config_lib.resolve(c)
    if not c.init_from:  # a CPU config: the trainer's own checks before compiling, on this session's 8 devices
        mesh = make_mesh(data=c.mesh.data, fsdp=c.mesh.fsdp, seq=c.mesh.seq, tensor=c.mesh.tensor)
        config_lib.check_shapes(c, mesh, config_lib.model_config(c), build_tokenizer(c.data.tokenizer).vocab_size)
    if c.init_from:  # paper recipe: its mesh names a TPU slice; check the arithmetic against it
        n = c.mesh.data * c.mesh.fsdp * c.mesh.seq * c.mesh.tensor
        assert n >= 32
        assert c.train.seq_len % (2 * c.mesh.seq) == 0
        assert c.train.batch_size % (c.mesh.data * c.mesh.fsdp) == 0
        assert c.train.seq_len // c.mesh.seq % c.model.attention_chunk == 0
        assert c.rope.type in ("linear", "yarn", "longrope")


def test_pose_target_length_is_validated_and_reaches_the_training_positions(kjv_dir):
    from longrope_jax.data.pose import pieces
    from longrope_jax.sharding.rules import DEFAULT_RULES
    from longrope_jax.train.trainer import make_batches

    def resolved(**data):
        return config_lib.resolve({"data": {"data_dir": kjv_dir, "pack": "document", **data},
                                   "model": {"max_position_embeddings": 1024},
                                   "train": {"seq_len": 64, "batch_size": 8}, "eval": {"batch_size": 8}})

    mesh, tok = make_mesh(data=1, fsdp=8, seq=1, tensor=1), build_tokenizer("byte")
    with pytest.raises(ValueError, match=r"config.data.pose_target_length: -1; expected an integer >= 0"):
        config_lib.validate(resolved(pose_target_length=-1))
    with pytest.raises(ValueError, match=r"config.data.pose_chunks: 0; expected a positive integer"):
        config_lib.validate(resolved(pose_target_length=512, pose_chunks=0))
    for bad, why in ((32, "expected at least train.seq_len 64"), (4096, "beyond model.max_position_embeddings 1024")):
        c = resolved(pose_target_length=bad)
        config_lib.validate(c)
        with pytest.raises(ValueError, match=f"config.data.pose_target_length {bad}: {why}"):
            config_lib.check_shapes(c, mesh, config_lib.model_config(c), tok.vocab_size)
    c = resolved(pose_target_length=512)
    config_lib.validate(c)
    config_lib.check_shapes(c, mesh, config_lib.model_config(c), tok.vocab_size)
    train, _ = make_batches(c, mesh, DEFAULT_RULES, tok, "train", 8)
    evaluation, _ = make_batches(c, mesh, DEFAULT_RULES, tok, "validation", 8)
    skipped = 0
    for _ in range(3):
        b = next(train)
        for pos, seg in zip(b["positions"], b["segment_ids"]):
            for s, e in pieces(seg):
                assert np.all(np.diff(pos[s:e]) >= 1) and pos[e - 1] < 512
                skipped += int(pos[e - 1] > e - s - 1)
        e = next(evaluation)  # evaluation keeps 0..l-1
        for pos, seg in zip(e["positions"], e["segment_ids"]):
            for s, t in pieces(seg):
                assert pos[s:t].tolist() == list(range(t - s))
    assert skipped >= 4
