"""Blockwise attention: online softmax over query and key chunks (`lax.scan`) with a flash-style
custom VJP, so forward and backward memory are O(L * chunk). Chunk pairs whose mask is empty are
skipped. The block kernels here are also what the ring folds in at every step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from longrope_jax.attention.dense import attention_mask, group_heads

NEG = -1e30  # online-softmax running max before any key is seen
# XLA:CPU: the model's `dense` runs as blockwise attention from 256 tokens up, where the length is a
# multiple of CPU_CHUNK (measured on a 2-core Xeon; see README, CPU attention).
CPU_CHUNK = 128
CPU_BLOCKWISE_MIN = 256
CPU_BLOCK_SCORES = 1 << 20  # score elements per block over (batch, heads): ~4 MiB of fp32
CPU_MAX_CHUNKS = 16  # chunks per axis, above which loop steps cost more than cache misses
FULL, PARTIAL, EMPTY = 0, 1, 2  # kinds of (query chunk, key chunk) pairs, in visiting order


def cpu_blocks(length: int, rows: int = 1) -> tuple[int, int]:
    """(query rows, keys) per block for CPU attention over `rows` = batch x query heads, chosen by
    measurement on a 2-core Xeon (see README, CPU attention): the largest square power-of-two blocks
    of at most CPU_BLOCK_SCORES scores over all rows, but at least length / CPU_MAX_CHUNKS; at most
    half the length (so causal blocks are skipped), from CPU_CHUNK to 512, dividing the length. That
    is 128 for the tiny model (16 x 4 rows, 256 tokens), 256 for 2 x 8 rows at 1024 tokens and for
    SmolLM2 (9 heads) at 4k, 512 for SmolLM2 at 8k and 16k."""
    by_cache = 2 ** math.floor(math.log2(math.sqrt(CPU_BLOCK_SCORES / max(rows, 1))))
    by_steps = 2 ** math.ceil(math.log2(max(length // CPU_MAX_CHUNKS, 1)))
    half = 2 ** math.floor(math.log2(max(length // 2, 1)))
    c = max(min(max(by_cache, by_steps), 512, half), CPU_CHUNK)
    while c > CPU_CHUNK and length % c:
        c //= 2
    return c, c


def chunk_size(length: int, chunk: int) -> int:
    if length <= chunk:
        return length
    if length % chunk:
        raise ValueError(f"attention_chunk: length {length} is not a multiple of the chunk size {chunk}")
    return chunk


def _chunks(x, c: int, axis: int = 1):
    """Split `axis` into [n, c] and move n to the front (the scan axis)."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // c, c) + shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unchunk(x, axis: int = 1):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _scaled(q, scale):
    """q * scale when q is float32 (then scores need no extra pass); else q unchanged (scale the scores)."""
    return (q * scale, 1.0) if q.dtype == jnp.float32 else (q, scale)


def _heads_first(x):
    """[B, L, K, G, D] -> [B, K, G, L, D]: per kv head, rows (g, l) feed one batched matmul per block."""
    return jnp.moveaxis(x, 1, 3)


def _heads_last(x):
    return jnp.moveaxis(x, 3, 1)


def _keys_t(k):
    """[B, S, K, D] -> [B, K, D, S]: the right operand of q k^T as a plain [D, S] matrix per head."""
    return jnp.transpose(k, (0, 2, 3, 1))


def _queries_t(q):
    """[B, Q, K, G, D] -> [B, K, D, G, Q]."""
    return jnp.transpose(q, (0, 2, 4, 3, 1))


def _mask_t(qpos, kpos, qseg, kseg, window):
    """`attention_mask` transposed, [B, S, Q], built in that order (the rule is the same)."""
    qp, kp = qpos[:, None, :], kpos[:, :, None]
    mask = (kseg[:, :, None] == qseg[:, None, :]) & (kp <= qp)
    if window is not None:
        mask &= qp - kp < window
    return mask


