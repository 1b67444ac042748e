"""Compiled memory of the LM-head loss and its gradient: the chunked loss (`loss.chunked_token_nll`)
against the dense one (all [B, L, V] logits at once), in the same run, compiled by libtpu for one
TPU chip (no TPU needed: the compiler's own figures).

    python benchmarks/loss.py [--tokens 32768] [--vocabs 32000,128256] [--chunk 1024] [--topology v5p:2x2x1]

Each line printed is one JSON object: temporaries per chip in GiB for each vocabulary and path.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from longrope_jax.aot.topology import parse_topology, tpu_devices  # noqa: E402
from longrope_jax.loss import chunked_token_nll  # noqa: E402

GIB = 1 << 30


def loss_and_grad_temporaries(device, tokens: int, vocab: int, hidden: int, chunk: int) -> int:
    """Temporaries of d(sum NLL)/d(hidden, head) for one sequence, compiled for `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def loss(h, w, t):
        return jnp.sum(chunked_token_nll(h, w, t, chunk=chunk))

    args = (jax.ShapeDtypeStruct((1, tokens, hidden), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((hidden, vocab), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((1, tokens), jnp.int32, sharding=sharding))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--vocabs", default="32000,128256")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--topology", default="v5p:2x2x1")
    a = p.parse_args()
    device = tpu_devices(parse_topology(a.topology))[0]
    for vocab in (int(v) for v in a.vocabs.split(",")):
        dense = loss_and_grad_temporaries(device, a.tokens, vocab, a.hidden, chunk=a.tokens)
        chunked = loss_and_grad_temporaries(device, a.tokens, vocab, a.hidden, chunk=a.chunk)
        print(json.dumps({"tokens": a.tokens, "vocab": vocab, "hidden": a.hidden, "chunk": a.chunk,
                          "topology": a.topology, "dense_temporaries_gib": round(dense / GIB, 3),
                          "chunked_temporaries_gib": round(chunked / GIB, 3), "ratio": round(dense / chunked, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
