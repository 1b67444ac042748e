"""Training and evaluation data: corpus -> tokenizer -> packed rows -> per-process batches (grain).

    tokenizer = tokenizer.build_tokenizer("byte")       # or "hf:DIR", "sentencepiece:FILE.model"
    source = sources.open_source("kjv", "train")        # or "tfds:pg19", "files:docs/*.jsonl"
    loader = loader.make_loader(source, tokenizer, seq_len=512, batch_size=8, seed=0)
    batch = next(loader)   # {"tokens", "positions", "segment_ids"}: int32 [batch_size, seq_len]

Training (`train=True`) is infinite: each epoch visits every document once in an order shuffled from
`(seed, epoch)`, and process `p` of `n` takes every n-th document of that order, so the processes'
documents are disjoint and together cover the epoch. Evaluation (`train=False`) is one pass in
source order; there every process packs the whole split and takes its own rows of each global batch
(rows `p*batch_size ... (p+1)*batch_size - 1`), so all processes yield the same number of batches (no
multi-host deadlock) at the cost of tokenizing the split once per process. The last global batch is
padded with empty rows (segment id 0) rather than dropped, so every token is evaluated.

The loader is a grain `DatasetIterator`: `get_state()`/`set_state()` give an exact resume, and with
Orbax it is saved with `grain.checkpoint.CheckpointSave(loader)` and restored with
`grain.checkpoint.CheckpointRestore(loader)` (e.g. inside `ocp.args.Composite(data=...)`); the state
file is per process (`process_<i>-of-<n>.json`), so a restore needs the same process count.
See `packing` for the row layout.

PoSE (`pose_target_length`, training only; see `pose`) replaces each packed piece's positions 0..l-1 by
skip-wise positions below the target length, drawn per row from the seed and the row's index (restored
with the rest of the loader's state).

Loss masking is the trainer's job: token t predicts token t+1 only where both have the same nonzero
segment id, so padding predicts nothing, a row's last token predicts nothing, and one document's EOS
never predicts the next document's BOS.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import grain
import numpy as np

from longrope_jax.data.packing import PACK_MODES, PackIterDataset
from longrope_jax.data.pose import PoseSkip

# Tokenization runs in these reader threads (HF tokenizers and sentencepiece release the GIL).
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=32)
# An infinite loader fails after this many epochs' worth of documents in a row were too short for
# min_doc_tokens (if a single document is long enough, a false alarm has probability ~e^-20).
_MAX_SKIPPED_EPOCHS = 20


def make_loader(source: Sequence[str], tokenizer, *, seq_len: int, batch_size: int, seed: int, train: bool = True,
                pack: str = "concat", shard_index: int | None = None, shard_count: int | None = None,
                min_doc_tokens: int = 0, pose_target_length: int | None = None,
                pose_chunks: int = 2) -> grain.DatasetIterator:
    """An iterator of per-process batches: dicts of int32 numpy arrays [batch_size, seq_len].

    `batch_size` is the number of rows this process yields. `shard_index`/`shard_count` default to
    `jax.process_index()`/`jax.process_count()`. `pack` is "concat" (documents laid end to end), "fit"
    (the same, but a document that fits in a row is never cut) or
    "document" (one row per document, its first seq_len tokens). Documents with fewer than
    `min_doc_tokens` tokens (BOS/EOS not counted) are skipped. `seed` only matters for training.
    `pose_target_length` (training only) gives every row PoSE positions in `pose_chunks` chunks that skip
    to cover that length (>= seq_len).
    """
    seq_len = _positive_int("seq_len", seq_len)
    batch_size = _positive_int("batch_size", batch_size)
    min_doc_tokens = _non_negative_int("min_doc_tokens", min_doc_tokens)
    seed = _non_negative_int("seed", seed)
    if pack not in PACK_MODES:
        raise ValueError(f"pack={pack!r}: expected one of {PACK_MODES}")
    shard_index, shard_count = _shard(shard_index, shard_count)
    if pose_target_length is not None:
        pose = PoseSkip(_positive_int("pose_target_length", pose_target_length), _positive_int("pose_chunks", pose_chunks))
        if not train:
            raise ValueError("pose_target_length: PoSE positions are for training; evaluation loaders keep 0..l-1")
        if pose.target_length < seq_len:
            raise ValueError(f"pose_target_length={pose.target_length}: expected at least seq_len={seq_len}")
    if len(source) == 0:
        raise ValueError(f"data source {source!r} holds no document")

    docs = grain.MapDataset.source(source)
    if train:
        # A 32-bit shuffle seed derived from `seed`: grain reseeds epoch e with seed + e, so raw seeds
        # 0 and 1 would share all but one epoch's order.
        shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        docs = docs.shuffle(seed=shuffle_seed).repeat()[shard_index::shard_count]
    tokens = docs.map(_Tokenize(tokenizer)).to_iter_dataset(READ_OPTIONS)
    max_skipped = _MAX_SKIPPED_EPOCHS * len(source) if train else None
    rows = PackIterDataset(tokens, seq_len=seq_len, pad_id=tokenizer.pad_id, mode=pack,
                           min_doc_tokens=min_doc_tokens, max_skipped=max_skipped)
    if pose_target_length is not None:
        rows = rows.random_map(pose, seed=int(np.random.SeedSequence([seed, shard_index, 0x9053]).generate_state(1)[0]))
    if train:
        batches = rows.batch(batch_size, drop_remainder=True)
    else:
        batches = rows.batch(batch_size * shard_count, drop_remainder=False).map(
            _ProcessRows(shard_index, batch_size, shard_count, seq_len, tokenizer.pad_id))
    return iter(batches)


class _Tokenize:
    """str -> int32 [BOS, *tokens, EOS]."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        t = self.tokenizer
        return np.asarray([t.bos_id, *t.encode(text), t.eos_id], dtype=np.int32)


class _ProcessRows:
    """Pad a (possibly short, last) global batch to full size and keep this process's rows of it."""

    def __init__(self, shard_index: int, batch_size: int, shard_count: int, seq_len: int, pad_id: int):
        self.start, self.stop = shard_index * batch_size, (shard_index + 1) * batch_size
        self.global_rows, self.seq_len, self.pad_id = batch_size * shard_count, seq_len, pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for key, value in batch.items():
            missing = self.global_rows - value.shape[0]
            if missing:
                fill = np.full((missing, self.seq_len), self.pad_id if key == "tokens" else 0, np.int32)
                value = np.concatenate([value, fill])
            out[key] = value[self.start: self.stop]
        return out


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    shard_count = _positive_int("shard_count", shard_count)
    shard_index = _non_negative_int("shard_index", shard_index)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index={shard_index}: expected 0 <= shard_index < shard_count={shard_count}")
    return shard_index, shard_count


def _positive_int(name: str, value) -> int:
    value = _int(name, value)
    if value < 1:
        raise ValueError(f"{name}={value}: expected a positive integer")
    return value


def _non_negative_int(name: str, value) -> int:
    value = _int(name, value)
    if value < 0:
        raise ValueError(f"{name}={value}: expected a non-negative integer")
    return value


def _int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r}: expected an integer") from None
