"""The float64 reference for every next-token NLL and perplexity in the tests: a full log-softmax in
numpy, written out independently of `longrope_jax.loss` (no jax, no logsumexp trick shared with it)."""

from __future__ import annotations

import math

import numpy as np


def log_softmax64(logits) -> np.ndarray:
    """log p over the last axis, float64, shifted by the max for stability."""
    x = np.asarray(logits, np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def nll64(logits, targets) -> np.ndarray:
    """-log p(target) at each position: logits [..., V], targets [...] int."""
    return -np.take_along_axis(log_softmax64(logits), np.asarray(targets)[..., None], -1)[..., 0]


def next_token_mask64(tokens, segments) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask) by a plain loop: position t of a row predicts token t+1 when both lie in the same
    nonzero segment (document); padding (segment 0) and each document's last token predict nothing."""
    tokens, segments = np.asarray(tokens), np.asarray(segments)
    targets, mask = np.zeros_like(tokens), np.zeros(tokens.shape, bool)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if segments[b, t] != 0 and segments[b, t + 1] == segments[b, t]:
                targets[b, t], mask[b, t] = tokens[b, t + 1], True
    return targets, mask


def perplexity64(logits, targets, mask) -> float:
    """exp(mean NLL over the masked positions)."""
    mask = np.asarray(mask, bool)
    return math.exp(nll64(logits, targets)[mask].mean())
