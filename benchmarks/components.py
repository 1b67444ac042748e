"""The train step's non-matmul work, one component at a time, against transformers + torch on the same shapes.

Each row times forward + backward (AdamW: one update) of the project's code against transformers' (or
torch's) on the same tensors, one process, this CPU, the sides alternating in blocks (median of each):
RMSNorm, RoPE (cos/sin from positions, then q and k rotated; the model's `materialize` included),
SwiGLU's activation, the softmax cross-entropy on given logits, and AdamW over every parameter of the
model. Shapes are `train_step.py`'s (`--size 50m`: batch 2 x 1024 tokens, hidden 512, 8 / 4 heads of 64,
MLP 1536, vocabulary 32000, ~58M parameters).

    python benchmarks/components.py [--size tiny|50m] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import longrope_jax  # noqa: E402, F401  first: keeps jax from probing for a TPU on a CPU host with libtpu
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers.models.llama import modeling_llama as hf_llama  # noqa: E402

from longrope_jax.attention import cpu_kernel  # noqa: E402
from longrope_jax.loss import token_nll  # noqa: E402
from longrope_jax.model import LlamaConfig, RMSNorm, init_params  # noqa: E402
from longrope_jax.rope import apply_rotary, rope_cos_sin  # noqa: E402
from train_step import SIZES, alternate  # noqa: E402


def grad_fn(f, n_args):
    """jit(forward + backward of sum(f(*args) * cotangent)) over the first `n_args` arguments."""
    def loss(*args):
        return jnp.vdot(f(*args[:-1]), args[-1])
    return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def jax_call(f, *args):
    """A call of jitted `f` on these arguments, placed on the device once, that waits for its result."""
    args = [jnp.asarray(a) for a in args]
    return lambda: jax.block_until_ready(f(*args))


def torch_grad(f, args, cot):
    """forward + backward of sum(f(*args) * cot), grads into .grad of the leaf args."""
    def run():
        for a in args:
            a.grad = None
        (f(*args) * cot).sum().backward()
    return run


def rows(size: str) -> list[tuple[str, callable, callable]]:
    spec = dict(SIZES[size])
    b, seq = spec.pop("batch"), spec.pop("seq")
    e, m, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    h, k, d = spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]
    rng = np.random.default_rng(0)
    arr = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    t = lambda x: torch.tensor(x, requires_grad=True)  # noqa: E731
    cfg = LlamaConfig(**spec, max_position_embeddings=seq, rms_norm_eps=1e-5)
    hf_cfg = transformers.LlamaConfig(**spec, max_position_embeddings=seq, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)
    out = []

    # RMSNorm over [B, L, E], weight [E]
    x, w, cot = arr(b, seq, e), 1 + 0.1 * arr(e), arr(b, seq, e)
    f = grad_fn(lambda x, w: RMSNorm(cfg).apply({"params": {"scale": w}}, x), 2)
    norm = hf_llama.LlamaRMSNorm(e, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
    xt = t(x)
    out.append(("rmsnorm", jax_call(f, x, w, cot),
                torch_grad(lambda x: norm(x), [xt], torch.from_numpy(cot))))

    # RoPE: cos/sin from positions, q [B, L, H, D] and k [B, L, K, D] rotated (torch: [B, H, L, D])
    q, kk, cq, ck = arr(b, seq, h, d), arr(b, seq, k, d), arr(b, seq, h, d), arr(b, seq, k, d)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq))

    def rope(q, kk, pos):
        cos, sin = rope_cos_sin(cfg.rope_scaling, pos, head_dim=d, theta=cfg.rope_theta, max_position_embeddings=seq)
        cos, sin = cpu_kernel.materialize(cos), cpu_kernel.materialize(sin)  # as the model on one CPU device
        return apply_rotary(q, cos, sin), apply_rotary(kk, cos, sin)

    def rope_loss(q, kk, pos, cq, ck):
        qr, kr = rope(q, kk, pos)
        return jnp.vdot(qr, cq) + jnp.vdot(kr, ck)

    rope_grad = jax.jit(jax.grad(rope_loss, argnums=(0, 1)))
    rotary = hf_llama.LlamaRotaryEmbedding(hf_cfg)
    qt, kt = t(q.transpose(0, 2, 1, 3)), t(kk.transpose(0, 2, 1, 3))
    cqt, ckt = (torch.from_numpy(c.transpose(0, 2, 1, 3).copy()) for c in (cq, ck))
    post = torch.from_numpy(pos.astype(np.int64))

    def torch_rope():
        qt.grad = kt.grad = None
        cos, sin = rotary(qt, post)
        qr, kr = hf_llama.apply_rotary_pos_emb(qt, kt, cos, sin)
        ((qr * cqt).sum() + (kr * ckt).sum()).backward()

    out.append(("rope", jax_call(rope_grad, q, kk, pos, cq, ck), torch_rope))

    # SwiGLU's activation: silu(gate) * up over [B*L, M]
    g, u, cot = arr(b * seq, m), arr(b * seq, m), arr(b * seq, m)
    f = grad_fn(lambda g, u: jax.nn.silu(g) * u, 2)
    gt, ut = t(g), t(u)
    out.append(("swiglu", jax_call(f, g, u, cot),
                torch_grad(lambda g, u: F.silu(g) * u, [gt, ut], torch.from_numpy(cot))))

    # softmax cross-entropy, mean over [B*L] tokens, on given logits [B*L, V]
    logits, targets = arr(b * seq, v), rng.integers(0, v, b * seq)
    f = jax.jit(jax.grad(lambda z, y: jnp.mean(token_nll(z, y))))
    lt, yt = t(logits), torch.from_numpy(targets)

    def torch_ce():
        lt.grad = None
        F.cross_entropy(lt, yt).backward()

    out.append(("cross_entropy", jax_call(f, logits, targets), torch_ce))

    # AdamW: one update of every parameter (train_step.py's settings)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    params = init_params(cfg, jax.random.key(0))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    state = [params, tx.init(params)]
    update = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)),
                     donate_argnums=(0, 1))

    def jax_adamw():
        state[:] = update(*state, grads)
        jax.block_until_ready(state)

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    for p in hf.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    out.append(("adamw", jax_adamw, lambda: opt.step()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="50m")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    for name, ours, theirs in rows(args.size):
        ours_s, theirs_s = (float(np.median(x)) for x in alternate(ours, theirs, args.steps))
        print(json.dumps({"bench": "components", "size": args.size, "component": name,
                          "jax_ms": round(ours_s * 1e3, 2), "torch_ms": round(theirs_s * 1e3, 2),
                          "speedup_vs_torch": round(theirs_s / ours_s, 2)}), flush=True)


if __name__ == "__main__":
    main()
