"""Training configuration: the full schema with defaults, merging, and validation before any compile.

A config file's `get_config()` returns an `ml_collections.ConfigDict` holding only what it changes;
`resolve` lays it over `default_config()` and rejects any key the schema does not know, naming it.
"""

from __future__ import annotations

import ml_collections

from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.model import LlamaConfig
from longrope_jax.rope import RopeScaling

# Model fields a config may set; when `init_from` names a checkpoint only the JAX-side ones and
# max_position_embeddings apply (the architecture comes from the checkpoint).
JAX_MODEL_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat_policy", "attention", "attention_chunk",
                    "ring_zigzag", "max_position_embeddings")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=0, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0,
        max_position_embeddings=256, param_dtype="float32", dtype="float32", scan_layers=False,
        remat_policy="none", attention="dense", attention_chunk=512, ring_zigzag=True,
    )
    # RoPE extension. `type: keep` leaves the model's own scaling (from the checkpoint or `model`).
    c.rope = dict(
        type="keep", factor=0.0, original_max_position_embeddings=0, beta_fast=0.0, beta_slow=0.0,
        attention_factor=0.0, low_freq_factor=0.0, high_freq_factor=0.0, factors_file="", start_tokens=0,
    )
    c.mesh = dict(data=1, fsdp=-1, seq=1, tensor=1, rules=ml_collections.ConfigDict())
    # shards: how many deterministic loaders feed the global batch (0: data x fsdp). Keep it fixed to
    # resume on a mesh with another data-parallel size.
    # passkey_fraction: share of training characters given to passkey-format documents (passkey.Mixture).
    c.data = dict(source="kjv", data_dir="", tokenizer="byte", text_key="text", pack="concat", min_doc_tokens=0,
                  shards=0, passkey_fraction=0.0)
    c.train = dict(steps=100, batch_size=8, seq_len=256, grad_accum=1, dtype="float32", seed=0,
                   max_consecutive_skips=5)
    c.optimizer = dict(lr=3e-3, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=0.1, clip_norm=1.0)
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 50, "keep": 3, "async": True})
    c.eval = dict(every_steps=50, batches=4, batch_size=8)
    c.logging = dict(every_steps=10, tensorboard=True, progress=True)
    c.init_from = ""  # "hf:PATH" or "jax:PATH"
    c.export_hf = False
    return c


