"""The demo study's sizes: `Plan.full()` is README's study, `Plan.quick()` a smoke run of every stage."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every stage. `full()` is the README's study (~25 min on 2 cores); `quick()` a smoke run."""

    context: int = 256
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    passkey_fraction: float = 0.2
    eval_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    eval_doc_tokens: int = 4096  # per validation book: the first this many tokens
    attention_chunk: int = 256  # blockwise attention in search and evaluation
    search_scales: tuple[int, ...] = (4, 8)
    search: dict = dataclasses.field(default_factory=lambda: {
        "population": 16, "mutations": 8, "crossovers": 8, "parents": 8, "iterations": 6, "docs": 5, "candidates_per_call": 4})
    # LongRoPE2's search at finetune_scale: needle-driven perplexity (2 needles fit a 1024-token window with
    # 549 tokens of text; 4 would leave 75) in its critical-pair space. More books than LongRoPE's search:
    # only the 14 answer digits of a window are scored.
    search_longrope2: dict = dataclasses.field(default_factory=lambda: {
        "population": 16, "mutations": 8, "crossovers": 8, "parents": 8, "iterations": 5, "docs": 8, "candidates_per_call": 4,
        "needles": 2, "critical_window": 4})
    # The held-out check after the searches: the top `check_top` candidates of each LongRoPE search and its
    # seeds are scored on `check_docs` other training books; the best there becomes the LongRoPE factors.
    check_docs: int = 5
    check_top: int = 4  # with 3 seeds (and LongRoPE2's best at 4x): two calls of 4 candidates per scale
    finetune_scale: int = 4
    finetune_steps: int = 72
    finetune_batch: int = 4
    finetune_lr: float = 1e-3
    passkey_lengths: tuple[int, ...] = (256, 512, 1024)
    passkey_depths: int = 5
    passkey_trials: int = 10
    expected_s: dict = dataclasses.field(default_factory=lambda: {
        "prepare": 1, "pretrain": 366, "search_4x": 43, "search_8x": 132, "search_longrope2": 60,
        "search_check": 50, "eval_base": 190, "finetune_pi": 117, "finetune_yarn": 115, "finetune_longrope": 113,
        "finetune_longrope2": 130, "eval_tuned": 120, "export": 13, "report": 5})

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            pretrain_steps=40, eval_lengths=(256, 1024), eval_doc_tokens=2048, search_scales=(4,),
            search={"population": 4, "mutations": 2, "crossovers": 2, "parents": 2, "iterations": 1, "docs": 2,
                        "candidates_per_call": 4},
            search_longrope2={"population": 4, "mutations": 2, "crossovers": 2, "parents": 2, "iterations": 1, "docs": 2,
                              "candidates_per_call": 4, "needles": 2, "critical_window": 4},
            check_docs=2, check_top=2, finetune_steps=6, finetune_batch=2, passkey_lengths=(1024,), passkey_depths=2, passkey_trials=2,
            expected_s={"prepare": 5, "pretrain": 30, "search_4x": 15, "search_longrope2": 10, "search_check": 15,
                            "eval_base": 20, "finetune_pi": 15, "finetune_yarn": 15, "finetune_longrope": 15,
                            "finetune_longrope2": 17, "eval_tuned": 25, "export": 10, "report": 2},
        )

    @property
    def finetune_length(self) -> int:
        return self.context * self.finetune_scale
