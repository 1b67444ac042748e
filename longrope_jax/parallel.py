"""Device mesh, logical-axis rules and sharded initialization.

The model names only logical axes; these rules map them to the physical mesh axes
('data', 'fsdp', 'seq', 'tensor'). Flax assigns rules in order and skips a mesh axis that an
earlier dimension of the same array already uses, so `embed` shards weights over (fsdp, seq) while
activations, whose batch and length already take those axes, keep `embed` unsharded.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "seq", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("embed", ("fsdp", "seq")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)
