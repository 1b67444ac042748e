"""PoSE (arXiv 2309.10400) against its definition: chunk lengths that sum to the window, skip biases
u_0 = 0 <= u_1 <= ... <= L_t - L_c drawn uniformly, positions strictly increasing and below the target,
and a loader whose PoSE rows are reproducible and resume exactly."""

import json

import numpy as np
import pytest

from longrope_jax.data.loader import make_loader
from longrope_jax.data.pose import (
    PoseSkip,
    chunk_lengths,
    pieces,
    pose_positions,
    skip_biases,
)


def chunks_of(pos) -> list[np.ndarray]:
    """The chunks of a PoSE window: runs of consecutive positions."""
    return np.split(pos, np.flatnonzero(np.diff(pos) != 1) + 1)


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_positions_follow_the_definition(chunks):
    rng = np.random.default_rng(0)
    length, target = 64, 1024
    for _ in range(300):
        pos = pose_positions(length, target, rng, chunks)
        assert pos.shape == (length,) and pos.dtype == np.int32
        assert pos[0] == 0 and np.all(np.diff(pos) >= 1) and pos[-1] < target  # u_0 = 0; strictly increasing
        parts = chunks_of(pos)
        assert len(parts) <= chunks and sum(map(len, parts)) == length  # chunk lengths sum to the window
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        u = np.asarray([p[0] for p in parts]) - starts  # the skip biases
        assert u[0] == 0 and np.all(np.diff(u) >= 0) and u[-1] <= target - length


def test_two_chunks_and_skips_are_drawn_uniformly_over_their_ranges():
    rng = np.random.default_rng(1)
    length, room, n = 10, 7, 20000
    firsts = np.asarray([chunk_lengths(length, 2, rng)[0] for _ in range(n)])
    # l_0 uniform on 1..ceil(L_c / 2), as the released train_pose.py draws it
    assert set(firsts) == {1, 2, 3, 4, 5}
    np.testing.assert_allclose(np.bincount(firsts)[1:] / n, 0.2, atol=0.015)
    u1 = np.asarray([skip_biases(2, room, rng)[1] for _ in range(n)])
    assert set(u1) == set(range(room + 1))  # u_1 uniform on {0, ..., L_t - L_c}, both ends included
    np.testing.assert_allclose(np.bincount(u1) / n, 1 / (room + 1), atol=0.015)
    u = np.stack([skip_biases(3, room, rng) for _ in range(n)])
    assert u[:, 0].max() == 0 and np.all(u[:, 2] >= u[:, 1]) and u.max() == room
    many = np.stack([chunk_lengths(length, 4, rng) for _ in range(2000)])
    assert np.all(many >= 1) and np.all(many.sum(1) == length) and len({tuple(m) for m in many}) > 50
    assert pose_positions(5, 5, rng).tolist() == [0, 1, 2, 3, 4]  # nothing to skip
    with pytest.raises(ValueError, match="target length"):
        pose_positions(10, 9, rng)


def test_every_packed_piece_is_its_own_window_and_padding_keeps_its_positions():
    seg = np.asarray([1, 1, 1, 2, 2, 2, 2, 2, 0, 0])
    row = {"tokens": np.arange(10, dtype=np.int32), "segment_ids": seg,
           "positions": np.asarray([0, 1, 2, 0, 1, 2, 3, 4, 0, 0], np.int32)}
    assert pieces(seg) == [(0, 3), (3, 8)]
    out = PoseSkip(100)(row, np.random.default_rng(0))
    assert out["tokens"] is row["tokens"] and out["positions"][8:].tolist() == [0, 0]
    for a, b in pieces(seg):
        p = out["positions"][a:b]
        assert p[0] == 0 and np.all(np.diff(p) >= 1) and p[-1] < 100


def loader(docs, tok, **kw):
    return make_loader(docs, tok, seq_len=64, batch_size=2, seed=3, pack="document", shard_index=0, shard_count=1,
                       pose_target_length=512, **kw)


def test_loader_pose_rows_are_seeded_and_resume_exactly(byte, val_docs):
    docs = val_docs[:30]
    a, b = loader(docs, byte), loader(docs, byte)
    plain = make_loader(docs, byte, seq_len=64, batch_size=2, seed=3, pack="document", shard_index=0, shard_count=1)
    skipped = 0
    for _ in range(6):
        x, y, z = next(a), next(b), next(plain)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])  # same seed, same positions
        np.testing.assert_array_equal(x["tokens"], z["tokens"])  # PoSE moves positions only
        np.testing.assert_array_equal(x["segment_ids"], z["segment_ids"])
        for pos, seg in zip(x["positions"], x["segment_ids"]):
            for s, e in pieces(seg):
                assert np.all(np.diff(pos[s:e]) >= 1) and pos[e - 1] < 512
        skipped += int((x["positions"] != z["positions"]).any())
    assert skipped >= 5
    other = make_loader(docs, byte, seq_len=64, batch_size=2, seed=4, pack="document", shard_index=0, shard_count=1,
                        pose_target_length=512)
    assert not np.array_equal(next(other)["positions"], next(loader(docs, byte))["positions"])
    state = json.loads(json.dumps(a.get_state()))  # as a checkpoint stores it
    expected = [next(a) for _ in range(3)]
    resumed = loader(docs, byte)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_loader_rejects_bad_pose_settings(byte, val_docs):
    with pytest.raises(ValueError, match="pose_target_length=32: expected at least seq_len=64"):
        make_loader(val_docs[:5], byte, seq_len=64, batch_size=2, seed=0, shard_index=0, shard_count=1,
                    pose_target_length=32)
    with pytest.raises(ValueError, match="pose_target_length: PoSE positions are for training"):
        make_loader(val_docs[:5], byte, seq_len=64, batch_size=2, seed=0, train=False, shard_index=0, shard_count=1,
                    pose_target_length=128)
    with pytest.raises(ValueError, match="pose_chunks=0"):
        loader(val_docs[:5], byte, pose_chunks=0)
