"""Attention memory and time (forward + backward) for dense, blockwise and ring, on 8 CPU devices.

Every measurement runs in a fresh subprocess. Peak memory is the kernel's own accounting of the
process: the resident high-water mark (VmHWM) is reset right before the compiled step runs (after
inputs exist and compilation is done) and read after it, minus the resident size at the reset. XLA's
compiled-program accounting (`memory_analysis`: arguments + outputs + temporaries, per device) is
reported too. Configs whose XLA footprint exceeds --budget-gib are compiled but not run
("projected").

    python benchmarks/attention.py memory [--lengths 4096,8192,16384,32768,65536]
    python benchmarks/attention.py zigzag [--length 16384]
    python benchmarks/attention.py model [--length 65536]
    python benchmarks/attention.py peak [--length 16384 --chunk 128]

`peak`: forward + backward of the same layer on one CPU device, with the C++ kernel (`flash`, what the
model runs there) and XLA blockwise attention, against this machine's measured fp32 matmul rate (best
of jax and torch on 4096^3), with torch SDPA (causal, GQA) on the same tensors alongside; FLOPs are the causal 3 * 4 * L^2 * H * D / 2 (forward and backward matmuls, no
recomputation counted).

Each line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the resident high-water mark; return the resident size now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _peak_growth(base: int) -> int:
    return _status("VmHWM") - base


def _setup():
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.devices()
    return jax


def _mesh(jax, seq):
    return jax.make_mesh((1, 8 // seq, seq, 1), ("data", "fsdp", "seq", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _xla_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _time(fn, *args, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        _block(out)
        best = min(best, time.perf_counter() - start)
    return best


def _block(out):
    import jax

    jax.block_until_ready(out)


def one_attention(impl: str, length: int, chunk: int, budget: float, zigzag: bool) -> dict:
    jax = _setup()
    import jax.numpy as jnp

    from longrope_jax import attention as attn
    from longrope_jax.sharding.rules import DEFAULT_RULES

    b = 1
    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, length, HEADS, HEAD_DIM), jnp.float32)
    k = jax.random.normal(kk, (b, length, KV_HEADS, HEAD_DIM), jnp.float32)
    v = jax.random.normal(kv, (b, length, KV_HEADS, HEAD_DIM), jnp.float32)
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    seg = jnp.ones((b, length), jnp.int32)
    mesh = _mesh(jax, 8)
    shards = mesh.shape["seq"]
    if impl == "ring" and zigzag:
        pos = attn.zigzag(pos, shards)  # positions travel with the (reordered) tokens

    def attend(q, k, v):
        if impl == "dense":
            return attn.dense_attention(q, k, v, attn.attention_mask(pos, pos, seg, seg))
        if impl == "blockwise":
            return attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=chunk)
        return attn.ring_attention(q, k, v, pos, seg, mesh=mesh, rules=DEFAULT_RULES, chunk=chunk)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    xla = _xla_bytes(compiled)
    row = {"bench": "attention_memory", "impl": impl, "length": length, "chunk": chunk, "heads": HEADS,
           "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "devices": 8 if impl == "ring" else 1,
           "xla_bytes": xla, "zigzag": zigzag if impl == "ring" else None}
    if xla is not None and xla > budget * 2**30:
        return {**row, "ran": False, "note": f"projected {xla / 2**30:.1f} GiB > budget {budget} GiB"}
    short = length <= 16384  # long runs take minutes: one timed run, no warm-up
    if short:
        compiled(q, k, v)  # warm up allocator pools outside the measurement
    base = _reset_peak()
    row["fwd_bwd_s"] = round(_time(compiled, q, k, v, repeats=2 if short else 1), 3)
    row["peak_rss_growth_bytes"] = _peak_growth(base)
    return {**row, "ran": True}


def one_model(length: int, attention: str, chunk: int) -> dict:
    """Forward + backward of a tiny byte-level LLaMA at `length` tokens under the 8-device mesh."""
    jax = _setup()
    import jax.numpy as jnp

    from longrope_jax.model import Llama, LlamaConfig, init_params

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
                         attention=attention, attention_chunk=chunk, remat_policy="full")
    mesh = _mesh(jax, 8)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, length), 0, 256)

    def loss(p):
        logits = Llama(config, mesh=mesh).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params).compile()
    base = _reset_peak()
    seconds = _time(compiled, params, repeats=1)
    return {"bench": "model_fwd_bwd", "attention": attention, "length": length, "params": "tiny byte-level (2x128)",
            "fwd_bwd_s": round(seconds, 2), "peak_rss_growth_bytes": _peak_growth(base),
            "peak_rss_bytes": _status("VmHWM"), "xla_bytes": _xla_bytes(compiled)}


def one_peak(length: int, chunk: int) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from longrope_jax import attention as attn

    n = 4096
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ta = torch.ones(n, n)
    ta @ ta
    jax_mm = _time(lambda x: mm(x), a, repeats=3)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        ta @ ta
        best = min(best, time.perf_counter() - start)
    peak = 2 * n**3 / min(jax_mm, best)

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, length, HEADS, HEAD_DIM), np.float32)
    k = rng.standard_normal((1, length, KV_HEADS, HEAD_DIM), np.float32)
    v = rng.standard_normal((1, length, KV_HEADS, HEAD_DIM), np.float32)
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    seg = jnp.ones((1, length), jnp.int32)

    def step_of(attend):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, pos, pos, seg, seg) ** 2), argnums=(0, 1, 2)))

    steps = {"flash": step_of(attn.flash_attention),
             "blockwise": step_of(lambda *a: attn.blockwise_attention(*a, chunk=chunk))}
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    for step in steps.values():
        _block(step(jq, jk, jv))
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, k, v))

    def torch_step():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        (o**2).sum().backward()

    torch_step()
    best = {name: float("inf") for name in (*steps, "torch")}
    for _ in range(2):  # alternate, best of two each
        for name, step in steps.items():
            best[name] = min(best[name], _time(step, jq, jk, jv, repeats=1))
        start = time.perf_counter()
        torch_step()
        best["torch"] = min(best["torch"], time.perf_counter() - start)
    flops = 3 * 4 * length**2 * HEADS * HEAD_DIM / 2
    out = {"bench": "attention_peak", "length": length, "chunk": chunk, "heads": HEADS, "kv_heads": KV_HEADS,
           "head_dim": HEAD_DIM, "peak_matmul_gflops": round(peak / 1e9, 1)}
    for name, s in best.items():
        out[f"{name}_fwd_bwd_s"] = round(s, 3)
        out[f"{name}_fraction_of_peak"] = round(flops / s / peak, 3)
        if name != "torch":
            out[f"{name}_speedup_vs_torch"] = round(best["torch"] / s, 2)
    return out


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "args": args}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["memory", "zigzag", "model", "peak", "_child"])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--impls", default="dense,blockwise,ring")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--budget-gib", type=float, default=12.0)
    ap.add_argument("--impl", default=None)
    ap.add_argument("--zigzag", type=int, default=1)
    args = ap.parse_args()

    if args.what == "_child":
        if args.impl == "peak":
            print(json.dumps(one_peak(args.length, args.chunk)))
        elif args.impl == "model":
            print(json.dumps(one_model(args.length, "ring", args.chunk)))
        else:
            print(json.dumps(one_attention(args.impl, args.length, args.chunk, args.budget_gib, bool(args.zigzag))))
        return
    if args.what == "memory":
        for impl in args.impls.split(","):
            for length in map(int, args.lengths.split(",")):
                row = _child(["--impl", impl, "--length", str(length), "--chunk", str(args.chunk),
                              "--budget-gib", str(args.budget_gib)])
                print(json.dumps(row), flush=True)
    elif args.what == "zigzag":
        from longrope_jax.attention import causal_blocks_per_device, causal_critical_path

        length = args.length or 16384
        for zz in (0, 1):
            row = _child(["--impl", "ring", "--length", str(length), "--chunk", str(args.chunk), "--zigzag", str(zz)])
            work = causal_blocks_per_device(length, 8, balanced=bool(zz), chunk=args.chunk)
            row.update(bench="ring_layout", layout="zigzag" if zz else "contiguous",
                       blocks_per_device=work.tolist(), work_max_over_min=round(float(work.max() / work.min()), 3),
                       critical_path_blocks=causal_critical_path(length, 8, bool(zz), args.chunk))
            print(json.dumps(row), flush=True)
    elif args.what == "peak":
        print(json.dumps(_child(["--impl", "peak", "--length", str(args.length or 16384), "--chunk", str(args.chunk)])))
    else:
        print(json.dumps(_child(["--impl", "model", "--length", str(args.length or 65536), "--chunk", str(args.chunk)])))


if __name__ == "__main__":
    main()
