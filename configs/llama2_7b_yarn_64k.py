"""YaRN (Peng et al. 2023): LLaMA-2 7B 4k -> 64k, s=16, 400 steps at lr 2e-5, batch 64.

Slice: TPU v4-256 (128 chips): fsdp 8 x seq 16 (4k tokens per ring device).

Memory (`longrope-jax compile`, libtpu): the paper's batch stays 64 sequences, taken as 2 micro-batches
(`train.grad_accum=2`). In one pass the layer inputs that full remat keeps are [32 layers, 8 rows, 4096
tokens, 4096] bf16 = 8 GiB per chip, and the PI step needed 30.0 GiB of v4's 32 GiB (94%); in two it needs
half the activations (see README's recipe table for the figure).
"""

from longrope_jax.train.config import long_context_finetune


def get_config():
    c = long_context_finetune(arch="llama2-7b", init_from="hf:checkpoints/Llama-2-7b-hf",
                              seq_len=65536, steps=400, lr=2e-5,
                              batch_size=64, mesh=dict(data=1, fsdp=8, seq=16, tensor=1))
    c.rope.update(type="yarn", factor=16.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0)
    c.train.grad_accum = 2
    return c
