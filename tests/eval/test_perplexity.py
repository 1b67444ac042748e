"""Sliding-window perplexity against a per-window loop over the unpadded model (float64 log-softmax), against
transformers with the labels=-100 protocol (the PI/YaRN script's), one compile per method and length,
and blockwise and ring attention under a mesh against dense without one."""

import json
import math

import jax
import numpy as np
import pytest

from longrope_jax.data.tokenizer import ByteTokenizer
from longrope_jax.eval import perplexity
from longrope_jax.model import Llama
from longrope_jax.rope import RopeScaling
from longrope_jax.sharding import mesh as parallel
from tests.eval.tiny_eval import BOS, LONGROPE, ORIG, random_docs
from tests.nll_reference import nll64


def loop_reference(config, params, docs, length, stride, scaling=None, truncate=False, bos=BOS):
    """YaRN's loop, one unpadded window at a time through the model, float64 log-softmax."""
    apply = jax.jit(Llama(config).apply, static_argnames="rope_scaling")
    window_means, total, count = [], 0.0, 0
    for ids in docs:
        ids = list(ids[: length - 1]) if truncate else list(ids)
        step = length - 1 if truncate else stride
        prev = 0
        for begin in range(0, len(ids), step):
            end = min(begin + length - 1, len(ids))
            trg = end - prev
            window = np.asarray([bos] + ids[begin:end])
            logits = apply({"params": params}, window[None], rope_scaling=scaling)[0]
            nll = nll64(logits[:-1], window[1:])[-trg:]
            window_means.append(nll.mean())
            total, count = total + nll.sum(), count + trg
            prev = end
            if end == len(ids):
                break
    return math.exp(np.mean(window_means)), math.exp(total / count), len(window_means), count


def assert_rel(got, want, rel=2e-5):
    assert abs(got - want) <= rel * abs(want), f"{got} vs {want}"


def test_plan_windows_follow_the_yarn_loop():
    # 100 tokens, L = 48 (47 document tokens per window), stride 16: the last window is short.
    assert perplexity.plan_windows(100, 48, 16) == [(0, 47, 47), (16, 63, 16), (32, 79, 16), (48, 95, 16),
                                                    (64, 100, 5)]
    assert perplexity.plan_windows(100, 48) == [(0, 47, 47), (47, 94, 47), (94, 100, 6)]
    assert perplexity.plan_windows(100, 48, 16, truncate=True) == [(0, 47, 47)]
    assert perplexity.plan_windows(20, 48, 16) == [(0, 20, 20)]


@pytest.mark.parametrize("method", ["default", "dynamic", "longrope"])
def test_sliding_window_perplexity_equals_a_per_window_loop(model, method):
    cfg, params = model
    scaling = {"default": None, "dynamic": RopeScaling("dynamic", factor=2.0), "longrope": LONGROPE}[method]
    # 20 tokens: one window of 21 <= ORIG (LongRoPE's short factors) beside windows of 48 (long factors).
    docs = random_docs([100, 75, 20])
    rows = perplexity.evaluate_perplexity(cfg, params, docs, lengths=[48], methods={method: scaling}, stride=16,
                                          bos_id=BOS, batch_size=3)
    want_window, want_token, windows, tokens = loop_reference(cfg, params, docs, 48, 16, scaling)
    (row,) = rows
    assert (row["method"], row["length"], row["windows"], row["tokens"]) == (method, 48, windows, 195)
    assert tokens == 195  # every token scored exactly once
    assert_rel(row["ppl_window_mean"], want_window)
    assert_rel(row["ppl_token"], want_token)
    # Short last windows weigh as much as full ones in the papers' mean: the two numbers differ.
    assert abs(row["ppl_window_mean"] - row["ppl_token"]) > 1e-3 * row["ppl_token"]


def test_truncate_scores_the_first_window_of_each_document(model):
    cfg, params = model
    docs = random_docs([100, 75, 60], seed=1)
    rows = perplexity.evaluate_perplexity(cfg, params, docs, lengths=[32, 48], methods={"longrope": LONGROPE},
                                          truncate=True, bos_id=BOS)
    for row in rows:
        want_window, want_token, _, _ = loop_reference(cfg, params, docs, row["length"], None, LONGROPE, truncate=True)
        assert (row["windows"], row["tokens"]) == (3, 3 * (row["length"] - 1))
        assert_rel(row["ppl_window_mean"], want_window)
        assert_rel(row["ppl_token"], want_token)


def test_one_compile_per_method_and_length(model):
    cfg, params = model
    scorer = perplexity.WindowScorer(cfg, params)
    methods = {"pi": RopeScaling("linear", factor=2.0), "longrope": LONGROPE}
    rows = perplexity.evaluate_perplexity(cfg, params, random_docs([100, 75, 20]), lengths=[32, 48],
                                          methods=methods, stride=12, bos_id=BOS, batch_size=2, scorer=scorer)
    assert [(r["method"], r["length"]) for r in rows] == [("pi", 32), ("pi", 48), ("longrope", 32), ("longrope", 48)]
    assert scorer.traces == 4  # short windows are padded, never recompiled


