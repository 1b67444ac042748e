"""Reference values from `transformers` (torch, fp32): the peer every RoPE test compares against."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def hf_config(rope: dict | None, *, head_dim=128, theta=10000.0, max_pos=2048, **extra) -> HFLlamaConfig:
    return HFLlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
        max_position_embeddings=max_pos, rope_scaling=dict(rope) if rope else None, **extra,
    )


def hf_frequencies(rope: dict | None, *, head_dim=128, theta=10000.0, max_pos=2048, seq_len=None):
    """(inv_freq numpy, attention_factor) straight from ROPE_INIT_FUNCTIONS."""
    cfg = hf_config(rope, head_dim=head_dim, theta=theta, max_pos=max_pos)
    rope_type = (rope or {}).get("rope_type", "default")
    if rope_type == "default":
        inv, att = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, att = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
    return inv.numpy(), float(att)


def hf_cos_sin(rope: dict | None, positions: np.ndarray, *, head_dim=128, theta=10000.0, max_pos=2048):
    """cos, sin of HF's rotary module in its forward pass (runtime long/short and dynamic updates)."""
    cfg = hf_config(rope, head_dim=head_dim, theta=theta, max_pos=max_pos)
    module = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = module(x, torch.as_tensor(np.asarray(positions), dtype=torch.long))
    return cos.numpy(), sin.numpy()
