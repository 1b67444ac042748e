"""LongRoPE's search space and evolution operators (paper §3.2, Table 4 and Algorithm 1).

A candidate is an int array `[n, k_0, ..., k_{d/2-1}]`. `k_i` indexes the factor grid, so
`λ_i = min_factor + step * k_i` with `0 <= k_i <= space.top`; `n` indexes `START_TOKEN_CHOICES` (it
stays 0 when n̂ is not searched). Integers make deduplication exact (no float tolerance) and keep every
gene on the grid by construction. A valid candidate has non-decreasing `k` (λ grows toward low
frequencies); the operators only ever return valid candidates, so violators are never evaluated.

Seeds (PI, NTK, YaRN) are computed from `rope.frequencies`, not re-derived: λ_i = inv_i / inv'_i.

`LongRoPE2Space` (arXiv 2502.20082) searches only from a critical pair r upward: there λ_i >= s, on the
grid, monotone; below r the factors follow the rule λ_i = λ_r^(i/r) read off the released LLaMA3-8B
factors (microsoft/nnscaler examples/longrope2/llama3_8b_longrope2_config.json: r = 33, λ_33 = 21.81,
λ_1 = 21.81^(1/33) = 1.0979). Its gene 0 indexes r in a window around the theoretical critical pair
`critical_pair(...)`; genes below r are dead and kept equal to k_r (`canonical`), so every distinct
candidate is a distinct factor vector.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Container

import numpy as np

from longrope_jax.rope import START_TOKEN_CHOICES, RopeScaling, default_inv_freq, frequencies

SEED_KINDS = ("pi", "ntk", "yarn")
# Gives up on a mutation after this many draws that were all old (the space around a parent is used up).
MAX_MUTATION_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """λ on the grid `min_factor + step * k`, `k = 0..top`; optionally n̂ from `start_token_choices`."""

    d_half: int
    max_factor: float
    min_factor: float = 1.0
    step: float = 0.01
    search_start_tokens: bool = False
    start_token_choices: tuple[int, ...] = START_TOKEN_CHOICES

    def __post_init__(self):
        if isinstance(self.d_half, bool) or not isinstance(self.d_half, int) or self.d_half < 1:
            raise ValueError(f"search space d_half: expected a positive integer, got {self.d_half!r}")
        if not self.step > 0:
            raise ValueError(f"search space step: expected a positive number, got {self.step!r}")
        if not self.min_factor > 0:
            raise ValueError(f"search space min_factor: expected a positive number, got {self.min_factor!r}")
        if not self.max_factor >= self.min_factor:
            raise ValueError(
                f"search space max_factor: expected >= min_factor ({self.min_factor}), got {self.max_factor!r}"
            )
        if not self.start_token_choices or list(self.start_token_choices) != sorted(set(self.start_token_choices)):
            raise ValueError(
                f"search space start_token_choices: expected increasing distinct integers, got {self.start_token_choices!r}"
            )

    @property
    def top(self) -> int:
        """Largest grid index: the last grid point at or below max_factor."""
        return math.floor((self.max_factor - self.min_factor) / self.step + 1e-9)

    def factors(self, cand) -> np.ndarray:
        """λ (float64, rounded so 1 + 0.01 * 7 prints as 1.07)."""
        k = np.asarray(cand)[1:]
        return np.round(self.min_factor + self.step * k, 10)

    def start_tokens(self, cand) -> int:
        return int(self.start_token_choices[int(np.asarray(cand)[0])]) if self.search_start_tokens else 0

    def snap(self, factors, start_tokens: int = 0) -> np.ndarray:
        """The valid candidate nearest to `factors`: rounded to the grid, clipped to the bounds, then made
        monotone with a running maximum; n̂ goes to the nearest choice (0 when n̂ is not searched)."""
        lam = np.asarray(factors, np.float64)
        if lam.shape != (self.d_half,):
            raise ValueError(f"factors: expected {self.d_half} values, got shape {lam.shape}")
        k = np.clip(np.rint((lam - self.min_factor) / self.step), 0, self.top).astype(np.int64)
        k = np.maximum.accumulate(k)
        n = 0
        if self.search_start_tokens:
            n = int(np.argmin([abs(c - start_tokens) for c in self.start_token_choices]))
        return np.concatenate([[n], k]).astype(np.int64)

    @property
    def slot_choices(self) -> int:
        """How many values gene 0 takes (1: it is fixed)."""
        return len(self.start_token_choices) if self.search_start_tokens else 1

    def live_from(self, cand) -> int:
        """First searched factor gene (all of them here)."""
        return 0

    def canonical(self, cand) -> np.ndarray:
        return np.asarray(cand, np.int64)

    def is_valid(self, cand) -> bool:
        c = np.asarray(cand)
        if c.shape != (self.d_half + 1,) or not np.issubdtype(c.dtype, np.integer):
            return False
        k = c[1:]
        n_max = len(self.start_token_choices) - 1 if self.search_start_tokens else 0
        return bool(0 <= c[0] <= n_max and k.min() >= 0 and k.max() <= self.top and np.all(np.diff(k) >= 0))


def critical_pair(rotary_dim: int, theta: float, original_length: int) -> int:
    """The theoretical critical pair index ceil((d/2) log_b(L_train / 2π)) (arXiv 2310.05209, used by
    LongRoPE2): pairs from it up have a wavelength 2π b^(2i/d) longer than the training length, so they
    never saw a full period. The critical dimension is d_tcd = 2 x this; LLaMA3-8B (d 128, b 5e5, 8k) gives
    pair 35 (d_tcd 70)."""
    if rotary_dim < 2 or theta <= 1 or original_length < 1:
        raise ValueError(f"critical pair: expected rotary_dim >= 2, theta > 1 and a positive length, got "
                         f"{rotary_dim}, {theta}, {original_length}")
    x = (rotary_dim / 2) * math.log(original_length / (2 * math.pi)) / math.log(theta)
    return math.ceil(x - 1e-9)


@dataclasses.dataclass(frozen=True)
class LongRoPE2Space:
    """LongRoPE2's space: a candidate is `[j, k_0, ..., k_{d/2-1}]` with the critical pair
    r = `critical_choices[j]`; from r up λ_i = `min_factor` + step k_i (monotone, `min_factor` = s rounded up
    to the grid, so λ >= s), below r λ_i = λ_r^(i/r). Dead genes k_i (i < r) equal k_r. n̂ is not searched."""

    d_half: int
    max_factor: float
    min_factor: float
    critical: int  # the theoretical critical pair: the window's centre
    window: int = 4  # r in [critical - window, critical + window], clipped to 1..d_half - 1
    step: float = 0.01
    search_start_tokens = False
    start_token_choices = (0,)

    def __post_init__(self):
        if isinstance(self.d_half, bool) or not isinstance(self.d_half, int) or self.d_half < 2:
            raise ValueError(f"longrope2 space d_half: expected an integer >= 2, got {self.d_half!r}")
        if not self.step > 0 or not self.min_factor > 0 or not self.max_factor >= self.min_factor:
            raise ValueError(f"longrope2 space: expected 0 < min_factor ({self.min_factor}) <= max_factor "
                             f"({self.max_factor}) and step > 0 ({self.step})")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"longrope2 critical window: expected an integer >= 0, got {self.window!r}")
        if not self.critical_choices:
            raise ValueError(f"longrope2 critical pair {self.critical} +- {self.window}: no pair in 1..{self.d_half - 1}")

    @property
    def critical_choices(self) -> tuple[int, ...]:
        lo, hi = max(1, self.critical - self.window), min(self.d_half - 1, self.critical + self.window)
        return tuple(range(lo, hi + 1))

    @property
    def top(self) -> int:
        return math.floor((self.max_factor - self.min_factor) / self.step + 1e-9)

    @property
    def slot_choices(self) -> int:
        return len(self.critical_choices)

    def live_from(self, cand) -> int:
        return self.critical_choices[int(np.asarray(cand)[0])]

    def canonical(self, cand) -> np.ndarray:
        c = np.array(cand, np.int64)
        r = self.live_from(c)
        c[1: r + 1] = c[r + 1]
        return c

    def factors(self, cand) -> np.ndarray:
        c = np.asarray(cand)
        r = self.live_from(c)
        lam = self.min_factor + self.step * c[1:].astype(np.float64)
        lam = np.round(lam, 10)
        lam[:r] = lam[r] ** (np.arange(r) / r)
        return lam

    def start_tokens(self, cand) -> int:
        return 0

    def snap(self, factors, start_tokens: int = 0, critical: int | None = None) -> np.ndarray:
        """The valid candidate nearest to `factors`: from r up rounded to the grid, clipped to [s, max] and
        made monotone. r is `critical` when given, else the window's choice whose candidate reproduces
        `factors` best (max abs error; ties go to the pair nearest the theoretical one)."""
        lam = np.asarray(factors, np.float64)
        if lam.shape != (self.d_half,):
            raise ValueError(f"factors: expected {self.d_half} values, got shape {lam.shape}")
        k = np.clip(np.rint((lam - self.min_factor) / self.step), 0, self.top).astype(np.int64)
        k = np.maximum.accumulate(k)
        choices = self.critical_choices
        if critical is not None:
            if critical not in choices:
                raise ValueError(f"critical pair {critical}: expected one of {choices}")
            js = [choices.index(critical)]
        else:
            js = sorted(range(len(choices)), key=lambda j: abs(choices[j] - self.critical))
        best, best_err = None, math.inf
        for j in js:
            r = choices[j]
            kr = k.copy()
            kr[r:] = np.maximum.accumulate(k[r:])
            cand = self.canonical(np.concatenate([[j], kr]))
            err = float(np.max(np.abs(self.factors(cand) - lam)))
            if err < best_err - 1e-12:
                best, best_err = cand, err
        return best

    def is_valid(self, cand) -> bool:
        c = np.asarray(cand)
        if c.shape != (self.d_half + 1,) or not np.issubdtype(c.dtype, np.integer):
            return False
        if not 0 <= c[0] < self.slot_choices:
            return False
        k = c[1:]
        return bool(k.min() >= 0 and k.max() <= self.top and np.all(np.diff(k) >= 0)
                    and np.array_equal(c, self.canonical(c)))


def key(cand) -> tuple[int, ...]:
    """Hashable identity of a candidate, for the history."""
    return tuple(int(x) for x in cand)


# ---- operators ------------------------------------------------------------------------------------


def mutate(space: SearchSpace, parent, rng: np.random.Generator, prob: float = 0.3,
           seen: Container = (), max_tries: int = MAX_MUTATION_TRIES) -> np.ndarray | None:
    """Resample each gene with probability `prob`, uniformly on the grid between its neighbours
    (the first between the lower bound and its right neighbour, the last between its left neighbour
    and the upper bound), so the result stays monotone. Gene 0 (n̂, or LongRoPE2's critical pair) moves to
    a neighbouring choice with the same probability; LongRoPE2's dead genes below the critical pair are not
    drawn. Retried until the child differs from the parent and is not in `seen`; None when `max_tries`
    draws gave nothing new."""
    parent = np.asarray(parent, np.int64)
    n_choices = space.slot_choices
    first = space.live_from(parent)  # genes below it are dead (LongRoPE2's rule part)
    for _ in range(max_tries):
        child = parent.copy()
        k = child[1:]  # a view: writes go to child
        for i in range(first, space.d_half):
            if rng.random() < prob:
                lo = k[i - 1] if i > first else 0
                hi = k[i + 1] if i + 1 < space.d_half else space.top
                k[i] = rng.integers(lo, hi + 1)
        if n_choices > 1 and rng.random() < prob:
            n = int(child[0])
            steps = [s for s in (-1, 1) if 0 <= n + s < n_choices]
            child[0] = n + steps[int(rng.integers(len(steps)))]
        child = space.canonical(child)  # a LongRoPE2 child whose critical pair moved down may not be monotone
        if not np.array_equal(child, parent) and key(child) not in seen and space.is_valid(child):
            return child
    return None


def crossover(space: SearchSpace, a, b, rng: np.random.Generator, seen: Container = (),
              max_tries: int = 20) -> np.ndarray | None:
    """Each gene (n̂ included) from parent `a` or `b` with probability 1/2. A child that is not monotone,
    equals a parent or is in `seen` is rejected and redrawn; None after `max_tries` rejections."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    for _ in range(max_tries):
        child = space.canonical(np.where(rng.random(a.shape) < 0.5, a, b))
        if (space.is_valid(child) and not np.array_equal(child, a) and not np.array_equal(child, b)
                and key(child) not in seen):
            return child
    return None


def initial_population(space: SearchSpace, seeds, size: int, rng: np.random.Generator, prob: float = 0.3,
                       seen: Container = ()) -> list[np.ndarray]:
    """The distinct seeds, then mutations of randomly chosen seeds until `size` candidates (fewer only
    when the space around the seeds is used up)."""
    pop, keys = [], set()
    for s in seeds:
        s = np.asarray(s, np.int64)
        if not space.is_valid(s):
            raise ValueError(f"seed candidate {s.tolist()}: not on the grid, out of bounds or not monotone")
        if key(s) not in keys and key(s) not in seen:
            pop.append(s)
            keys.add(key(s))
    if not pop:
        raise ValueError("initial population: every seed was already evaluated; nothing to start from")
    pop = pop[:size]
    n_seeds = len(pop)
    while len(pop) < size:
        child = mutate(space, pop[int(rng.integers(n_seeds))], rng, prob, Seen(keys, seen))
        if child is None:
            break
        pop.append(child)
        keys.add(key(child))
    return pop


class Seen:
    """`x in Seen(a, b)` is `x in a or x in b`, without copying either (e.g. the history and this
    generation's children)."""

    def __init__(self, *parts):
        self.parts = parts

    def __contains__(self, x) -> bool:
        return any(x in p for p in self.parts)


# ---- seeds from rope.py -----------------------------------------------------------------------------


def seed_factors(kind: str, *, scale: float, head_dim: int, theta: float, original_length: int,
                 partial_rotary_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """λ of PI ('pi'), NTK ('ntk') or YaRN ('yarn') at `scale`: default inv_freq / that method's inv_freq,
    both from `rope.frequencies` (float64 ratio of the float32 frequencies)."""
    common = {"factor": float(scale), "partial_rotary_factor": partial_rotary_factor}
    if kind == "pi":
        scaling = RopeScaling("linear", **common)
    elif kind == "ntk":
        scaling = RopeScaling("ntk", **common)
    elif kind == "yarn":
        scaling = RopeScaling("yarn", original_max_position_embeddings=original_length, beta_fast=beta_fast,
                              beta_slow=beta_slow, **common)
    else:
        raise ValueError(f"seed kind {kind!r}: expected one of {SEED_KINDS}")
    inv, _ = frequencies(scaling, head_dim=head_dim, theta=theta,
                         max_position_embeddings=round(original_length * scale))
    base = default_inv_freq(head_dim, theta, partial_rotary_factor)
    return np.asarray(base, np.float64) / np.asarray(inv, np.float64)