def test_perplexity_matches_transformers_with_labels_minus_100(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from longrope_jax.io.hf import load_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    # Phi-3 style LongRoPE: short factors up to 32 positions, long ones beyond.
    d = json.loads((tmp_path / "config.json").read_text())
    d.pop("rope_parameters", None)
    d.update(max_position_embeddings=128, original_max_position_embeddings=ORIG, rope_theta=10000.0,
             rope_scaling={"type": "longrope", "short_factor": list(LONGROPE.short_factor),
                           "long_factor": list(LONGROPE.long_factor)})
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, params = load_hf(tmp_path)

    bos, length, stride = 1, 48, 20
    docs = random_docs([90, 30], vocab=97, seed=2)
    nlls, counts = [], []
    for ids in docs:  # the loop of yarn/eval/perplexity.py::compute_perplexity
        labels = torch.tensor(ids[None])
        prev_end = 0
        for begin in range(0, labels.size(1), stride):
            end = min(begin + length - 1, labels.size(1))
            trg_len = end - prev_end
            input_ids = torch.cat([torch.tensor([[bos]]), labels[:, begin:end]], dim=1)
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                nlls.append(float(hf(input_ids, labels=target_ids).loss))
            counts.append(trg_len)
            prev_end = end
            if end == labels.size(1):
                break
    (row,) = perplexity.evaluate_perplexity(config, params, docs, lengths=[length], stride=stride, bos_id=bos)
    assert row["windows"] == len(nlls) and row["tokens"] == sum(counts) == 120
    assert_rel(row["ppl_window_mean"], math.exp(np.mean(nlls)), rel=1e-4)
    assert_rel(row["ppl_token"], math.exp(np.dot(nlls, counts) / sum(counts)), rel=1e-4)


MESH_METHODS = {"default": None, "longrope": LONGROPE}


@pytest.fixture(scope="module")
def dense_rows(model):
    cfg, params = model
    return perplexity.evaluate_perplexity(cfg, params, random_docs([150, 40], seed=3), lengths=[64],
                                          methods=MESH_METHODS, stride=24, bos_id=BOS)


@pytest.mark.parametrize("attention", ["blockwise", "ring"])
def test_blockwise_and_ring_perplexity_on_a_mesh_equal_dense(model, dense_rows, attention):
    cfg, params = model
    methods, docs, want = MESH_METHODS, random_docs([150, 40], seed=3), dense_rows
    mesh = parallel.make_mesh(data=2, fsdp=1, seq=4, tensor=1)
    got = perplexity.evaluate_perplexity(cfg, params, docs, lengths=[64], methods=methods, stride=24, bos_id=BOS,
                                         attention=attention, attention_chunk=8, mesh=mesh)
    for g, w in zip(got, want, strict=True):
        assert (g["method"], g["windows"], g["tokens"]) == (w["method"], w["windows"], w["tokens"])
        assert_rel(g["ppl_window_mean"], w["ppl_window_mean"], rel=1e-5)
        assert_rel(g["ppl_token"], w["ppl_token"], rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[1]), "perplexity length: expected an integer >= 2, got 1"),
    (dict(lengths=[32, 48], stride=40), "stride 40: expected at most L - 1 = 31 for length 32"),
    (dict(lengths=[32], batch_size=3, attention="blockwise", mesh="2x4"), "batch_size 3: not a multiple of"),
    (dict(lengths=[36], attention="ring", mesh="2x4"), "perplexity length 36: not a multiple of 8"),
    (dict(lengths=[48], attention="blockwise", attention_chunk=32), "per-device length 48 is not a multiple of "
                                                                    "attention_chunk 32"),
    (dict(lengths=[32], attention="ring"), "attention 'ring': needs a mesh"),
    (dict(lengths=[32], documents=[[5, 300]]), "token ids reach 300; expected ids below the model's vocab_size 264"),
])
def test_bad_perplexity_input_names_the_value(model, kwargs, message):
    cfg, params = model
    kwargs = dict(kwargs)
    docs = kwargs.pop("documents", random_docs([50]))
    if kwargs.get("mesh") == "2x4":
        kwargs["mesh"] = parallel.make_mesh(data=2, fsdp=1, seq=4, tensor=1)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        perplexity.evaluate_perplexity(cfg, params, docs, bos_id=BOS, **kwargs)


def test_documents_are_the_first_long_enough_ones_in_order():
    docs = ["a" * 10, "b" * 50, "c" * 30, "d" * 60, "e" * 70]
    got = perplexity.select_documents(docs, ByteTokenizer(), docs=2, min_tokens=40, max_tokens=55)
    assert [bytes(g.tolist()) for g in got] == [b"b" * 50, b"d" * 55]
    with pytest.raises(ValueError, match="needs 3 documents of >= 60 tokens, found 2"):
        perplexity.select_documents(docs, ByteTokenizer(), docs=3, min_tokens=60)