def _chunk_bounds(pos, seg, c):
    """Per chunk of `c` columns, over the batch too: (min, max) position and (min, max) segment id, each [n]."""
    p, s = (_chunks(x, c).reshape(x.shape[1] // c, -1) for x in (pos, seg))
    return p.min(1), p.max(1), s.min(1), s.max(1)


def block_kinds(qpos, kpos, qseg, kseg, cq, ck, window):
    """[nq, nk] kind of each (query chunk, key chunk) pair, from chunk bounds: FULL (surely every key visible
    to every query: one segment, keys at or before every query, inside the window), PARTIAL (maybe some),
    EMPTY (none). The bounds are conservative: a PARTIAL pair is masked exactly, so any layout (packing,
    zig-zag) stays exact, and the plain causal case skips every empty pair."""
    qp0, qp1, qs0, qs1 = (x[:, None] for x in _chunk_bounds(qpos, qseg, cq))
    kp0, kp1, ks0, ks1 = (x[None] for x in _chunk_bounds(kpos, kseg, ck))
    maybe = (kp0 <= qp1) & (ks0 <= qs1) & (qs0 <= ks1)
    full = (kp1 <= qp0) & (qs0 == qs1) & (ks0 == ks1) & (ks0 == qs0)
    if window is not None:
        maybe &= qp0 - kp1 < window
        full &= qp1 - kp0 < window
    return jnp.where(full, FULL, jnp.where(maybe, PARTIAL, EMPTY))


def visit_order(kinds):
    """Per row of `kinds`: (order, n_full, n_partial): the column indices with the FULL ones first, then
    the PARTIAL ones (the EMPTY ones last, never visited), and how many of each."""
    order = jnp.argsort(kinds, axis=1, stable=True).astype(jnp.int32)
    return order, jnp.sum(kinds == FULL, 1, dtype=jnp.int32), jnp.sum(kinds == PARTIAL, 1, dtype=jnp.int32)


def block_schedule(qpos, kpos, qseg, kseg, cq, ck, window):
    """For each query chunk, the key blocks to visit: `visit_order` of `block_kinds`."""
    return visit_order(block_kinds(qpos, kpos, qseg, kseg, cq, ck, window))


def fwd_block(q, k, v, qpos, kpos, qseg, kseg, acc, *, chunk, window, q_chunk=None):
    """Fold one K/V block into the running (o, m, l) of every query; O(q_chunk x chunk) scores at a time.

    q [B,Q,K,G,D]; k, v [B,S,K,D]; acc = (o [B,Q,K,G,D] f32, m [B,K,G,Q] f32, l [B,K,G,Q] f32).
    Inside, queries are [B,K,G,cq,D] and keys [B,K,ck,D], so every matmul is a dot batched over (B, K)
    with its contraction on the minor dimension: XLA:CPU then needs no transpose per block. Each query
    chunk loops only over the key blocks `block_schedule` gives it, fully visible ones without a mask.
    """
    cq, ck = chunk_size(q.shape[1], q_chunk or chunk), chunk_size(k.shape[1], chunk)
    # Tie the mask inputs to q. Differentiating an enclosing scan (nn.scan over layers) makes JAX hoist
    # the loop-invariant part of its body, and the mask/where work below depends only on positions and
    # segment ids: hoisted through these nested loops it is materialised for every chunk pair,
    # [nq, nk, B, K, G, cq, ck] pred and f32 buffers, i.e. O(heads * L^2). The barrier makes it
    # depend on q, so it stays inside the loops.
    q, qpos, kpos, qseg, kseg = lax.optimization_barrier((q, qpos, kpos, qseg, kseg))
    q, s_scale = _scaled(q, q.shape[-1] ** -0.5)
    o, m, l = acc
    k_blocks, v_blocks = _chunks(_keys_t(k), ck, 3), _chunks(jnp.moveaxis(v, 1, 2), ck, 2)
    kpos_blocks, kseg_blocks = _chunks(kpos, ck), _chunks(kseg, ck)
    order, n_full, n_part = block_schedule(qpos, kpos, qseg, kseg, cq, ck, window)

    def q_step(_, xs):
        q_c, qpos_c, qseg_c, o_c, m_c, l_c, order_c, full_c, part_c = xs

        def fold(j, carry, masked):
            o_c, m_c, l_c = carry
            b = order_c[j]
            s = jnp.einsum("bkgqd,bkds->bkgqs", q_c, k_blocks[b], preferred_element_type=jnp.float32)
            if s_scale != 1.0:
                s = s * s_scale
            if masked:
                mask = attention_mask(qpos_c, kpos_blocks[b], qseg_c, kseg_blocks[b], window)[:, None, None]
                s = jnp.where(mask, s, NEG)
            m_new = jnp.maximum(m_c, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            corr = jnp.exp(m_c - m_new)
            v_c = v_blocks[b]
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32)
            return o_c * corr[..., None] + pv, m_new, l_c * corr + p.sum(-1)

        carry = lax.fori_loop(0, full_c, functools.partial(fold, masked=False), (o_c, m_c, l_c))
        return None, lax.fori_loop(full_c, full_c + part_c, functools.partial(fold, masked=True), carry)

    q_xs = (_chunks(_heads_first(q), cq, 3), _chunks(qpos, cq), _chunks(qseg, cq),
            _chunks(_heads_first(o), cq, 3), _chunks(m, cq, 3), _chunks(l, cq, 3), order, n_full, n_part)
    _, (o, m, l) = lax.scan(q_step, None, q_xs)
    return _heads_last(_unchunk(o, 3)), _unchunk(m, 3), _unchunk(l, 3)


def bwd_block(q, k, v, do, lse, delta, qpos, kpos, qseg, kseg, *, chunk, window, q_chunk=None):
    """Gradients from one K/V block: (dq [B,Q,K,G,D], dk [B,S,K,D], dv [B,S,K,D]), all f32.

    Works on transposed scores [B,K,ck,G,cq] (keys as rows) with q, dO and k also held transposed, so
    all five matmuls per block are plain [m,k] x [k,n] dots batched over (B, K): no per-block transpose
    of a [chunk, chunk] matrix, which XLA:CPU would otherwise copy before every dk/dv/dq dot. Each key
    chunk loops only over the query chunks that see it (`block_kinds`), fully visible ones unmasked.
    """
    cq, ck = chunk_size(q.shape[1], q_chunk or chunk), chunk_size(k.shape[1], chunk)
    q, qpos, kpos, qseg, kseg = lax.optimization_barrier((q, qpos, kpos, qseg, kseg))  # see fwd_block
    scale = q.shape[-1] ** -0.5
    q, s_scale = _scaled(q, scale)
    q_blocks, qt_blocks = _chunks(_heads_first(q), cq, 3), _chunks(_queries_t(q), cq, 4)
    do_blocks, dot_blocks = _chunks(_heads_first(do), cq, 3), _chunks(_queries_t(do), cq, 4)
    lse_blocks, delta_blocks = _chunks(lse, cq, 3), _chunks(delta, cq, 3)
    qpos_blocks, qseg_blocks = _chunks(qpos, cq), _chunks(qseg, cq)
    order, n_full, n_part = visit_order(block_kinds(qpos, kpos, qseg, kseg, cq, ck, window).T)

    def k_step(dqt, ys):
        k_c, kt_c, v_c, kpos_c, kseg_c, order_c, full_c, part_c = ys

        def fold(j, carry, masked):
            dk_c, dv_c, dqt = carry
            i = order_c[j]
            qt_c, do_c, dot_c = qt_blocks[i], do_blocks[i], dot_blocks[i]
            st = jnp.einsum("bksd,bkdgq->bksgq", k_c, qt_c, preferred_element_type=jnp.float32)
            if s_scale != 1.0:
                st = st * s_scale
            pt = jnp.exp(st - lse_blocks[i][:, :, None])
            if masked:
                mask = _mask_t(qpos_blocks[i], kpos_c, qseg_blocks[i], kseg_c, window)[:, None, :, None, :]
                pt = jnp.where(mask, pt, 0.0)  # [B,1,ck,1,cq]
            dv_c = dv_c + jnp.einsum("bksgq,bkgqd->bksd", pt.astype(do_c.dtype), do_c, preferred_element_type=jnp.float32)
            dpt = jnp.einsum("bksd,bkdgq->bksgq", v_c, dot_c, preferred_element_type=jnp.float32)
            dst = pt * (dpt - delta_blocks[i][:, :, None])
            if s_scale != 1.0:
                dst = dst * s_scale
            # dq = scale * ds k; dk = scale * ds^T q = ds^T (scale q), with q already scaled when f32.
            dqt_c = jnp.einsum("bkds,bksgq->bkdgq", kt_c, dst.astype(kt_c.dtype), preferred_element_type=jnp.float32)
            dk_c = dk_c + jnp.einsum("bksgq,bkgqd->bksd", dst.astype(q_blocks.dtype), q_blocks[i],
                                     preferred_element_type=jnp.float32)
            dqt = lax.dynamic_update_index_in_dim(dqt, dqt[i] + dqt_c, i, 0)
            return dk_c, dv_c, dqt

        zeros = jnp.zeros(k_c.shape, jnp.float32)
        carry = lax.fori_loop(0, full_c, functools.partial(fold, masked=False), (zeros, zeros, dqt))
        dk_c, dv_c, dqt = lax.fori_loop(full_c, full_c + part_c, functools.partial(fold, masked=True), carry)
        return dqt, (dk_c, dv_c)

    kv_xs = (_chunks(jnp.moveaxis(k, 1, 2), ck, 2), _chunks(_keys_t(k), ck, 3), _chunks(jnp.moveaxis(v, 1, 2), ck, 2),
             _chunks(kpos, ck), _chunks(kseg, ck), order, n_full, n_part)
    dqt, (dk, dv) = lax.scan(k_step, jnp.zeros(qt_blocks.shape, jnp.float32), kv_xs)
    dqt = _unchunk(dqt, 4)
    if s_scale == 1.0:
        dqt = dqt * scale
    return jnp.moveaxis(dqt, (1, 2, 3, 4), (2, 4, 3, 1)), jnp.moveaxis(_unchunk(dk, 2), 1, 2), jnp.moveaxis(_unchunk(dv, 2), 1, 2)


def init_acc(q):
    b, q_len, kv, g, _ = q.shape
    return jnp.zeros(q.shape, jnp.float32), jnp.full((b, kv, g, q_len), NEG, jnp.float32), jnp.zeros((b, kv, g, q_len), jnp.float32)


def finish(acc, dtype):
    o, m, l = acc
    l_safe = jnp.where(l == 0, 1.0, l)
    out = o / jnp.moveaxis(l_safe, -1, 1)[..., None]
    return out.astype(dtype), m + jnp.log(l_safe)


def softmax_delta(o, do):
    """rowsum(dO * O) per query and head: the softmax-backward correction, [B,K,G,Q]."""
    return jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1), 1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _blockwise(q, k, v, qpos, kpos, qseg, kseg, chunk, window, q_chunk):
    return _blockwise_fwd(q, k, v, qpos, kpos, qseg, kseg, chunk, window, q_chunk)[0]


def _blockwise_fwd(q, k, v, qpos, kpos, qseg, kseg, chunk, window, q_chunk):
    acc = fwd_block(q, k, v, qpos, kpos, qseg, kseg, init_acc(q), chunk=chunk, window=window, q_chunk=q_chunk)
    o, lse = finish(acc, q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _blockwise_bwd(chunk, window, q_chunk, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    dq, dk, dv = bwd_block(q, k, v, do, lse, softmax_delta(o, do), qpos, kpos, qseg, kseg, chunk=chunk, window=window,
                           q_chunk=q_chunk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_seg, k_seg, *, chunk=512, sliding_window=None,
                        q_chunk=None):
    """Memory-efficient attention, equal to `dense_attention` with the same mask. The forward takes
    queries `q_chunk` (default `chunk`) at a time; the backward uses `chunk` for both."""
    b, q_len, h, d = q_BxQxHxD.shape
    q = group_heads(q_BxQxHxD, k_BxSxKxD.shape[2])
    o = _blockwise(q, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_seg, k_seg, chunk, sliding_window, q_chunk)
    return o.reshape(b, q_len, h, d)
