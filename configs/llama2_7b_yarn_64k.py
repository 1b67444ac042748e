"""YaRN (Peng et al. 2023): LLaMA-2 7B 4k -> 64k, s=16, 400 steps at lr 2e-5, batch 64.

Slice: TPU v4-256 (128 chips): fsdp 8 x seq 16 (4k tokens per ring device).

Memory: the paper's 64 sequences per step are taken as 2 micro-batches (train.grad_accum=2): 8 rows of
4096 tokens per chip, as in the PI recipe, whose one-pass step needed 94% of 32 GiB; in two, 13.7 GiB
(see long_context_finetune for where it goes).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="llama2-7b", init_from="hf:checkpoints/Llama-2-7b-hf",
                              seq_len=65536, steps=400, lr=2e-5,
                              batch_size=64, mesh=dict(data=1, fsdp=8, seq=16, tensor=1))
    c.rope.update(type="yarn", factor=16.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0)
    c.train.grad_accum = 2
    return c
