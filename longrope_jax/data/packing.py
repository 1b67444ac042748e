"""Pack tokenized documents into fixed-length rows: a grain IterDataset with a small checkpoint state.

Input: an IterDataset of int32 arrays, one per document, already `[BOS, *tokens, EOS]`.
Output rows (dicts of int32 [seq_len] arrays): `tokens`, `positions`, `segment_ids`.

- `concat`: documents are laid end to end and cut into rows; a document that does not fit ends
  the row and continues at the start of the next. Within a row the pieces get segment ids 1, 2, ...
  and padding (only in the last row of a finite stream) gets 0.
- `fit`: as `concat`, but a document that fits in a row is never cut: when it does not fit in what is
  left of the current row, that row is padded and the document starts the next one. Short documents
  whose parts only make sense together (a passkey question and its key) stay whole.
- `document`: one row per document, its first seq_len tokens; a shorter one is padded with 0 segments.

Positions restart at 0 for every piece, including the tail of a document carried over from the
previous row. Attention cannot see across rows anyway, and RoPE attention depends only on relative
positions inside a segment, so continuing the count (say 3000..5047 in a 2048 row) would buy no
context; it would only move the absolute-position rules: LongRoPE's short/long factor switch (on
max(position) + 1), its un-interpolated start tokens, and dynamic NTK's base. Restarting keeps every
row's positions below seq_len, consistent with the length being trained.

Documents with fewer than `min_doc_tokens` tokens (BOS/EOS not counted) are skipped.

The checkpoint state is the parent's state before the document being cut, plus the offset into it:
restoring re-reads that one document and skips `offset` tokens. No token buffer goes into the state.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

PACK_MODES = ("concat", "fit", "document")


class PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, mode: str = "concat",
                 min_doc_tokens: int = 0, max_skipped: int | None = None):
        super().__init__(parent)
        if mode not in PACK_MODES:
            raise ValueError(f"pack={mode!r}: expected one of {PACK_MODES}")
        self._seq_len, self._pad_id, self._mode = seq_len, pad_id, mode
        self._min_doc_tokens = min_doc_tokens
        self._max_skipped = max_skipped

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), seq_len=self._seq_len, pad_id=self._pad_id, mode=self._mode,
                            min_doc_tokens=self._min_doc_tokens, max_skipped=self._max_skipped)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, mode={self._mode})"


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int, mode: str,
                 min_doc_tokens: int, max_skipped: int | None):
        super().__init__(parent)
        self._seq_len, self._pad_id, self._mode = seq_len, pad_id, mode
        self._min_doc_tokens = min_doc_tokens
        # After this many documents skipped in a row, no document can be long enough: fail, not spin.
        self._max_skipped = max_skipped
        self._doc: np.ndarray | None = None  # the document being cut (concat mode)
        self._doc_state: dict[str, Any] | None = None  # parent state before `_doc` was read
        self._offset = 0  # tokens of `_doc` already emitted

    def _next_doc(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The next long-enough document and the parent state before it; None at the end of the stream."""
        skipped = 0
        while True:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                return None
            if len(doc) - 2 >= self._min_doc_tokens:
                return np.asarray(doc, np.int32), state
            skipped += 1
            if self._max_skipped is not None and skipped > self._max_skipped:
                raise ValueError(f"{skipped} documents in a row are shorter than min_doc_tokens="
                                 f"{self._min_doc_tokens} (BOS/EOS not counted); no document is long enough")

    def __next__(self) -> dict[str, np.ndarray]:
        row = {"tokens": np.full(self._seq_len, self._pad_id, np.int32),
               "positions": np.zeros(self._seq_len, np.int32),
               "segment_ids": np.zeros(self._seq_len, np.int32)}
        if self._mode == "document":
            item = self._next_doc()
            if item is None:
                raise StopIteration
            self._put(row, 0, 1, item[0][: self._seq_len])
            return row
        filled, segment = 0, 0
        while filled < self._seq_len:
            if self._doc is None:
                item = self._next_doc()
                if item is None:
                    break
                self._doc, self._doc_state = item
                self._offset = 0
            if (self._mode == "fit" and filled and self._offset == 0
                    and filled + len(self._doc) > self._seq_len >= len(self._doc)):
                break  # keep it whole: it starts the next row (the state still points before it)
            piece = self._doc[self._offset: self._offset + self._seq_len - filled]
            segment += 1
            self._put(row, filled, segment, piece)
            filled += len(piece)
            self._offset += len(piece)
            if self._offset == len(self._doc):
                self._doc, self._doc_state = None, None
        if filled == 0:
            raise StopIteration
        return row

    @staticmethod
    def _put(row: dict[str, np.ndarray], start: int, segment: int, piece: np.ndarray) -> None:
        end = start + len(piece)
        row["tokens"][start:end] = piece
        row["positions"][start:end] = np.arange(len(piece), dtype=np.int32)
        row["segment_ids"][start:end] = segment

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state, self._offset = None, None, 0
        if state["offset"]:
            item = self._next_doc()
            if item is None or len(item[0]) <= state["offset"]:
                raise ValueError("data iterator state does not match this data: the document it was cutting "
                                 "is missing or shorter now (was the corpus, tokenizer or seq_len changed?)")
            self._doc, self._doc_state = item
            self._offset = int(state["offset"])

    def __str__(self) -> str:
        return f"PackIterator(seq_len={self._seq_len}, mode={self._mode})"
