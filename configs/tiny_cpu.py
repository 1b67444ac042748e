"""The byte-level demo model: 4 layers x 128 wide, context 256, trainable on a laptop CPU in minutes.

rope_theta is chosen so the longest RoPE wavelength relative to the context equals LLaMA-2's
(2*pi*10000**(126/128) / 4096 = 13.4 contexts), so extending it has the same shape as at full scale.
"""

import math

from longrope_jax.train.config import default_config

CONTEXT = 256
HEAD_DIM = 32
LLAMA2_RATIO = 2 * math.pi * 10000 ** (1 - 2 / 128) / 4096


def get_config():
    c = default_config()
    c.model.update(
        vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=True, max_position_embeddings=CONTEXT,
        rope_theta=round((LLAMA2_RATIO * CONTEXT / (2 * math.pi)) ** (HEAD_DIM / (HEAD_DIM - 2)), 1),
    )
    c.data.update(source="kjv", tokenizer="byte", pack="concat")
    c.train.update(steps=300, batch_size=16, seq_len=CONTEXT, dtype="float32")
    c.optimizer.update(lr=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.1)
    c.mesh.update(data=1, fsdp=-1, seq=1, tensor=1)
    c.checkpoint.update(every_steps=100, keep=2)
    c.eval.update(every_steps=100, batches=4, batch_size=16)
    c.logging.update(every_steps=10)
    return c
