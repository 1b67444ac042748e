"""The C++ CPU flash-attention kernel against the dense reference (outputs and dQ/dK/dV): grouped
heads, packed documents, sliding windows, permuted positions, blocks that straddle documents, queries
that are a suffix of the keys; its input checks, its build, and the model's choice of it; `materialize`
and the model's single cos/sin."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attn
from longrope_jax.attention import cpu_build, cpu_kernel
from tests.attention.inputs import RTOL, assert_same_as_dense, packed_inputs, rel

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason=f"CPU kernel: {cpu_build.unavailable()}")


def flash(pos, seg, window=None):
    return lambda q, k, v: attn.flash_attention(q, k, v, pos, pos, seg, seg, sliding_window=window)


@pytest.fixture(params=[(128, 128, 128, 128), (16, 32, 32, 16)], ids=["default-blocks", "small-blocks"])
def blocks(request, monkeypatch):
    """Block sizes are read when a call is traced; small ones put many blocks, partial and skipped ones,
    into short test sequences."""
    for name, value in zip(("BLOCK_Q", "BLOCK_K", "BWD_BLOCK_Q", "BWD_BLOCK_K"), request.param):
        monkeypatch.setattr(cpu_kernel, name, value)


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("d", [16, 32, 64])
def test_flash_equals_dense(kv, d, blocks):
    q, k, v, do, pos, seg = packed_inputs(kv=kv, d=d, length=160, docs=(100, 60))
    assert_same_as_dense(flash(pos, seg), q, k, v, do, pos, seg)


@pytest.mark.parametrize("window", [2, 12, 50])  # 1: one key a query, dq is rounding noise
def test_flash_sliding_window_equals_dense(window, blocks):
    q, k, v, do, pos, seg = packed_inputs(length=96, docs=(70, 26))
    assert_same_as_dense(flash(pos, seg, window), q, k, v, do, pos, seg, window=window)


def test_flash_with_permuted_positions_equals_dense(blocks):
    # Tokens in any order (as the zig-zag ring layout moves them): causality follows positions, and a
    # block's bounds only decide what is skipped, never what is masked.
    q, k, v, do, pos, seg = packed_inputs(length=128, docs=(128,))
    order = np.random.default_rng(1).permutation(128)
    pos, seg = pos[:, order], seg[:, order]
    assert_same_as_dense(flash(pos, seg), q, k, v, do, pos, seg)


def test_flash_queries_at_the_end_of_the_keys_equal_dense(blocks):
    # A chunked prefill: 48 new queries (positions 80..127) against all 128 keys.
    q, k, v, do, pos, seg = packed_inputs(length=128, docs=(128,))
    q, do = q[:, 80:], do[:, 80:]
    fn = lambda q, k, v: attn.flash_attention(q, k, v, pos[:, 80:], pos, seg[:, 80:], seg)
    ref = lambda q, k, v: attn.dense_attention(q, k, v, attn.attention_mask(pos[:, 80:], pos, seg[:, 80:], seg))
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    want, want_vjp = jax.vjp(jax.jit(ref), q, k, v)
    assert rel(out, want) < RTOL
    for g, r in zip(vjp(do), want_vjp(do)):
        assert rel(g, r) < RTOL


def test_flash_inside_a_differentiated_scan_equals_dense():
    # The model scans layers (nn.scan) and differentiates through the scan: the custom call's VJP there.
    q, k, v, do, pos, seg = packed_inputs(length=64, docs=(40, 24))

    def stack(attend, q):
        def layer(x, _):
            return attend(x, k, v) * 0.5 + x, None
        return jax.lax.scan(layer, q, None, length=3)[0]

    got = jax.jit(jax.grad(lambda q: jnp.sum(stack(flash(pos, seg), q) * do)))(q)
    dense = lambda q, k, v: attn.dense_attention(q, k, v, attn.attention_mask(pos, pos, seg, seg))
    want = jax.jit(jax.grad(lambda q: jnp.sum(stack(dense, q) * do)))(q)
    assert rel(got, want) < RTOL


@pytest.mark.parametrize("change, message", [
    (lambda q, k: (q.astype(jnp.bfloat16), k), "float32 q and k"),
    (lambda q, k: (q[..., :8], k[..., :8]), "multiple of 16 in \\[16, 256\\], got 8"),
    (lambda q, k: (q[:, :40], k), "multiples of 16, got 40 and 64"),
    (lambda q, k: (q[:, :, :3], k), "query heads \\(3\\) to be a multiple of kv heads \\(2\\)"),
])
def test_flash_rejects_what_it_does_not_take(change, message):
    q, k, v, _, pos, seg = packed_inputs(length=64, docs=(64,))
    q, k = change(q, k)
    assert not cpu_kernel.supports(q, k)
    with pytest.raises(ValueError, match=f"^flash_attention: expected .*{message}"):
        attn.flash_attention(q, k, v[..., :k.shape[-1]], pos[:, :q.shape[1]], pos, seg[:, :q.shape[1]], seg)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LONGROPE_JAX_CPU_KERNEL", "0")
    q, k, *_ = packed_inputs(length=64, docs=(64,))
    assert cpu_build.unavailable() == "turned off by LONGROPE_JAX_CPU_KERNEL=0"
    assert not cpu_kernel.supports(q, k)


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="flash_cpu: no C\\+\\+ compiler"):
        cpu_build.build(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fake compiler error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    out = tmp_path / "kernels"
    with pytest.raises(RuntimeError, match="fake compiler error"):
        cpu_build.build(out)
    assert not list(out.iterdir())


def test_the_built_library_is_reused():
    first = cpu_build.build()
    assert first.exists() and cpu_build.build() == first


def test_the_model_attends_with_the_kernel_on_cpu(monkeypatch):
    # The model's output with the kernel equals its output with XLA's attention (the kernel turned off).
    from longrope_jax.model import Llama, LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 64)
    calls = []
    real = cpu_kernel.flash_attention
    monkeypatch.setattr(attn, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss = lambda p: jnp.mean(Llama(cfg).apply({"params": p}, tokens) ** 2)
    got, got_grad = jax.value_and_grad(loss)(params)
    assert calls
    monkeypatch.setattr(cpu_kernel, "supports", lambda q, k: False)
    want, want_grad = jax.value_and_grad(loss)(params)
    assert rel(got, want) < 1e-5
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        assert rel(g, w) < 1e-4


def test_materialize_is_the_identity_under_jit_grad_and_vmap():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    f = jax.jit(lambda x: cpu_kernel.materialize(jnp.sin(x)) * 2)
    np.testing.assert_array_equal(f(x), jax.jit(lambda x: jnp.sin(x) * 2)(x))
    np.testing.assert_allclose(jax.grad(lambda x: f(x).sum())(x), 2 * jnp.cos(x), rtol=1e-6)
    np.testing.assert_array_equal(jax.vmap(cpu_kernel.materialize)(x), x)
    ints = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    np.testing.assert_array_equal(cpu_kernel.materialize(ints), ints)


def test_materialize_without_the_library_is_x_itself(monkeypatch):
    monkeypatch.setenv("LONGROPE_JAX_CPU_KERNEL", "0")
    x = jnp.arange(6.0)
    assert cpu_kernel.materialize(x) is x


def test_the_model_evaluates_rope_cos_sin_once_on_cpu(monkeypatch):
    # Without `materialize`, XLA:CPU fuses cos/sin into every rotary consumer (q and k, forward and
    # backward, of every layer), each evaluating them once per head.
    from longrope_jax.model import Llama, LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 64), jnp.int32)

    def cosines():  # a fresh jit each time: the patch below changes what is traced
        grad = jax.jit(jax.grad(lambda p: jnp.mean(Llama(cfg).apply({"params": p}, tokens) ** 2)))
        return grad.lower(params).compile().as_text().count(" cosine(")

    assert cosines() == 1
    monkeypatch.setattr(cpu_kernel, "materialize", lambda x: x)
    assert cosines() > cfg.num_hidden_layers  # what it prevents


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path, caplog):
    fake = tmp_path / "bin" / "c++"  # writes its -o file: the fallback is what is tested, not the compiler
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a; do [ "$prev" = "-o" ] && echo built > "$a"; prev=$a; done\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("LONGROPE_JAX_CACHE", str(blocked))
    monkeypatch.setattr(cpu_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = cpu_build.build()
    assert lib.parent == tmp_path / "tmp" / f"longrope_jax-{os.getuid()}" / "kernels" and lib.read_text() == "built\n"
    assert blocked.read_text() == "not a directory"
    assert "cannot be written" in caplog.text and str(blocked) in caplog.text
