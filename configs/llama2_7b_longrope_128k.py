"""LongRoPE (Ding et al. 2024): LLaMA-2 7B 4k -> 128k with searched factors, 400 steps at 128k, lr 2e-5.

The factors come from `longrope-jax search` (JSON with short_factor / long_factor).
Slice: TPU v5p-256 (128 chips): fsdp 4 x seq 32 (4k tokens per ring device).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="llama2-7b", init_from="hf:checkpoints/Llama-2-7b-hf",
                              seq_len=131072, steps=400, lr=2e-5,
                              batch_size=32, mesh=dict(data=1, fsdp=4, seq=32, tensor=1))
    c.optimizer.update(schedule="linear", end_lr_ratio=0.0)
    c.rope.update(type="longrope", original_max_position_embeddings=4096,
                  factors_file="factors/llama2_7b_128k.json")
    return c
