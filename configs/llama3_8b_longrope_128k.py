"""LongRoPE on Llama-3 8B: 8k -> 128k (16x) with searched factors, 400 steps at 128k, lr 2e-5.

Slice: TPU v5p-256 (128 chips): fsdp 4 x seq 32.
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="llama3-8b", init_from="hf:checkpoints/Meta-Llama-3-8B",
                              seq_len=131072, steps=400, lr=2e-5,
                              batch_size=32, mesh=dict(data=1, fsdp=4, seq=32, tensor=1))
    c.rope.update(type="longrope", original_max_position_embeddings=8192,
                  factors_file="factors/llama3_8b_128k.json")
    return c
