"""Attention kernels, chosen by `LlamaConfig.attention`: `dense` (the reference), `blockwise`
(O(L * chunk) online softmax), `ring` (sequence parallel over a mesh axis), `splash` (TPU Pallas),
and the zig-zag layout that balances the causal ring. On one CPU device `dense` and `blockwise` run
as `flash_attention`, a C++ kernel (cpu_kernel.py). This file only gathers their public names.
"""

from longrope_jax.attention import cpu_kernel
from longrope_jax.attention.blockwise import CPU_BLOCKWISE_MIN, CPU_CHUNK, blockwise_attention, chunk_size, cpu_blocks
from longrope_jax.attention.cpu_kernel import flash_attention
from longrope_jax.attention.dense import attention_mask, dense_attention, group_heads
from longrope_jax.attention.ring import ring_attention, seq_shards
from longrope_jax.attention.splash import splash_attention
from longrope_jax.attention.zigzag import (
                                           causal_blocks_per_device,
                                           causal_critical_path,
                                           causal_work,
                                           unzigzag,
                                           zigzag,
                                           zigzag_indices,
)

ATTENTION_IMPLS = ("dense", "blockwise", "ring", "splash")

__all__ = ["ATTENTION_IMPLS", "CPU_CHUNK", "CPU_BLOCKWISE_MIN", "cpu_blocks", "attention_mask", "blockwise_attention", "causal_blocks_per_device",
           "causal_critical_path", "causal_work", "chunk_size", "cpu_kernel", "dense_attention", "flash_attention", "group_heads", "ring_attention",
           "seq_shards", "splash_attention", "unzigzag", "zigzag", "zigzag_indices"]
