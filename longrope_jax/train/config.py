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
                    "ring_zigzag", "ring_blocks", "loss_chunk", "max_position_embeddings")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=0, sliding_window=0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=256, param_dtype="float32", dtype="float32", scan_layers=False,
        remat_policy="none", attention="dense", attention_chunk=512, ring_zigzag=True, ring_blocks="auto",
        loss_chunk=1024,
    )
    # RoPE extension. `type: keep` leaves the model's own scaling (from the checkpoint or `model`).
    # mixed_window: LongRoPE2's mixed context window training; every packed document takes the short or
    # long factors by its own length (LlamaConfig.mixed_window).
    c.rope = dict(
        type="keep", factor=0.0, original_max_position_embeddings=0, beta_fast=0.0, beta_slow=0.0,
        attention_factor=0.0, low_freq_factor=0.0, high_freq_factor=0.0, factors_file="", start_tokens=0,
        mixed_window=False,
    )
    c.mesh = dict(data=1, fsdp=-1, seq=1, tensor=1, rules=ml_collections.ConfigDict())
    # shards: how many deterministic loaders feed the global batch (0: data x fsdp). Keep it fixed to
    # resume on a mesh with another data-parallel size.
    # passkey_fraction: share of training characters given to passkey-format documents (passkey.Mixture).
    # pose_target_length: PoSE (data/pose.py), training positions skip in pose_chunks chunks to cover this
    # length at train.seq_len tokens (0: off).
    c.data = dict(source="kjv", data_dir="", tokenizer="byte", text_key="text", pack="concat", min_doc_tokens=0,
                  shards=0, passkey_fraction=0.0, pose_target_length=0, pose_chunks=2)
    c.train = dict(steps=100, batch_size=8, seq_len=256, grad_accum=1, dtype="float32", seed=0,
                   max_consecutive_skips=5)
    c.optimizer = dict(lr=3e-3, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=0.1, clip_norm=1.0)
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 50, "keep": 3, "async": True})
    c.eval = dict(every_steps=50, batches=4, batch_size=8)
    c.logging = dict(every_steps=10, tensorboard=True, progress=True)
    c.profile = dict(steps="")  # "N,M": an XProf trace of steps N..M in WORKDIR/profile
    c.init_from = ""  # "hf:PATH" or "jax:PATH"
    c.export_hf = False
    return c


# Published architectures (their HF config.json), so a recipe compiles (`longrope-jax compile`) on a machine
# without the checkpoint. With the checkpoint at `init_from`, its own config.json wins.
ARCHITECTURES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False),
}


