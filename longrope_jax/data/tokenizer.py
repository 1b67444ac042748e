"""Tokenizers behind one small interface: byte-level, Hugging Face `tokenizer.json`, sentencepiece.

Every tokenizer has `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `encode(text) -> list[int]` (no
special tokens added: the packer adds BOS and EOS itself) and `decode(ids) -> str` (special tokens
dropped). `build_tokenizer(spec)` picks one from a string: `"byte"`, `"hf:PATH"`, `"sentencepiece:PATH"`.
"""

from __future__ import annotations

from pathlib import Path

from longrope_jax.io.files import read_json_object

BYTE_VOCAB_SIZE = 264  # 256 bytes + BOS, EOS, PAD, rounded up to a multiple of 8 (even vocab shards)
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_CONFIG = "config.json"
# Tried in order when a tokenizer directory names no BOS/EOS/PAD token (LLaMA 2, LLaMA 3, GPT-2, T5...).
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<unk>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS = 256, EOS = 257, PAD = 258; ids 259..263 are unused.

    The tiny models use it: no file to ship, no unknown text, and `vocab_size` (264) is the
    `vocab_size` their config must have.
    """

    vocab_size = BYTE_VOCAB_SIZE
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # Special and unused ids are dropped; a byte sequence cut mid-character decodes to U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=264)"


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`), read with the `tokenizers` library.

    BOS/EOS/PAD come from `tokenizer_config.json` beside the file, else from `config.json`
    (`bos_token_id`, ...), else from well-known token names; a missing PAD falls back to EOS (padding
    sits under segment id 0 and is never a target, so any valid id serves).
    """

    def __init__(self, path: str | Path):
        import tokenizers

        path = Path(path)
        file = path / TOKENIZER_JSON if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: not found; expected a Hugging Face tokenizer.json (or a directory holding one)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = _special_tokens_from_files(file.parent)
        self.bos_id = self._special_id("bos", named, _BOS_NAMES)
        self.eos_id = self._special_id("eos", named, _EOS_NAMES)
        pad = self._special_id("pad", named, _PAD_NAMES, required=False)
        self.pad_id = self.eos_id if pad is None else pad

    def _special_id(self, kind: str, named: dict, fallbacks: tuple[str, ...], required: bool = True) -> int | None:
        value = named.get(kind)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            token_id = self._tok.token_to_id(value)
            if token_id is None:
                raise ValueError(
                    f"{self.path}: {kind}_token {value!r} (from {TOKENIZER_CONFIG}) is not in the vocabulary")
            return token_id
        for name in fallbacks:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise ValueError(
                f"{self.path}: no {kind} token: set {kind}_token in {TOKENIZER_CONFIG} or {kind}_token_id in "
                f"{MODEL_CONFIG} beside it (none of {list(fallbacks)} is in the vocabulary)")
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _special_tokens_from_files(directory: Path) -> dict:
    """{'bos': str | int, 'eos': ..., 'pad': ...} from tokenizer_config.json, then config.json."""
    found: dict = {}
    config = directory / TOKENIZER_CONFIG
    if config.is_file():
        d = read_json_object(config, "", "a JSON object")
        for kind in ("bos", "eos", "pad"):
            value = d.get(f"{kind}_token")
            if isinstance(value, dict):  # older files: {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str):
                found[kind] = value
    model_config = directory / MODEL_CONFIG
    if model_config.is_file():
        d = read_json_object(model_config, "", "a JSON object")
        for kind in ("bos", "eos", "pad"):
            value = d.get(f"{kind}_token_id")
            if isinstance(value, list) and value:  # LLaMA 3.1 lists several EOS ids; the first ends documents
                value = value[0]
            if isinstance(value, int) and kind not in found:
                found[kind] = value
    return found


class SentencePieceTokenizer:
    """A sentencepiece `.model` file (LLaMA 2, Mistral). A model without a PAD piece pads with EOS."""

    def __init__(self, path: str | Path):
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; expected a sentencepiece .model file")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None
        self.path = path
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the model has no BOS or EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id}); "
                             "both are needed to mark documents")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def build_tokenizer(spec: str) -> Tokenizer:
    """`"byte"`, `"hf:PATH"` (a directory with tokenizer.json, or the file) or `"sentencepiece:PATH"`."""
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer spec: got {type(spec).__name__}; expected a string such as 'byte'")
    kind, _, path = spec.partition(":")
    if kind == "byte" and not path:
        return ByteTokenizer()
    if kind == "hf" and path:
        return HFTokenizer(path)
    if kind == "sentencepiece" and path:
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer spec {spec!r}: expected 'byte', 'hf:PATH' or 'sentencepiece:PATH'")


def check_fits(tokenizer: Tokenizer, vocab_size: int, spec: str, model: str) -> None:
    """A ValueError when `tokenizer` can emit ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {spec}: has {tokenizer.vocab_size} ids but {model} has vocab_size {vocab_size}; "
                         "expected a tokenizer no larger than the model's vocabulary (the model's own tokenizer?)")
