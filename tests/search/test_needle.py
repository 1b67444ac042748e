"""LongRoPE2's needle-driven perplexity: token-exact needle windows (seeded, answers recoverable, only
the answer digits scored) and the evaluator's masked perplexity against a direct float64 log-softmax."""

import dataclasses
import json

import numpy as np
import pytest

from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.model import Llama
from longrope_jax.rope import RopeScaling
from longrope_jax.search.fitness import PerplexityEvaluator
from longrope_jax.search.needle import NEEDLE, needle_depths, needle_windows
from tests.nll_reference import next_token_mask64, perplexity64
from tests.search.tiny_search import D_HALF, ORIG, TARGET

LENGTH = 1024


@pytest.fixture(scope="module")
def docs(kjv_dir):
    return list(open_source("kjv", "validation", data_dir=kjv_dir))


def test_needle_windows_are_exact_length_seeded_and_score_only_the_answers(docs):
    tok = build_tokenizer("byte")
    tokens, mask = needle_windows(docs, tok, LENGTH, 3, needles=3, seed=7)
    assert tokens.shape == mask.shape == (3, LENGTH) and tokens.dtype == np.int32 and mask.dtype == bool
    again, _ = needle_windows(docs, tok, LENGTH, 2, needles=3, seed=7)
    np.testing.assert_array_equal(again, tokens[:2])  # window i depends on (seed, i) only
    other, _ = needle_windows(docs, tok, LENGTH, 3, needles=3, seed=8)
    assert not np.array_equal(other, tokens)
    for row, m in zip(tokens, mask):
        assert row[0] == tok.bos_id and not m[0]
        text = tok.decode(row[1:].tolist())
        answers = []
        for span in np.split(np.flatnonzero(m), np.flatnonzero(np.diff(np.flatnonzero(m)) > 1) + 1):
            answers.append(tok.decode(row[span].tolist()))
        assert len(answers) == 3 and all(a.isdigit() and len(a) == 7 for a in answers)
        # Each answer is the value of a needle placed in the body, the needles in depth order.
        body_end = text.index(" What is the special magic number")
        starts = []
        for a in answers:
            i = text.index("is: " + a + ".")
            key = text[text.rindex("numbers for ", 0, i) + len("numbers for "): i - 1]
            assert NEEDLE.format(key=key, value=a) in text[:body_end]
            assert f"magic number for {key} mentioned in the provided text is: {a}" in text[body_end:]
            starts.append(text.index(NEEDLE.format(key=key, value=a)))
        assert starts == sorted(starts)
        haystack = body_end - sum(len(NEEDLE.format(key="x", value=a)) + 2 for a in answers)  # rough depths
        assert starts[0] <= 2 and starts[-1] > 0.9 * haystack
    np.testing.assert_allclose(needle_depths(3), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="needle perplexity: needs 3 documents"):
        needle_windows(docs[:1], tok, LENGTH, 3, needles=3)


def test_needle_perplexity_equals_a_direct_log_softmax_over_the_answer_tokens(model, docs):
    cfg, params = model
    tokens, scored = needle_windows(docs, build_tokenizer("byte"), TARGET, 2, needles=1, seed=0)
    evaluator = PerplexityEvaluator(cfg, params, tokens, original_length=ORIG, target_length=TARGET,
                                    candidates_per_call=2, score_mask_NxL=scored)
    lams = np.stack([np.full(D_HALF, 4.0), np.linspace(1.0, 5.0, D_HALF)])
    ours = evaluator(lams)
    again = evaluator(lams[::-1])
    assert evaluator.traces == 1  # a second call reuses the compile
    np.testing.assert_allclose(again[::-1], ours, rtol=1e-6)
    targets, mask = next_token_mask64(tokens, np.ones_like(tokens))
    predicts_answer = mask & np.concatenate([scored[:, 1:], np.zeros_like(scored[:, :1])], axis=1)
    assert predicts_answer.sum() == scored.sum() == 2 * 7
    for lam, got in zip(lams[:1], ours[:1]):  # one direct reference (each costs an uncompiled forward)
        scaling = RopeScaling.from_hf({"rope_type": "longrope", "original_max_position_embeddings": ORIG,
                                       "factor": TARGET / ORIG, "short_factor": [1.0] * D_HALF,
                                       "long_factor": lam.tolist()})
        logits = Llama(dataclasses.replace(cfg, rope_scaling=scaling)).apply({"params": params}, tokens)
        assert got == pytest.approx(perplexity64(logits, targets, predicts_answer), rel=2e-5)
        assert got != pytest.approx(perplexity64(logits, targets, mask), rel=1e-3)  # not the document perplexity
    with pytest.raises(ValueError, match="score mask"):
        PerplexityEvaluator(cfg, params, tokens, original_length=ORIG, target_length=TARGET,
                            score_mask_NxL=np.ones_like(scored))


def test_cli_longrope2_search_with_the_needle_objective(model, kjv_dir, tmp_path, capsys):
    from longrope_jax import cli
    from longrope_jax.io.orbax_params import save_jax
    from longrope_jax.search.space import critical_pair

    cfg, params = model
    save_jax(cfg, params, tmp_path / "model")
    out = tmp_path / "out"
    argv = ["search", "--model", f"jax:{tmp_path / 'model'}", "--target-length", str(TARGET), "--out", str(out),
            "--data-dir", kjv_dir, "--docs", "2", "--population", "6", "--mutations", "2", "--crossovers", "2",
            "--parents", "3", "--iterations", "1", "--no-progress", "--objective", "needle", "--needles", "1",
            "--space", "longrope2", "--critical-window", "2"]
    assert cli.main(argv) == 0
    assert "long factors: perplexity" in capsys.readouterr().out
    r = json.loads((out / "long" / "result.json").read_text())
    assert r["config"]["objective"] == "needle" and r["config"]["search_space"] == "longrope2"
    centre = critical_pair(2 * D_HALF, cfg.rope_theta, ORIG)
    assert r["config"]["critical_pair"] == centre and r["config"]["bound_scale"] == 2.0
    lam, s = np.asarray(r["factors"]), TARGET / ORIG
    # Some r in the window: λ >= s and monotone from r up, λ_r^(i/r) below.
    fits = [q for q in range(max(1, centre - 2), centre + 3)
            if np.all(lam[q:] >= s) and np.allclose(lam[:q], lam[q] ** (np.arange(q) / q))]
    assert fits and np.all(np.diff(lam) >= 0) and lam.max() <= 2 * s
    d = json.loads((out / "rope_scaling.json").read_text())
    assert d["long_factor"] == r["factors"] and d["short_factor"] == [1.0] * D_HALF
    assert cli.main(argv + ["--short"]) == 2  # longrope2 has no short search
