"""llama.cpp GGUF files (llama architecture) -> `LlamaConfig`, HF-named fp32 tensors and tokenizer files.

Read with the `gguf` package (llama.cpp's own reader). `read_gguf` gives a `GGUFModel`:
- the config, from the `llama.*` metadata (context length, rope theta and the `rope.scaling.*` keys
  llama.cpp writes, RMS eps, heads, KV heads, vocabulary; no `output.weight` means tied embeddings)
  and the BOS/EOS/PAD ids of `tokenizer.ggml.*`;
- every tensor under its HF name, dequantized to float32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
  Q8_0 and the K-quants), with llama.cpp's Q/K row permutation undone: llama.cpp interleaves each
  head's rotary pairs (GPT-J layout), HF and `Llama` keep them in halves (rotate_half);
- the tokenizer the metadata describes: gpt2-style byte-level BPE as a `tokenizer.json` built with
  `tokenizers` (the pre-tokenizer chosen by `tokenizer.ggml.pre`), llama SPM as a sentencepiece
  `tokenizer.model`, each with `tokenizer_config.json` naming its special tokens.
`write_gguf_dir` (used by `convert gguf-to-hf` / `gguf-to-jax`) writes those next to the weights.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from longrope_jax.io.files import RuntimeFailure, first_line
from longrope_jax.io.param_map import ConversionError, short_list, weight_specs
from longrope_jax.model import LlamaConfig

ARCHITECTURE = "llama"
# What `gguf.quants.dequantize` turns into float32 and this reader accepts; anything else is refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# `tokenizer.ggml.pre` -> how text is split before byte-level BPE (llama.cpp's llama-vocab.cpp regexes).
_GPT2_BYTE_LEVEL = "gpt2"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": _GPT2_BYTE_LEVEL, "gpt-2": _GPT2_BYTE_LEVEL, "gpt2": _GPT2_BYTE_LEVEL,
    # digits one by one, then GPT-2's split (starcoder, smollm and friends)
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
}
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6  # llama.cpp token types (the same numbers as sentencepiece's)


@dataclasses.dataclass
class GGUFModel:
    """A GGUF file read: its config, its tensors under HF names (float32) and its tokenizer files."""

    path: Path
    config: LlamaConfig
    tensors: dict[str, np.ndarray]
    tokenizer_files: dict[str, str | bytes]

    def params(self, dtype="float32") -> dict:
        """The unscanned `Llama` params tree, of `dtype`."""
        from flax import traverse_util

        flat = {w.flax_key(): w.to_flax(self.tensors[w.hf_name]).astype(dtype) for w in weight_specs(self.config)}
        return traverse_util.unflatten_dict(flat)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise RuntimeFailure("reading GGUF files needs the `gguf` package (llama.cpp's reader): pip install gguf "
                             "(it is in the test extra)") from None
    return gguf


def _reader(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError, IndexError, ... on a bad file)
        raise ConversionError(f"{path}: not a readable GGUF file, truncated or corrupt ({first_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConversionError(f"{path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                                  f"but the file has {size}; expected a complete GGUF file")
    return reader


class _Metadata:
    """The key-value metadata of one file, with errors that name the file and the key."""

    def __init__(self, path: Path, reader):
        self.path, self.fields = path, reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{self.path}: metadata {key!r} cannot be read ({first_line(e)})") from None

    def require(self, key: str, kind: type):
        value = self.get(key)
        if value is None:
            raise ConversionError(f"{self.path}: metadata {key!r} missing; expected a {kind.__name__}")
        return self.typed(key, value, kind)

    def typed(self, key: str, value, kind: type):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
        if not ok or (kind is int and isinstance(value, bool)):
            raise ConversionError(f"{self.path}: metadata {key!r} is {value!r:.80}; expected a {kind.__name__}")
        return _f32(value) if kind is float else value


def _f32(v: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.999999747e-06. The shortest decimal that reads
    back as the same float32 is what the converter was given."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def read_gguf(path) -> GGUFModel:
    """A llama-architecture GGUF file as config + HF-named float32 tensors + tokenizer files."""
    path = Path(path)
    reader = _reader(path)
    meta = _Metadata(path, reader)
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ConversionError(f"{path}: general.architecture is {arch!r}; expected {ARCHITECTURE!r} "
                              "(this converter reads LLaMA-architecture GGUF files only)")
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, tensors)
    return GGUFModel(path, config, _hf_tensors(path, config, tensors), _tokenizer_files(meta, config))


# ---- config ------------------------------------------------------------------------------------------


def _config(meta: _Metadata, tensors: dict) -> LlamaConfig:
    a = ARCHITECTURE
    heads = meta.require(f"{a}.attention.head_count", int)
    hidden = meta.require(f"{a}.embedding_length", int)
    head_dim = meta.typed(f"{a}.attention.key_length", meta.get(f"{a}.attention.key_length", hidden // heads), int)
    rotary = meta.typed(f"{a}.rope.dimension_count", meta.get(f"{a}.rope.dimension_count", head_dim), int)
    if rotary != head_dim:
        raise ConversionError(f"{meta.path}: metadata '{a}.rope.dimension_count' is {rotary}; expected the head "
                              f"dimension {head_dim} (partial rotary LLaMAs are not supported)")
    if "rope_freqs.weight" in tensors:
        raise ConversionError(f"{meta.path}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency factors, e.g. "
                              "Llama 3.1 scaling) is not supported; expected a file without it")
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = tensors.get("token_embd.weight")
    vocab = meta.get(f"{a}.vocab_size") or (len(tokens) if tokens else None) or (
        int(embed.shape[-1]) if embed is not None else None)
    if vocab is None:
        raise ConversionError(f"{meta.path}: no '{a}.vocab_size', tokenizer.ggml.tokens or token_embd.weight; "
                              "expected one of them to give the vocabulary size")
    d = {
        "model_type": "llama",
        "vocab_size": meta.typed(f"{a}.vocab_size", vocab, int),
        "hidden_size": hidden,
        "intermediate_size": meta.require(f"{a}.feed_forward_length", int),
        "num_hidden_layers": meta.require(f"{a}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.typed(f"{a}.attention.head_count_kv",
                                          meta.get(f"{a}.attention.head_count_kv", heads), int),
        "head_dim": head_dim,
        "max_position_embeddings": meta.require(f"{a}.context_length", int),
        "rms_norm_eps": meta.require(f"{a}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": meta.typed(f"{a}.rope.freq_base", meta.get(f"{a}.rope.freq_base", 10000.0), float),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "rope_scaling": _rope_scaling(meta),
    }
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            d[f"{kind}_token_id"] = meta.typed(f"tokenizer.ggml.{key}", value, int)
    try:
        return LlamaConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{meta.path}: the metadata gives an invalid config ({e})") from None


def _rope_scaling(meta: _Metadata) -> dict | None:
    """The HF rope_scaling dict of llama.cpp's `rope.scaling.*` keys (or the older `rope.scale_linear`)."""
    p = f"{ARCHITECTURE}.rope.scaling."
    kind = meta.get(p + "type")
    factor = meta.get(p + "factor")
    if kind is None and meta.get(f"{ARCHITECTURE}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(f"{ARCHITECTURE}.rope.scale_linear")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ConversionError(f"{meta.path}: metadata {p + 'type'!r} is {kind!r}; expected 'none', 'linear' or 'yarn'")
    if factor is None:
        raise ConversionError(f"{meta.path}: metadata {p + 'factor'!r} missing; rope.scaling.type {kind!r} needs it")
    out = {"rope_type": kind, "factor": meta.typed(p + "factor", factor, float)}
    if kind == "yarn":
        original = meta.get(p + "original_context_length")
        if original is None:
            raise ConversionError(f"{meta.path}: metadata {p + 'original_context_length'!r} missing; "
                                  "rope.scaling.type 'yarn' needs it")
        out["original_max_position_embeddings"] = meta.typed(p + "original_context_length", original, int)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                                 ("attn_factor", "attention_factor")):
            if meta.get(p + gguf_key) is not None:
                out[hf_key] = meta.typed(p + gguf_key, meta.get(p + gguf_key), float)
    return out