def long_context_finetune(*, init_from: str, arch: str, seq_len: int, steps: int, lr: float, batch_size: int,
                          mesh: dict, warmup_steps: int = 20) -> ml_collections.ConfigDict:
    """The paper recipes' shared settings: fine-tune a converted HF checkpoint at `seq_len`.

    `arch` names the checkpoint's architecture (`ARCHITECTURES`); the checkpoint's own config.json wins
    when it is there. The `model` section then only adds kernels, dtypes, remat and the new
    max_position_embeddings. AdamW (0.9, 0.95), no weight decay, 20 warmup steps, then constant
    (PI and YaRN); data is PG19 via TFDS, one window per document.

    Memory per chip (`longrope-jax compile`): full remat keeps every layer's input, [32 layers, rows,
    local tokens, 4096] bf16, 8 GiB at 8 rows of 4096 tokens; the ring's score blocks and the loss's
    logits chunk come on top (see the chunk sizes below). A 32 GiB v4 chip then needs the batch in
    2 micro-batches; the 95 GiB v5p does not.
    """
    c = default_config()
    c.init_from = init_from
    c.model.update(ARCHITECTURES[arch])
    # attention_chunk 512: a score block is [rows, heads, 512, 512] fp32 per device (256 MiB for 8 rows x 32
    # heads); at 2048 it was 4 GiB, and the ring's backward keeps several alive (measured with `compile`).
    # loss_chunk 256: the loss holds [rows, 256, vocab] fp32 logits per device (0.25 GiB at 8 rows x 32k vocab).
    c.model.update(max_position_embeddings=seq_len, attention="ring", attention_chunk=512, ring_zigzag=True,
                   loss_chunk=256,
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


def rope_scaling(c: ml_collections.ConfigDict, current: RopeScaling, head_dim: int | None = None) -> RopeScaling:
    """The RopeScaling the `rope` section asks for (`keep`: the model's own); checked against `head_dim`
    when given (a factors file for another head size is named)."""
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
        scaling = RopeScaling.from_hf(d)
        if head_dim is not None:
            scaling.validate(head_dim)
    except ValueError as e:
        where = f"config.rope.factors_file {r.factors_file}" if r.type == "longrope" else "config.rope"
        raise ValueError(f"{where}: {e}") from None
    return scaling


def model_config(c: ml_collections.ConfigDict, base: LlamaConfig | None = None) -> LlamaConfig:
    """The LlamaConfig to train: `base` (from init_from) or the `model` section, plus `rope` and train.dtype."""
    m = dict(c.model)
    for key in ("head_dim", "sliding_window"):  # 0: none given
        if not m.pop(key):
            m[key] = None
    m["dtype"] = c.train.dtype
    try:
        if base is None:
            cfg = LlamaConfig(**m)
        else:
            cfg = LlamaConfig(**{**base.__dict__, **{k: m[k] for k in JAX_MODEL_FIELDS if k in m}})
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from None
    scaling = rope_scaling(c, cfg.rope_scaling, cfg.head_dim)
    mixed = c.rope.get("mixed_window", False)
    if not isinstance(mixed, bool):
        raise ValueError(f"config.rope.mixed_window: {mixed!r}; expected true or false")
    if mixed and not scaling.depends_on_length:
        raise ValueError(f"config.rope.mixed_window: needs a length-dependent RoPE (longrope or dynamic), "
                         f"got {scaling.rope_type!r}")
    return LlamaConfig(**{**cfg.__dict__, "rope_scaling": scaling, "mixed_window": mixed})


# Every number `validate` checks: (section.key, lowest value) for integers, (section.key, low, high,
# low bound open, high bound open) for floats.
_INTS = (("train.steps", 1), ("train.batch_size", 1), ("train.seq_len", 2), ("train.grad_accum", 1),
         ("train.seed", 0), ("train.max_consecutive_skips", 1), ("optimizer.warmup_steps", 0),
         ("checkpoint.every_steps", 1), ("checkpoint.keep", 1), ("eval.every_steps", 0), ("eval.batches", 1),
         ("eval.batch_size", 1), ("logging.every_steps", 0), ("data.min_doc_tokens", 0), ("data.shards", 0),
         ("rope.original_max_position_embeddings", 0), ("rope.start_tokens", 0), ("data.pose_target_length", 0),
         ("data.pose_chunks", 1))
_FLOATS = (("optimizer.lr", 0.0, None, True, False), ("optimizer.b1", 0.0, 1.0, False, True),
           ("optimizer.b2", 0.0, 1.0, False, True), ("optimizer.eps", 0.0, None, True, False),
           ("optimizer.end_lr_ratio", 0.0, 1.0, False, False), ("optimizer.weight_decay", 0.0, None, False, False),
           ("optimizer.clip_norm", 0.0, None, False, False), ("data.passkey_fraction", 0.0, 1.0, False, True),
           ("model.rope_theta", 0.0, None, True, False), ("model.rms_norm_eps", 0.0, None, True, False),
           ("rope.factor", 0.0, None, False, False), ("rope.beta_fast", 0.0, None, False, False),
           ("rope.beta_slow", 0.0, None, False, False), ("rope.attention_factor", 0.0, None, False, False),
           ("rope.low_freq_factor", 0.0, None, False, False), ("rope.high_freq_factor", 0.0, None, False, False))


def validate(c: ml_collections.ConfigDict) -> None:
    """Every number of a resolved training config is of its type, finite and in range; a ValueError names the
    first one that is not. Runs before anything is written or compiled (check_shapes then checks how the
    numbers fit the mesh and the model)."""
    import math

    def get(key):
        section, name = key.split(".")
        return c[section][name]

    for key, low in _INTS:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ValueError(f"config.{key}: {v!r}; expected {what}")
    for key, low, high, low_open, high_open in _FLOATS:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"config.{key}: {v!r}; expected a finite number")
        if (v < low or (low_open and v == low)) or (high is not None and (v > high or (high_open and v == high))):
            lo, hi = ("(" if low_open else "[") + f"{low:g}", (f"{high:g}" if high is not None else "inf") + (
                ")" if high_open or high is None else "]")
            raise ValueError(f"config.{key}: {v!r}; expected a number in {lo}, {hi}")


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
    local = t.seq_len // seq
    if local > model.loss_chunk and local % model.loss_chunk:
        raise ValueError(f"config.model.loss_chunk {model.loss_chunk} does not divide the per-device length {local}")
    if model.attention == "splash" and seq > 1:
        raise ValueError(f"config.model.attention 'splash' needs config.mesh.seq == 1, got {seq} (splash holds the "
                         "whole sequence on each device; use 'ring' to split it)")
    if model.attention == "ring" and seq == 1:
        raise ValueError("config.model.attention 'ring' needs config.mesh.seq > 1 (use 'blockwise' on one device)")
    if vocab_size > model.vocab_size:
        raise ValueError(f"config.model.vocab_size {model.vocab_size} is smaller than the tokenizer's {vocab_size}")
    pose = c.data.get("pose_target_length", 0)
    if pose and pose < t.seq_len:
        raise ValueError(f"config.data.pose_target_length {pose}: expected at least train.seq_len {t.seq_len} "
                         "(PoSE positions skip to cover a longer length; 0 turns it off)")
    if pose and pose > model.max_position_embeddings:
        raise ValueError(f"config.data.pose_target_length {pose}: beyond model.max_position_embeddings "
                         f"{model.max_position_embeddings}; extend the model to the target length first")


