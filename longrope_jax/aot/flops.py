"""Model FLOPs of a LLaMA step, counted from the architecture (the convention MFU is defined on).

The compiler's own `cost_analysis()` counts a loop body once, so a model scanned over its layers (or
a step scanned over micro-batches) would read as a fraction of its real work; hence this count.
Per token, a forward pass costs 2 FLOPs per weight of every matmul (attention projections, MLP, the
LM head; the embedding lookup is free) plus attention: 2 * 2 * context * heads * head_dim per layer
for QK^T and PV, halved for causal training windows. A training step is three forward passes' worth.
"""

from __future__ import annotations

from longrope_jax.model import LlamaConfig


def matmul_weights(c: LlamaConfig) -> int:
    """Weights that multiply every token: per layer q, k, v, o and the gated MLP, plus the LM head."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size


def forward_flops(c: LlamaConfig, tokens: int, context: int, causal: bool = True) -> float:
    """FLOPs of a forward pass over `tokens` tokens that each attend to up to `context` positions."""
    window = min(context, c.sliding_window or context)
    attention = 4 * window * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    if causal:
        attention /= 2
    return tokens * (2 * matmul_weights(c) + attention)


def train_flops(c: LlamaConfig, tokens: int, context: int) -> float:
    return 3 * forward_flops(c, tokens, context)