# ---- tensors -----------------------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a llama.cpp tensor name (None if it has none)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: within each head its rows were reordered from the halves layout
    (pair i = rows i and i + d/2) to interleaved pairs (rows 2i, 2i+1); put them back."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _dequantize(path: Path, t) -> np.ndarray:
    gguf = _gguf()
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ConversionError(f"{path}: tensor {t.name!r} has type {kind}; expected one of {', '.join(SUPPORTED_TYPES)}")
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: tensor {t.name!r} ({kind}) cannot be dequantized ({first_line(e)})") from None
    return np.asarray(w, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


def _hf_tensors(path: Path, config: LlamaConfig, tensors: dict) -> dict[str, np.ndarray]:
    names = {}
    for name in tensors:
        hf = hf_name(name)
        if hf is None:
            raise ConversionError(f"{path}: unexpected tensor {name!r}; expected only LLaMA tensors "
                                  f"({', '.join(_GLOBAL_TENSORS)}, blk.N.{{{', '.join(_LAYER_TENSORS)}}})")
        names[hf] = name
    specs = weight_specs(config)
    missing = [f"{_gguf_name(w.hf_name)} ({w.hf_name})" for w in specs if w.hf_name not in names]
    if missing:
        raise ConversionError(f"{path}: missing tensor(s) {short_list(missing)} that the metadata implies "
                              f"({config.num_hidden_layers} layers)")
    unexpected = sorted(set(names) - {w.hf_name for w in specs})
    if unexpected:
        raise ConversionError(f"{path}: unexpected tensor(s) {short_list([names[n] for n in unexpected])} that the "
                              "metadata does not describe")
    out = {}
    for w in specs:
        t = tensors[names[w.hf_name]]
        x = _dequantize(path, t)
        if x.shape != w.hf_shape:
            raise ConversionError(f"{path}: tensor {t.name!r} has shape {x.shape} (HF order); expected {w.hf_shape}")
        if ".q_proj." in w.hf_name:
            x = unpermute_rows(x, config.num_attention_heads)
        elif ".k_proj." in w.hf_name:
            x = unpermute_rows(x, config.num_key_value_heads)
        out[w.hf_name] = x
    return out


def _gguf_name(hf: str) -> str:
    for g, h in _GLOBAL_TENSORS.items():
        if h == hf:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    inverse = {h: g for g, h in _LAYER_TENSORS.items()}
    return f"blk.{m.group(1)}.{inverse[m.group(2)]}" if m else hf


# ---- tokenizer ---------------------------------------------------------------------------------------


def _tokenizer_files(meta: _Metadata, config: LlamaConfig) -> dict[str, str | bytes]:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return {}
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConversionError(f"{meta.path}: metadata 'tokenizer.ggml.tokens' missing or empty; "
                              f"tokenizer.ggml.model {model!r} needs it")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        files = {"tokenizer.json": _byte_level_bpe(meta, tokens, types).to_str()}
    elif model == "llama":
        files = {"tokenizer.model": _sentencepiece(meta, tokens, types)}
    else:
        raise ConversionError(f"{meta.path}: metadata 'tokenizer.ggml.model' is {model!r}; expected 'gpt2' "
                              "(byte-level BPE) or 'llama' (sentencepiece)")
    special = {}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and 0 <= i < len(tokens):
            special[f"{kind}_token"] = tokens[i]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if model == "gpt2" else "LlamaTokenizer",
        **special,
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if model == "llama":
        tok_config["legacy"] = False
    files["tokenizer_config.json"] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        files["chat_template.jinja"] = template
    gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k) is not None}
    if gen:
        files["generation_config.json"] = json.dumps(gen, indent=2) + "\n"
    return files


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte (the alphabet byte-level BPE vocabularies are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _byte_level_bpe(meta: _Metadata, tokens: list, types: list):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"{meta.path}: metadata 'tokenizer.ggml.pre' is {pre!r}; expected one of "
                              f"{sorted(PRE_TOKENIZERS)} (the pre-tokenizers this converter knows)")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ConversionError(f"{meta.path}: metadata 'tokenizer.ggml.merges' missing; a gpt2 tokenizer needs it")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet already; one that is not (rare) is spelled into it.
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ConversionError(f"{meta.path}: metadata 'tokenizer.ggml.merges' holds {m!r}; expected 'A B' pairs")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (_GPT2_BYTE_LEVEL, "digits"))
    if split == _GPT2_BYTE_LEVEL:
        tok.pre_tokenizer = byte_level
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|endoftext|>, ...) are special, user-defined ones plain added tokens: both stay whole.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tok


def _sentencepiece(meta: _Metadata, tokens: list, types: list) -> bytes:
    """A sentencepiece BPE `tokenizer.model` from the pieces, scores and types llama.cpp copied out of one."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    m = spm.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(kind) if 1 <= int(kind) <= 6 else 1
    ts = m.trainer_spec
    ts.model_type = spm.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(k == _BYTE for k in types)
    taken = set()
    for field, key, default in (("unk_id", "unknown_token_id", 0), ("bos_id", "bos_token_id", -1),
                                ("eos_id", "eos_token_id", -1), ("pad_id", "padding_token_id", -1)):
        i = int(meta.get(f"tokenizer.ggml.{key}", default))
        # sentencepiece wants distinct special ids; a PAD (or other) reusing one is left to config.json
        setattr(ts, field, i if i not in taken and 0 <= i < len(tokens) else -1)
        taken.add(i)
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def write_tokenizer_files(files: dict[str, str | bytes], directory: Path) -> None:
    """Write `files` ({name: text or bytes}) into `directory` (a temporary one being built)."""
    for name, content in files.items():
        target = Path(directory) / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
