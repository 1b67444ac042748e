"""Batches from the grain loader: epochs, sharding between processes, determinism, and exact resume
against an uninterrupted iterator (and through Orbax's CheckpointManager)."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from longrope_jax.data.loader import make_loader
from tests.data.corpus import SEQ, VERSES, assert_same_batches, doc_tokens, docs_in_stream, loader_for, rows_of


def test_training_epoch_holds_every_document_once_and_reshuffles(byte, val_docs):
    docs = VERSES[:50]
    total = sum(len(d) for d in doc_tokens(docs, byte))
    loader = make_loader(docs, byte, seq_len=SEQ, batch_size=2, seed=3)
    stream = rows_of(loader, n=-(-2 * total // (2 * SEQ)))["tokens"].reshape(-1)
    assert (stream != byte.pad_id).all()  # training rows are full
    epoch1, epoch2 = stream[:total], stream[total: 2 * total]
    assert sorted(docs_in_stream(epoch1, byte)) == sorted(docs)
    assert sorted(docs_in_stream(epoch2, byte)) == sorted(docs)
    order1, order2 = docs_in_stream(epoch1, byte), docs_in_stream(epoch2, byte)
    assert order1 != docs and order2 != order1


def test_training_shards_are_disjoint_and_cover_each_epoch(byte):
    docs = VERSES[:10]
    seen = []
    for p, n_rows in zip(range(3), (4, 3, 3)):  # 10 documents over 3 processes: global order p, p+3, ...
        loader = make_loader(docs, byte, seq_len=512, batch_size=1, seed=5, pack="document",
                                  shard_index=p, shard_count=3)
        rows = rows_of(loader, n=n_rows)["tokens"]
        seen.append([byte.decode(r) for r in rows])
    flat = [d for shard in seen for d in shard]
    assert sorted(flat) == sorted(docs)


def test_eval_shards_yield_equal_batch_counts_and_interleave_to_the_whole(byte, val_docs):
    docs = VERSES[:30] + val_docs[:1]
    whole = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=6, seed=0, train=False,
                                     shard_index=0, shard_count=1))
    shards = [list(make_loader(docs, byte, seq_len=SEQ, batch_size=2, seed=0, train=False,
                                    shard_index=p, shard_count=3)) for p in range(3)]
    assert len({len(s) for s in shards}) == 1
    for k in whole:
        glued = np.concatenate([np.concatenate([s[b][k] for s in shards]) for b in range(len(shards[0]))])
        np.testing.assert_array_equal(glued, whole[k])


def test_same_seed_same_batches_other_seed_other_batches(byte, val_docs):
    assert_same_batches(loader_for(val_docs, byte), loader_for(val_docs, byte), 20)
    a, b = next(loader_for(val_docs, byte)), next(loader_for(val_docs, byte, seed=8))
    assert not np.array_equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize("pack", ["concat", "fit", "document"])
def test_set_state_mid_epoch_continues_exactly(byte, pack):
    docs = VERSES[:40]
    run = loader_for(docs, byte, pack=pack)
    offsets = []
    for k in range(12):  # several states, mid-document ones included; one epoch is ~6 batches
        state = json.loads(json.dumps(run.get_state()))  # as a checkpoint stores it
        offsets.append(state["offset"] if pack == "concat" else 0)
        resumed = loader_for(docs, byte, pack=pack)
        resumed.set_state(state)
        assert_same_batches(run, resumed, 1 if k < 11 else 8)
    if pack == "concat":
        assert sum(o > 0 for o in offsets) >= 5  # the state did land inside documents


def test_orbax_checkpoint_manager_round_trip_resumes_exactly(byte, val_docs, tmp_path):
    run = loader_for(val_docs, byte)
    for _ in range(5):
        next(run)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(run)))
        mngr.wait_until_finished()
    resumed = loader_for(val_docs, byte)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches(run, resumed, 6)
