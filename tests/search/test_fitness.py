"""The search's fitness: perplexity of LongRoPE candidates against a direct float64 log-softmax over
the model's full logits, its windows, and one compile for many candidates."""

import dataclasses

import numpy as np
import pytest

from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.model import Llama
from longrope_jax.rope import START_TOKEN_CHOICES, RopeScaling
from longrope_jax.search.fitness import PerplexityEvaluator
from tests.nll_reference import next_token_mask64, perplexity64
from tests.search.tiny_search import (
    D_HALF,
    ORIG,
    TARGET,
)


def test_perplexity_equals_a_direct_log_softmax_computation(model, windows, evaluator):
    cfg, params = model
    lams = [np.full(D_HALF, 4.0), np.linspace(1.0, 5.0, D_HALF), np.linspace(1.0, 2.0, D_HALF)]
    n_hats = [0, 0, 8]
    ours = evaluator(np.stack(lams), np.asarray(n_hats))
    for lam, n_hat, got in zip(lams, n_hats, ours):
        scaling = RopeScaling.from_hf({"rope_type": "longrope", "original_max_position_embeddings": ORIG,
                                       "factor": TARGET / ORIG, "short_factor": [1.0] * D_HALF,
                                       "long_factor": lam.tolist(), "start_tokens": n_hat})
        logits = Llama(dataclasses.replace(cfg, rope_scaling=scaling)).apply({"params": params}, windows)
        # One document per window: every position but the last predicts the next token.
        targets, mask = next_token_mask64(windows, np.ones_like(windows))
        assert mask.sum() == windows.shape[0] * (windows.shape[1] - 1)
        assert got == pytest.approx(perplexity64(logits, targets, mask), rel=2e-5)
    assert len(set(np.round(ours, 3))) == 3  # the factors and n̂ really change the model


def test_eval_windows_are_bos_plus_document_prefixes(kjv_dir, windows):
    tok = build_tokenizer("byte")
    docs = [d for d in open_source("kjv", "validation", data_dir=kjv_dir) if len(tok.encode(d)) >= TARGET]
    assert windows.shape == (3, TARGET) and windows.dtype == np.int32
    for row, doc in zip(windows, docs):
        assert row[0] == tok.bos_id and row[1:].tolist() == tok.encode(doc)[: TARGET - 1]


def test_model_compiles_once_for_many_candidates(evaluator):
    rng = np.random.default_rng(0)
    before = evaluator.traces
    for count in (1, 4, 7, 3):
        lam = np.sort(rng.uniform(1, 5, (count, D_HALF)), axis=1)
        ppl = evaluator(lam, rng.choice(START_TOKEN_CHOICES, count))
        assert ppl.shape == (count,) and np.all(np.isfinite(ppl))
    assert evaluator.traces == 1 and before <= 1


def test_evaluator_on_a_mesh_equals_one_device(model, windows, evaluator):
    """On 8 devices each (candidate, window) pair is split over the whole mesh and attended with the ring."""
    from longrope_jax.sharding.mesh import make_mesh

    cfg, params = model
    sharded = PerplexityEvaluator(dataclasses.replace(cfg, attention="blockwise", attention_chunk=32), params, windows,
                                  original_length=ORIG, target_length=TARGET, candidates_per_call=2,
                                  search_start_tokens=True, mesh=make_mesh(fsdp=2, seq=4))
    assert sharded.model.config.attention == "ring"
    lams = np.stack([np.full(D_HALF, 4.0), np.linspace(1.0, 5.0, D_HALF), np.linspace(1.0, 2.0, D_HALF)])
    n_hats = np.asarray([0, 0, 8])
    np.testing.assert_allclose(sharded(lams, n_hats), evaluator(lams, n_hats), rtol=2e-5)
    with pytest.raises(ValueError, match="search length 260: on this mesh it is split into 8 pieces"):
        sharded.check_length(260)