def parse_config_args(argv: list[str], command: str, string_flags: dict | None = None):
    """(locked ConfigDict, {flag: value}) from absl-style flags: `--config FILE [--config.a.b=value ...]` plus
    the string flags named in `string_flags` ({name: help}). A missing or broken config file, a missing --config
    or a bad override is a ValueError of one line naming the file (and line) or the flag."""
    from absl import flags
    from ml_collections import config_flags

    file = _config_file_arg(argv)
    if file is not None:
        check_config_file(file, f"{command}: --config")
    fv = flags.FlagValues()
    full = [f"longrope-jax {command}", *argv]
    # config_flags looks for the --config.x overrides in sys_argv (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()", flag_values=fv,
                                    lock_config=True, sys_argv=full)
    for name, help_text in (string_flags or {}).items():
        flags.DEFINE_string(name, None, help_text, flag_values=fv)
    try:
        fv(full)
        config = fv.config
    except (KeyError, AttributeError) as e:  # config_flags reports a bad override key as these
        raise ValueError(f"{command}: {_override_key_error(e, argv)}") from None
    except flags.Error as e:
        raise ValueError(f"{command}: {_one_line(str(e))}") from None
    except Exception as e:  # noqa: BLE001 (get_config() itself failed: name the file)
        raise ValueError(f"{command}: --config {file}: get_config() failed ({type(e).__name__}: "
                         f"{_one_line(str(e))})") from None
    if config is None:
        raise ValueError(f"{command}: --config FILE is required")
    return config, {name: getattr(fv, name) for name in (string_flags or {})}


def check_config_file(file, what: str) -> None:
    """A config file exists and compiles; else a ValueError (FileNotFoundError) naming it and the line."""
    import os

    path = os.path.expanduser(str(file))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {file}: not found; expected a Python file with get_config()")
    try:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec")
    except SyntaxError as e:
        raise ValueError(f"{what} {file}:{e.lineno}: {e.msg}; expected a Python file with get_config()") from None
    except ValueError as e:  # e.g. null bytes
        raise ValueError(f"{what} {file}: not Python source ({e})") from None


def _config_file_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(("--config=", "-config=")):
            return a.partition("=")[2]
    return None


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _override_key_error(e: BaseException, argv: list[str]) -> str:
    """'--config.train.stpes: unknown key 'stpes' (Did you mean "steps" instead of "stpes"?)' from the
    KeyError/AttributeError config_flags raises (whose text is a repr with newlines)."""
    err = e
    while err is not None and not (isinstance(err, KeyError) and err.args and isinstance(err.args[0], str)):
        err = err.__cause__ or err.__context__
    text = err.args[0] if err is not None else (e.args[0] if e.args else str(e))
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    key = lines[0].strip("'\"") if lines else "?"
    hint = f" ({' '.join(lines[1:])})" if lines[1:] else ""
    flag = next((a.partition("=")[0] for a in argv if a.startswith("--config.")
                 and key in a.partition("=")[0].split(".")), None)
    return f"{flag or '--config'}: unknown key {key!r}{hint}; expected a key of the config schema"
