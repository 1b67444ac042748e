"""Rotary position embeddings and every context-extension variant, as pure functions.

`frequencies(scaling, ...)` returns `(inv_freq[d/2], attention_scale)` with `d = int(head_dim *
partial_rotary_factor)`, numerically equal to `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`
(5.x). The attention scale multiplies both cos and sin, as in HF, so q.k logits scale by its square.

LongRoPE switching rule (the same as HF): the long factors apply when `seq_len >
original_max_position_embeddings`, where `seq_len = max(positions) + 1` of the forward pass; at
`seq_len == original_max_position_embeddings` the short factors still apply. `seq_len=None` means short.

Everything is jnp, so LongRoPE factors, `start_tokens` and `seq_len` may be traced arrays: build a
`RopeScaling` inside a jitted function with `dataclasses.replace(scaling, long_factor=lam)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")

# Keys each type needs and may take in a HF dict (besides rope_type/type, rope_theta and
# partial_rotary_factor, which every type may carry).
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "ntk": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
_OPTIONAL = {
    "default": (),
    "linear": (),
    "ntk": (),
    # HF accepts and ignores it for dynamic (it scales against max_position_embeddings).
    "dynamic": ("original_max_position_embeddings",),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": (),
    "longrope": ("factor", "attention_factor", "start_tokens"),
}
_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_LEGACY_TYPES = {"su": "longrope"}  # Phi-3's first name for LongRoPE

# n̂ values of LongRoPE's search space (paper, Table 4).
START_TOKEN_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _err(key: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"rope_scaling.{key}: expected {expected}, got {got!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One RoPE variant and its parameters. Hashable, so it can be a static jit argument.

    Types:
      default   plain RoPE.
      linear    Position Interpolation: inv_freq / factor.
      ntk       static NTK-aware: base * factor**(d/(d-2)). HF has no such type; `to_hf` exports it as
                `rope_type: default` with the scaled `rope_theta` (needs `rope_theta` and `head_dim`),
                so it is the one type that does not round-trip through HF.
      dynamic   dynamic NTK: the NTK base grows with seq_len beyond max_position_embeddings.
      yarn      NTK-by-parts ramp between beta_fast and beta_slow plus attention temperature.
      llama3    Llama-3.1 wavelength-banded interpolation.
      longrope  per-pair factors (short below/at, long above original_max_position_embeddings);
                `start_tokens` (LongRoPE's n̂) keeps positions below it at the original angles.
    """

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # longrope
    short_factor: Any = None  # tuple[float, ...] or a (traced) array
    long_factor: Any = None
    start_tokens: Any = 0  # int or a (traced) scalar
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        t = self.rope_type
        if t not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type: unknown type {t!r}; expected one of {ROPE_TYPES}")
        set_ = object.__setattr__
        for key in _REQUIRED[t]:
            if getattr(self, key) is None:
                raise ValueError(f"rope_scaling.{key}: required for rope_type {t!r} but missing")
        allowed = set(_REQUIRED[t]) | set(_OPTIONAL[t]) | {"partial_rotary_factor"}
        for f in dataclasses.fields(self):
            if f.name in allowed or f.name == "rope_type":
                continue
            if getattr(self, f.name) != f.default:
                raise ValueError(
                    f"rope_scaling.{f.name}: not a parameter of rope_type {t!r}; "
                    f"expected only {sorted(allowed)}"
                )
        for key in ("short_factor", "long_factor"):
            v = getattr(self, key)
            if v is None or _is_traced(v):
                continue
            arr = np.asarray(v, dtype=np.float64)
            if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise _err(key, "a 1-D list of finite positive numbers", v)
            set_(self, key, tuple(float(x) for x in arr))
        if self.factor is not None:
            if not isinstance(self.factor, (int, float)) or self.factor < 1:
                raise _err("factor", "a number >= 1", self.factor)
            set_(self, "factor", float(self.factor))
        if self.attention_factor is not None:
            if not isinstance(self.attention_factor, (int, float)) or self.attention_factor < 0:
                raise _err("attention_factor", "a number >= 0", self.attention_factor)
            set_(self, "attention_factor", float(self.attention_factor))
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor"):
            v = getattr(self, key)
            if v is not None:
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise _err(key, "a number", v)
                set_(self, key, float(v))
        if (self.beta_fast or 32.0) < (self.beta_slow or 1.0):
            raise _err("beta_fast", f">= beta_slow ({self.beta_slow or 1.0})", self.beta_fast)
        if t == "llama3" and self.low_freq_factor >= self.high_freq_factor:
            raise _err("low_freq_factor", f"< high_freq_factor ({self.high_freq_factor})", self.low_freq_factor)
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise _err("truncate", "true or false", self.truncate)
        lo = self.original_max_position_embeddings
        if lo is not None:
            if isinstance(lo, bool) or not isinstance(lo, (int, float)) or lo != int(lo) or lo < 1:
                raise _err("original_max_position_embeddings", "a positive integer", lo)
            set_(self, "original_max_position_embeddings", int(lo))
        n = self.start_tokens
        if not _is_traced(n) and not isinstance(n, jax.Array):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise _err("start_tokens", "an integer >= 0", n)
            set_(self, "start_tokens", int(n))
        p = self.partial_rotary_factor
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise _err("partial_rotary_factor", "a number in (0, 1]", p)
        set_(self, "partial_rotary_factor", float(p))

    # ---- HF mapping ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict | None) -> "RopeScaling":
        """From a HF `rope_scaling` / `rope_parameters` dict (`type` is an alias; None is default).

        `rope_theta` may be present and is ignored here (it belongs to the model config).
        """
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"rope_scaling: expected a dict or None, got {type(d).__name__}")
        t = d.get("rope_type", d.get("type", "default"))
        if "rope_type" in d and "type" in d and d["type"] != d["rope_type"]:
            if _LEGACY_TYPES.get(d["type"], d["type"]) != t:
                raise ValueError(f"rope_scaling: 'type' ({d['type']!r}) and 'rope_type' ({t!r}) disagree")
        t = _LEGACY_TYPES.get(t, t)
        if t not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type: unknown type {t!r}; expected one of {ROPE_TYPES}")
        allowed = set(_REQUIRED[t]) | set(_OPTIONAL[t]) | set(_COMMON)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(
                f"rope_scaling: unknown key(s) {unknown} for rope_type {t!r}; expected only {sorted(allowed)}"
            )
        missing = [k for k in _REQUIRED[t] if d.get(k) is None]
        if missing:
            raise ValueError(f"rope_scaling.{missing[0]}: required for rope_type {t!r} but missing")
        kw = {k: v for k, v in d.items() if k not in _COMMON and v is not None}
        if t == "dynamic":
            kw.pop("original_max_position_embeddings", None)
        if d.get("partial_rotary_factor") is not None:
            kw["partial_rotary_factor"] = d["partial_rotary_factor"]
        return cls(rope_type=t, **kw)

    def to_hf(self, *, rope_theta: float | None = None, head_dim: int | None = None) -> dict | None:
        """The `rope_scaling` dict `transformers` understands (None for default).

        `ntk` becomes `{"rope_type": "default", "rope_theta": base * factor**(d/(d-2))}`, so it needs
        `rope_theta` and `head_dim`. `start_tokens` is written only when nonzero; transformers warns
        about the key and ignores it (it has no start-token path).
        """
        if self.rope_type == "default" and self.partial_rotary_factor == 1.0:
            return None
        if self.rope_type == "ntk":
            if rope_theta is None or head_dim is None:
                raise ValueError("rope_scaling: exporting rope_type 'ntk' needs rope_theta and head_dim")
            out = {"rope_type": "default", "rope_theta": float(ntk_theta(self, head_dim=head_dim, theta=rope_theta))}
        else:
            out = {"rope_type": self.rope_type}
            for key in _REQUIRED[self.rope_type] + _OPTIONAL[self.rope_type]:
                v = getattr(self, key)
                if key == "start_tokens" and not v:
                    continue
                if v is not None:
                    out[key] = list(v) if isinstance(v, tuple) else v
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    # ---- what each type implies: every caller asks here, none lists types itself ----

    @property
    def depends_on_length(self) -> bool:
        """Whether the frequencies follow the forward pass's longest position (dynamic NTK, LongRoPE)."""
        return self.rope_type in ("dynamic", "longrope")

    @property
    def fixed_factor(self) -> float | None:
        """The extension factor the frequencies are built for; None where no fixed range applies
        (default RoPE, dynamic NTK, LongRoPE without a `factor`)."""
        return None if self.rope_type in ("default", "dynamic") else self.factor

    def frequencies_change(self, pos, max_position_embeddings: int):
        """Traced bool: does a forward pass reaching position `pos` use other frequencies than one
        reaching `pos - 1`? None when they never change. LongRoPE switches once, past its original
        length; dynamic NTK grows its base at every position past `max_position_embeddings`."""
        if self.rope_type == "longrope":
            return use_long_factors(self, pos + 1) & ~use_long_factors(self, pos)
        if self.rope_type == "dynamic":
            return pos + 1 > max_position_embeddings
        return None

    def validate(self, head_dim: int) -> None:
        """Checks that need the head size: even rotary dim and LongRoPE factor lengths."""
        d = self.rotary_dim(head_dim)
        if d < 2 or d % 2:
            raise ValueError(
                f"rope_scaling.partial_rotary_factor: head_dim {head_dim} x {self.partial_rotary_factor} "
                f"gives rotary dim {d}; expected an even number >= 2"
            )
        for key in ("short_factor", "long_factor"):
            v = getattr(self, key)
            if v is not None and np.shape(v)[-1] != d // 2:
                raise ValueError(
                    f"rope_scaling.{key}: has {np.shape(v)[-1]} values; expected rotary_dim/2 = {d // 2} "
                    f"(head_dim {head_dim} x partial_rotary_factor {self.partial_rotary_factor} / 2)"
                )