def long_context_finetune(*, init_from: str, seq_len: int, steps: int, lr: float, batch_size: int,
                          mesh: dict, warmup_steps: int = 20) -> ml_collections.ConfigDict:
    """The paper recipes' shared settings: fine-tune a converted HF checkpoint at `seq_len`.

    The `model` section only sets what the checkpoint does not: kernels, dtypes, remat and the new
    max_position_embeddings. AdamW (0.9, 0.95), no weight decay, 20 warmup steps, then constant
    (PI and YaRN); data is PG19 via TFDS, one window per document.
    """
    c = default_config()
    c.init_from = init_from
    c.model.update(max_position_embeddings=seq_len, attention="ring", attention_chunk=2048, ring_zigzag=True,
                   scan_layers=True, remat_policy="full", param_dtype="float32")
    c.train.update(steps=steps, batch_size=batch_size, seq_len=seq_len, dtype="bfloat16")
    c.optimizer.update(lr=lr, warmup_steps=warmup_steps, schedule="constant", b1=0.9, b2=0.95,
                       weight_decay=0.0, clip_norm=1.0)
    c.mesh.update(**mesh)
    c.data.update(source="tfds:pg19", tokenizer=f"hf:{init_from.partition(':')[2]}", pack="document",
                  min_doc_tokens=seq_len // 2)
    c.checkpoint.update(every_steps=50, keep=3)
    c.eval.update(every_steps=100, batches=8, batch_size=mesh.get("fsdp", 1) * mesh.get("data", 1))
    c.logging.update(every_steps=1)
    return c


def merge(base: ml_collections.ConfigDict, override, path: str = "config", open_keys=("rules",)) -> None:
    """Lay `override` over `base` in place; a key `base` lacks raises a ValueError naming it. Sections
    named in `open_keys` are taken whole (their keys are free)."""
    for key, value in override.items():
        where = f"{path}.{key}"
        if key not in base:
            raise ValueError(f"{where}: unknown key; expected one of {sorted(base.keys())}")
        if key in open_keys or not isinstance(base[key], ml_collections.ConfigDict):
            base[key] = value
        elif not isinstance(value, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"{where}: expected a section (dict), got {value!r}")
        else:
            merge(base[key], value, where, open_keys)


def resolve(user: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """`default_config()` overlaid with `user`; unknown keys raise a ValueError naming them."""
    c = default_config()
    with c.unlocked():
        merge(c, user)
    return c


def rope_scaling(c: ml_collections.ConfigDict, current: RopeScaling) -> RopeScaling:
    """The RopeScaling the `rope` section asks for (`keep`: the model's own)."""
    r = c.rope
    if r.type == "keep":
        return current
    d = {"rope_type": r.type}
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                "low_freq_factor", "high_freq_factor"):
        if r[key]:
            d[key] = r[key]
    if r.type == "longrope":
        if not r.factors_file:
            raise ValueError("config.rope.factors_file: required for rope.type 'longrope' (JSON with short_factor/long_factor)")
        factors = read_rope_scaling(r.factors_file, "config.rope.factors_file")
        d.update(short_factor=factors["short_factor"], long_factor=factors["long_factor"])
        if r.start_tokens:
            d["start_tokens"] = r.start_tokens
        # What the rope section leaves unset comes from the file (a search's n̂ and scale included).
        for key in ("original_max_position_embeddings", "factor", "attention_factor", "start_tokens"):
            if key not in d and key in factors:
                d[key] = factors[key]
    try:
        return RopeScaling.from_hf(d)
    except ValueError as e:
        raise ValueError(f"config.rope: {e}") from None


def model_config(c: ml_collections.ConfigDict, base: LlamaConfig | None = None) -> LlamaConfig:
    """The LlamaConfig to train: `base` (from init_from) or the `model` section, plus `rope` and train.dtype."""
    m = dict(c.model)
    if not m.pop("head_dim"):
        m["head_dim"] = None
    m["dtype"] = c.train.dtype
    try:
        if base is None:
            cfg = LlamaConfig(**m)
        else:
            cfg = LlamaConfig(**{**base.__dict__, **{k: m[k] for k in JAX_MODEL_FIELDS if k in m}})
        return LlamaConfig(**{**cfg.__dict__, "rope_scaling": rope_scaling(c, cfg.rope_scaling)})
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from None


def check_shapes(c: ml_collections.ConfigDict, mesh, model: LlamaConfig, vocab_size: int) -> None:
    """Batch, length and vocabulary checks that must fail before anything compiles."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    seq = mesh.shape["seq"]
    t = c.train
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ValueError(f"config.train.batch_size {t.batch_size} is not a multiple of train.grad_accum {t.grad_accum}")
    micro = t.batch_size // t.grad_accum
    if micro % dp:
        raise ValueError(
            f"config.train.batch_size: {t.batch_size} / grad_accum {t.grad_accum} = {micro} rows per micro-batch, "
            f"not divisible by the data-parallel size data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {dp}"
        )
    if c.eval.every_steps and c.eval.batch_size % dp:
        raise ValueError(f"config.eval.batch_size {c.eval.batch_size} is not divisible by data x fsdp = {dp}")
    unit = seq * (2 if model.attention == "ring" and model.ring_zigzag and seq > 1 else 1)
    if t.seq_len % unit:
        why = f"seq={seq}" + (" x 2 for the zig-zag ring layout" if unit != seq else "")
        raise ValueError(f"config.train.seq_len {t.seq_len} is not divisible by {unit} ({why})")
    if model.attention in ("blockwise", "ring"):
        local = t.seq_len // seq if model.attention == "ring" else t.seq_len
        if local > model.attention_chunk and local % model.attention_chunk:
            raise ValueError(
                f"config.model.attention_chunk {model.attention_chunk} does not divide the per-device length {local}"
            )
    if model.attention == "ring" and seq == 1:
        raise ValueError("config.model.attention 'ring' needs config.mesh.seq > 1 (use 'blockwise' on one device)")
    if vocab_size > model.vocab_size:
        raise ValueError(f"config.model.vocab_size {model.vocab_size} is smaller than the tokenizer's {vocab_size}")
