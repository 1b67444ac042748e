"""The sharding tests' model, meshes and expected placements on 8 CPU devices.

References: unsharded single-device init and forward for values; for placement, partition specs
written out by hand below from the logical names and DEFAULT_RULES (not derived with Flax)."""

import dataclasses
import functools

import jax
import numpy as np

from longrope_jax.model import LlamaConfig, init_params
from longrope_jax.sharding.init import init_sharded
from longrope_jax.sharding.mesh import make_mesh

# Every dimension a DEFAULT_RULES mesh below shards divides: heads and kv heads by tensor=4,
# hidden by fsdp*seq=8, vocab and mlp by 4.
CONFIG = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
)
BATCH, LENGTH = 8, 16
MESHES = {  # (data, fsdp, seq, tensor)
    "fsdp8": (1, 8, 1, 1),
    "fsdp2_tensor4": (1, 2, 1, 4),
    "fsdp4_tensor2": (1, 4, 1, 2),
    "fsdp2_seq2_tensor2": (1, 2, 2, 2),
    "data2_seq2_tensor2": (2, 1, 2, 2),
}

# By hand from DEFAULT_RULES: embed -> (fsdp, seq); heads, kv_heads, mlp, vocab -> tensor.
E = ("fsdp", "seq")
EXPECTED_SPECS = {
    "embed_tokens/embedding": ("tensor", E),  # (vocab, embed)
    "self_attn/q_proj/kernel": (E, "tensor", None),  # (embed, heads, head_dim)
    "self_attn/k_proj/kernel": (E, "tensor", None),  # (embed, kv_heads, head_dim)
    "self_attn/v_proj/kernel": (E, "tensor", None),
    "self_attn/o_proj/kernel": ("tensor", None, E),  # (heads, head_dim, embed)
    "mlp/gate_proj/kernel": (E, "tensor"),  # (embed, mlp)
    "mlp/up_proj/kernel": (E, "tensor"),
    "mlp/down_proj/kernel": ("tensor", E),  # (mlp, embed)
    "input_layernorm/scale": (E,),  # (embed,)
    "post_attention_layernorm/scale": (E,),
    "norm/scale": (E,),
    "lm_head/kernel": (E, "tensor"),  # (embed, vocab)
}


def mesh_of(name):
    data, fsdp, seq, tensor = MESHES[name]
    return make_mesh(data=data, fsdp=fsdp, seq=seq, tensor=tensor)


def config_of(scan):
    return dataclasses.replace(CONFIG, scan_layers=scan)


def flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_spec(path, scan):
    """The hand-written spec for a param path ('layers_0/mlp/up_proj/kernel' or 'layers/...')."""
    key = path.split("/", 1)[1] if path.startswith("layers") else path
    spec = EXPECTED_SPECS[key]
    return ((None,) + spec) if scan and path.startswith("layers/") else spec


def normalize(spec, ndim, mesh=None):
    """PartitionSpec -> tuple of length ndim; ('a',) and 'a' are the same placement, and so is
    leaving out an axis of size 1 of `mesh` (XLA drops those from the shardings it infers)."""
    out = [(tuple(a) if isinstance(a, (tuple, list)) else (a,)) if a is not None else () for a in tuple(spec)]
    if mesh is not None:
        out = [tuple(n for n in a if mesh.shape[n] > 1) for a in out]
    out = [None if not a else a for a in out]
    out = [a[0] if isinstance(a, tuple) and len(a) == 1 else a for a in out]
    return tuple(out + [None] * (ndim - len(out)))


def axes_size(mesh, axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


@functools.cache
def sharded_params(mesh_name, scan):
    return init_sharded(config_of(scan), mesh_of(mesh_name), jax.random.key(0))


@functools.cache
def reference_params(scan):
    return init_params(config_of(scan), jax.random.key(0))


def tokens_np():
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