# ---- frequencies ------------------------------------------------------------------------------
# Static parts are computed in numpy with torch's rounding: float32 element-wise ops, but
# `python_float ** float32_tensor` evaluated in float64 and rounded once. That keeps us within a few
# ulp of transformers even where float32 cancellation amplifies differences (llama3's smooth band).

_f32 = np.float32


def _exponents(d: int) -> np.ndarray:
    # HF: arange(0, d, 2, int64).float() / d, in float32.
    return np.arange(0, d, 2).astype(_f32) / _f32(d)


def _pow(theta: float, d: int) -> np.ndarray:
    """theta ** (2i/d), float32, rounded from float64 as torch does for a Python-scalar base."""
    return (np.float64(theta) ** _exponents(d).astype(np.float64)).astype(_f32)


def default_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0) -> jax.Array:
    """Plain RoPE: 1 / theta**(2i/d), i < d/2."""
    return jnp.asarray(_f32(1.0) / _pow(theta, int(head_dim * partial_rotary_factor)))


def ntk_theta(scaling: RopeScaling, *, head_dim: int, theta: float) -> float:
    """Static NTK-aware base: theta * factor**(d/(d-2))."""
    d = scaling.rotary_dim(head_dim)
    return theta * scaling.factor ** (d / (d - 2))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(s: RopeScaling, d: int, theta: float, max_pos: int):
    lo = s.original_max_position_embeddings
    factor = s.factor if s.factor is not None else max_pos / lo
    att = s.attention_factor
    if att is None:
        if s.mscale and s.mscale_all_dim:
            att = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            att = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # pair index with `rotations` turns over lo
        return d * math.log(lo / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=_f32) - _f32(low)) / _f32(high - low), 0, 1)
    keep = _f32(1) - ramp  # 1 = extrapolate (original), 0 = interpolate (/factor)
    pos_freqs = _pow(theta, d)
    inv = (_f32(1) / (_f32(factor) * pos_freqs)) * (_f32(1) - keep) + (_f32(1) / pos_freqs) * keep
    return jnp.asarray(inv), float(att)


def _llama3(s: RopeScaling, d: int, theta: float):
    inv = _f32(1) / _pow(theta, d)
    lo, low, high, factor = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor, _f32(s.factor)
    wl = _f32(2 * math.pi) / inv
    scaled = np.where(wl > lo / low, inv / factor, inv)
    smooth = (_f32(lo) / wl - _f32(low)) / _f32(high - low)
    smoothed = (_f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wl < lo / high) & ~(wl > lo / low)
    return jnp.asarray(np.where(medium, smoothed, scaled)), 1.0


def longrope_attention_scale(s: RopeScaling, max_position_embeddings: int) -> float:
    """`attention_factor`, else sqrt(1 + ln(factor)/ln(original)) (LongRoPE's "su" policy)."""
    if s.attention_factor is not None:
        return s.attention_factor
    lo = s.original_max_position_embeddings
    factor = s.factor if s.factor is not None else max_position_embeddings / lo
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(lo))


def use_long_factors(scaling: RopeScaling, seq_len):
    """True (possibly traced) when LongRoPE uses its long factors: seq_len > original length."""
    if seq_len is None:
        return False
    return seq_len > scaling.original_max_position_embeddings


def _dynamic(s: RopeScaling, d: int, theta: float, max_pos: int, seq_len):
    f = s.factor
    if seq_len is None or not (_is_traced(seq_len) or isinstance(seq_len, jax.Array)):
        n = max_pos if seq_len is None else max(int(seq_len), max_pos)
        base = theta * ((f * n / max_pos) - (f - 1)) ** (d / (d - 2))
        return jnp.asarray(_f32(1) / _pow(base, d))
    # Traced length: float32 throughout (a few ulp from HF's float64 base).
    n = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_pos)
    base = theta * ((f * n / max_pos) - (f - 1)) ** (d / (d - 2))
    return 1.0 / (base ** jnp.asarray(_exponents(d)))


def frequencies(
    scaling: RopeScaling,
    *,
    head_dim: int,
    theta: float,
    max_position_embeddings: int,
    seq_len=None,
) -> tuple[jax.Array, float]:
    """(inv_freq[rotary_dim/2] float32, attention_scale) for `scaling` at `seq_len`.

    `seq_len` only matters for `dynamic` (grows the base past max_position_embeddings) and
    `longrope` (long factors when seq_len > original_max_position_embeddings). It may be traced, and an
    array of lengths [..., 1] gives per-token frequencies [..., rotary_dim/2].
    """
    scaling.validate(head_dim)
    d = scaling.rotary_dim(head_dim)
    t = scaling.rope_type
    if t == "default":
        return default_inv_freq(head_dim, theta, scaling.partial_rotary_factor), 1.0
    if t == "linear":
        return jnp.asarray(_f32(1) / _pow(theta, d) / _f32(scaling.factor)), 1.0
    if t == "ntk":
        return jnp.asarray(_f32(1) / _pow(ntk_theta(scaling, head_dim=head_dim, theta=theta), d)), 1.0
    if t == "dynamic":
        return _dynamic(scaling, d, theta, max_position_embeddings, seq_len), 1.0
    if t == "yarn":
        return _yarn(scaling, d, theta, max_position_embeddings)
    if t == "llama3":
        return _llama3(scaling, d, theta)
    # longrope: factors may be traced, so the select and the division are jnp.
    att = longrope_attention_scale(scaling, max_position_embeddings)
    long_now = use_long_factors(scaling, seq_len)
    if _is_traced(long_now) or isinstance(long_now, jax.Array):
        ext = jnp.where(long_now, jnp.asarray(scaling.long_factor, jnp.float32), jnp.asarray(scaling.short_factor, jnp.float32))
    else:
        ext = jnp.asarray(scaling.long_factor if long_now else scaling.short_factor, jnp.float32)
    return 1.0 / (ext * jnp.asarray(_pow(theta, d))), att


# ---- cos / sin and rotation ---------------------------------------------------------------------


def cos_sin(
    positions: jax.Array,
    inv_freq: jax.Array,
    attention_scale: float | jax.Array = 1.0,
    start_tokens: int | jax.Array = 0,
    original_inv_freq: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin, shape `positions.shape + (rotary_dim,)`, float32, in HF's rotate_half layout.

    Positions below `start_tokens` (LongRoPE's n̂) use `original_inv_freq` and no attention scale,
    as microsoft/LongRoPE's start-token embedding pastes the original cos/sin there.
    """
    pos = jnp.asarray(positions).astype(jnp.float32)[..., None]
    angles = pos * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(emb) * attention_scale, jnp.sin(emb) * attention_scale
    if isinstance(start_tokens, int) and start_tokens == 0:
        return cos, sin
    if original_inv_freq is None:
        raise ValueError("cos_sin: start_tokens needs original_inv_freq (the unscaled frequencies)")
    orig = pos * original_inv_freq
    orig = jnp.concatenate([orig, orig], axis=-1)
    early = pos < start_tokens
    return jnp.where(early, jnp.cos(orig), cos), jnp.where(early, jnp.sin(orig), sin)


def document_lengths(positions_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """Per token, 1 + the largest position of its packed document (its row's tokens with its segment id):
    HF's seq_len rule applied to each document. The layout may be any permutation of the row (zig-zag).
    Segment ids are taken as 0..L, as packing makes them (larger ones share slot L)."""
    length = positions_BxL.shape[-1]
    seg = jnp.clip(segment_ids_BxL, 0, length)
    top = jax.vmap(lambda s, p: jnp.zeros(length + 1, jnp.int32).at[s].max(p))(seg, positions_BxL.astype(jnp.int32))
    return jnp.take_along_axis(top, seg, axis=-1) + 1


def rope_cos_sin(
    scaling: RopeScaling,
    positions: jax.Array,
    *,
    head_dim: int,
    theta: float,
    max_position_embeddings: int,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin for a forward pass over `positions` [B, L]; seq_len = max(positions) + 1, as HF does.

    With `segment_ids` (LongRoPE2's mixed context window) seq_len is each packed document's own
    (`document_lengths`): a short document keeps the short factors next to a long one in the same row.
    """
    seq_len = None
    if scaling.depends_on_length:
        seq_len = jnp.max(positions) + 1
        if segment_ids is not None:  # [B, L, 1]: per-token frequencies [B, L, d/2]
            seq_len = document_lengths(jnp.asarray(positions), jnp.asarray(segment_ids))[..., None]
    inv, att = frequencies(
        scaling, head_dim=head_dim, theta=theta, max_position_embeddings=max_position_embeddings, seq_len=seq_len
    )
    orig = None
    if scaling.rope_type == "longrope" and not (isinstance(scaling.start_tokens, int) and scaling.start_tokens == 0):
        orig = default_inv_freq(head_dim, theta, scaling.partial_rotary_factor)
    return cos_sin(positions, inv, att, start_tokens=scaling.start_tokens, original_inv_freq=orig)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x[..., L, H, D]` by cos/sin `[..., L, d]` (broadcast over heads), HF rotate_half layout.

    With a partial rotary dim (d < D) only the first d features rotate; the rest pass through.
    Computed in float32 and cast back to x's dtype.
    """
    d = cos.shape[-1]
    cos, sin = cos[..., None, :], sin[..., None, :]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :d], xf[..., d:]
    out = rot * cos + rotate_half(rot) * sin
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)
