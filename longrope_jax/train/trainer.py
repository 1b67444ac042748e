"""Config-driven training: `longrope-jax train --config configs/X.py --workdir DIR [--config.a.b=v]`.

Restarting the same command in the same workdir resumes from the latest complete checkpoint, exactly:
the train state (params, optimizer, step, rng) and every data shard's iterator position are restored.
SIGTERM (preemption) saves the current step, waits for the write and exits 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from longrope_jax.data import passkey
from longrope_jax.data.loader import make_loader
from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.io.artifacts import load_model, tokenizer_dir
from longrope_jax.io.files import BadInput, check_remote_access, write_atomic
from longrope_jax.io.hf import save_hf
from longrope_jax.loss import perplexity
from longrope_jax.model import Llama
from longrope_jax.sharding.distributed import global_batch, initialize_distributed, local_slices
from longrope_jax.sharding.init import init_sharded, param_shardings
from longrope_jax.sharding.mesh import batch_sharding, make_mesh
from longrope_jax.sharding.rules import rules_from_config
from longrope_jax.train import config as config_lib
from longrope_jax.train import optim
from longrope_jax.train.checkpoint import Checkpointer, abstract
from longrope_jax.train.metrics import MetricsWriter
from longrope_jax.train.profile import StepProfiler, parse_steps
from longrope_jax.train.steps import TrainState, eval_step, train_step

DONE_FILE = "DONE"


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. K consecutive non-finite steps); the last good checkpoint stays."""


# ---- data: one loader per data-parallel row block, so batches do not depend on the process count ----


class RowBlocks:
    """The rows of this process: one deterministic loader per batch shard it holds, concatenated.

    Shard b of the global batch always comes from loader b (seed, shard b of n), whichever process
    owns it, so a run on 2 hosts sees exactly the batches of a run on 1. The sequence chunk of the
    process is sliced from the full rows (token ids are cheap next to the model).
    """

    def __init__(self, source, tokenizer, *, blocks: range, n_blocks: int, rows: int, seq_len: int, seed: int,
                 train: bool, pack: str, min_doc_tokens: int, columns: slice, pose_target_length: int | None = None,
                 pose_chunks: int = 2):
        self.columns = columns
        self.rows, self.seq_len = rows, seq_len
        self.loaders = {
            b: make_loader(source, tokenizer, seq_len=seq_len, batch_size=rows, seed=seed, train=train,
                                    pack=pack, shard_index=b, shard_count=n_blocks, min_doc_tokens=min_doc_tokens,
                                    pose_target_length=pose_target_length, pose_chunks=pose_chunks)
            for b in blocks
        }

    def __iter__(self):
        return self

    def __next__(self):
        parts = [self._next(loader) for loader in self.loaders.values()]
        return {k: np.concatenate([p[k] for p in parts])[:, self.columns] for k in parts[0]}

    def _next(self, loader):
        try:
            return next(loader)
        except StopIteration:  # a finite (eval) shard ran out: empty rows score nothing
            z = np.zeros((self.rows, self.seq_len), np.int32)
            return {"tokens": z, "positions": z, "segment_ids": z}

    # grain's Orbax handler stores bytes for iterators that are not its own DatasetIterator.
    def get_state(self) -> bytes:
        return json.dumps({str(b): loader.get_state() for b, loader in self.loaders.items()}).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state)
        if not set(map(str, self.loaders)) <= set(states):
            raise BadInput(
                f"checkpoint data state holds shards {sorted(states, key=int)} but this run reads shards "
                f"{sorted(self.loaders)}: keep config.data.shards (and the process count) fixed across a resume"
            )
        for b, loader in self.loaders.items():
            loader.set_state(states[str(b)])

    def start_prefetch(self) -> None:
        for loader in self.loaders.values():
            getattr(loader, "start_prefetch", lambda: None)()


def _row_blocks(mesh, rules, batch_size: int, seq_len: int, shards: int):
    sharding = batch_sharding(mesh, rules)
    rows, cols = local_slices((batch_size, seq_len), sharding)
    n = shards or mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"config.data.shards: batch size {batch_size} is not a multiple of {n} data shards")
    per = batch_size // n
    if rows.start % per or rows.stop % per:
        raise ValueError(
            f"config.data.shards: this process holds rows {rows.start}..{rows.stop - 1}, which do not align with "
            f"{n} shards of {per} rows; use a multiple of the process count"
        )
    return sharding, range(rows.start // per, rows.stop // per), n, per, cols


def make_batches(c, mesh, rules, tokenizer, split: str, batch_size: int):
    source = open_source(c.data.source, split, data_dir=c.data.data_dir or None, text_key=c.data.text_key)
    if split == "train" and c.data.passkey_fraction:
        # Byte-level: one character per token, so a passkey document (BOS and EOS added) fits one row.
        source = passkey.Mixture(source, c.data.passkey_fraction, max_chars=c.train.seq_len - 2, seed=c.train.seed)
    sharding, blocks, n, per, cols = _row_blocks(mesh, rules, batch_size, c.train.seq_len, c.data.shards)
    it = RowBlocks(source, tokenizer, blocks=blocks, n_blocks=n, rows=per, seq_len=c.train.seq_len,
                   seed=c.train.seed, train=split == "train", pack=c.data.pack,
                   min_doc_tokens=c.data.min_doc_tokens, columns=cols,
                   # PoSE: training rows' positions skip to cover data.pose_target_length (0: off)
                   pose_target_length=(c.data.get("pose_target_length") or None) if split == "train" else None,
                   pose_chunks=c.data.get("pose_chunks", 2))
    to_global = functools.partial(global_batch, mesh=mesh, sharding_or_spec=sharding,
                                  global_shape=(batch_size, c.train.seq_len))
    return it, to_global


# ---- model and state ------------------------------------------------------------------------------


def state_shardings(param_shardings, tx, mesh) -> TrainState:
    """Shardings of the whole train state: AdamW moments follow their parameter, scalars replicate."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct((), jnp.float32), param_shardings)
    opt_state = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, abstract_params),
                                      param_shardings, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_state, rng=replicated,
                      skipped=replicated, total_skipped=replicated)


def initial_state(model_cfg, mesh, rules, tx, seed: int, init_params=None) -> tuple[TrainState, TrainState]:
    """(state, its shardings): fresh or `init_params`, placed so no device holds a whole tensor."""
    shardings = param_shardings(model_cfg, mesh, rules)
    if init_params is None:
        params = init_sharded(model_cfg, mesh, jax.random.key(seed), rules)
    else:
        params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, model_cfg.param_dtype), init_params), shardings)
    target = state_shardings(shardings, tx, mesh)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), target.rng)
    state = jax.jit(lambda p, r: TrainState.create(p, tx, r), out_shardings=target)(params, rng)
    return state, target


# ---- the loop ---------------------------------------------------------------------------------------


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def check(self) -> bool:
        flag = self.requested
        if jax.process_count() > 1:  # every host must agree to stop at the same step
            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def evaluate(c, params, eval_fn, mesh, rules, tokenizer) -> dict:
    it, to_global = make_batches(c, mesh, rules, tokenizer, "validation", c.eval.batch_size)
    nll, count = 0.0, 0
    for _ in range(c.eval.batches):
        out = jax.device_get(eval_fn(params, to_global(next(it))))
        nll, count = nll + float(out["nll"]), count + int(out["tokens"])
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}


def _export(c, model_cfg, state, workdir: Path):
    params = multihost_utils.process_allgather(state.params, tiled=True) if jax.process_count() > 1 else (
        jax.device_get(state.params))
    if jax.process_index() != 0:
        return
    tokenizer = tokenizer_dir(c.init_from) if c.init_from else None
    if "://" not in str(workdir):
        save_hf(model_cfg, params, Path(workdir) / "hf", tokenizer_source=tokenizer, overwrite=True)
        return
    with tempfile.TemporaryDirectory() as tmp:  # save_hf writes locally; then stream the files up
        save_hf(model_cfg, params, Path(tmp) / "hf", tokenizer_source=tokenizer)
        (workdir / "hf").mkdir(parents=True, exist_ok=True)
        for f in (Path(tmp) / "hf").iterdir():
            with open(f, "rb") as src, (workdir / "hf" / f.name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 64 << 20)


def train(config: ml_collections.ConfigDict | dict, workdir, *, stop_at: int | None = None) -> dict:
    """Run (or resume) the training run in `workdir`. Returns a summary dict.

    `stop_at` stops after that step as a preemption would (checkpoint, then return): tests and
    schedulers use it to cut a run without changing its config (and so its schedule).

    Nothing is written before the config, the model, the tokenizer and the data have been checked, and
    `config.json` is written only once the first step has run: a run that fails earlier leaves the workdir
    as it was (a workdir it created is removed again). Resuming falls back past unreadable checkpoints
    (see `checkpoint.Checkpointer.restore_latest`).
    """
    c = config_lib.resolve(config)
    config_lib.validate(c)
    check_remote_access(workdir, "--workdir")
    workdir = epath.Path(workdir)  # local or gs:// (orbax, metrics and the DONE marker all go through epath)
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir}: exists and is not a directory")
    initialize_distributed()

    # Everything that can be wrong with the config or the data fails here, before anything is written or compiled.
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.seq, c.mesh.tensor)
    rules = rules_from_config(c.mesh.rules.to_dict() if c.mesh.rules else None)
    tokenizer = build_tokenizer(c.data.tokenizer)
    base_cfg, init_params = load_model(c.init_from, "config.init_from") if c.init_from else (None, None)
    model_cfg = config_lib.model_config(c, base_cfg)
    config_lib.check_shapes(c, mesh, model_cfg, tokenizer.vocab_size)
    profile_steps = parse_steps(c.profile.steps)
    batches, to_global = make_batches(c, mesh, rules, tokenizer, "train", c.train.batch_size)
    if c.eval.every_steps:
        open_source(c.data.source, "validation", data_dir=c.data.data_dir or None, text_key=c.data.text_key)

    created = jax.process_index() == 0 and "://" not in str(workdir) and not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = log = preempt = profiler = None
    started = False
    try:
        model = Llama(model_cfg, mesh=mesh, rules=rules)
        tx, lr_fn = optim.make_optimizer(c.optimizer, c.train.steps)
        state, shardings = initial_state(model_cfg, mesh, rules, tx, c.train.seed, init_params)
        del init_params
        ckpt = Checkpointer(workdir / "checkpoints", every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep,
                            async_save=c.checkpoint["async"])
        start, restored = ckpt.restore_latest(abstract(state), batches, warn=_warn)
        if restored is not None:
            state = restored
        start = int(start or 0)

        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, accum=c.train.grad_accum),
                          in_shardings=(shardings, batch_sharding(mesh, rules)),
                          out_shardings=(shardings, replicated), donate_argnums=0)
        eval_fn = jax.jit(functools.partial(eval_step, model=model))
        profiler = StepProfiler(profile_steps, workdir / "profile")
        log = MetricsWriter(workdir, tensorboard=c.logging.tensorboard, progress=c.logging.progress,
                            total_steps=c.train.steps, start_step=start)
        if start:
            log.message(f"resumed from step {start} in {ckpt.directory}")
        preempt = _Preemption()
        reporter = _Reporter(c, log, start)
        summary = {"start_step": start, "workdir": str(workdir)}
        pending = None
        for step in range(start, c.train.steps):
            profiler.before(step + 1)
            state, metrics = step_fn(state, to_global(next(batches)))
            profiler.after(step + 1, metrics)
            if pending is not None:  # read the previous step's metrics while this one runs
                reporter(*pending)
            pending = (step + 1, metrics)
            done = step + 1
            if not started:  # the config is trusted once a step has run with it
                _write_config(c, model_cfg, workdir)
                started = True
            if c.eval.every_steps and done % c.eval.every_steps == 0:
                summary["eval"] = evaluate(c, state.params, eval_fn, mesh, rules, tokenizer)
                log.write(done, summary["eval"], prefix="eval_")
            if done % c.checkpoint.every_steps == 0:
                ckpt.save(done, state, batches, c)
            if preempt.check() or done == stop_at:
                reporter(*pending)
                _save_now(ckpt, done, state, batches, c)
                why = "stop_at" if done == stop_at else "SIGTERM"
                log.message(f"{why}: saved step {done} to {ckpt.directory}; exiting")
                return {**summary, "stopped_at": done, "preempted": True, "last": reporter.last}
        if pending is not None:
            reporter(*pending)
        _save_now(ckpt, c.train.steps, state, batches, c)
        if c.export_hf:
            _export(c, model_cfg, state, workdir)
        if jax.process_index() == 0:
            (workdir / DONE_FILE).write_text(f"{c.train.steps}\n")
        return {**summary, "stopped_at": c.train.steps, "preempted": False, "last": reporter.last}
    except BaseException:
        if created and not started and (ckpt is None or ckpt.latest_step() is None):
            _close(profiler, preempt, ckpt, log)
            ckpt = log = preempt = profiler = None
            shutil.rmtree(workdir, ignore_errors=True)  # we made it, and it holds no result yet
        raise
    finally:
        _close(profiler, preempt, ckpt, log)


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


def _close(profiler, preempt, ckpt, log) -> None:
    for closer in (profiler and profiler.close, preempt and preempt.restore, ckpt and ckpt.close,
                   log and log.close):
        if closer:
            closer()


def _write_config(c, model_cfg, workdir) -> None:
    if jax.process_index() != 0:
        return
    text = json.dumps({**c.to_dict(), "resolved_model": _model_json(model_cfg)}, indent=2, default=str) + "\n"
    if "://" in str(workdir):
        (workdir / "config.json").write_text(text)  # object stores replace a file whole
    else:
        write_atomic(Path(workdir) / "config.json", text)


def _save_now(ckpt, step, state, batches, c):
    if ckpt.latest_step() != step:
        ckpt.save(step, state, batches, c, force=True)
    ckpt.wait()


class _Reporter:
    """Logs every `logging.every_steps` (and every skipped step); stops after K consecutive skips."""

    def __init__(self, c, log, start: int):
        self.c, self.log = c, log
        self.mark_time, self.mark_step = time.perf_counter(), start
        self.tokens_per_step = c.train.batch_size * c.train.seq_len
        self.last = None

    def __call__(self, step: int, metrics) -> None:
        c = self.c
        m = {k: v.item() for k, v in jax.device_get(metrics).items()}
        self.last = m
        every = c.logging.every_steps
        if not (every and step % every == 0) and step != c.train.steps and not m["skipped"]:
            return
        now = time.perf_counter()
        m["tokens_per_s"] = self.tokens_per_step * (step - self.mark_step) / max(now - self.mark_time, 1e-9)
        self.mark_time, self.mark_step = now, step
        self.log.write(step, m)
        self.log.progress(step, loss=m["loss"], tok_s=round(m["tokens_per_s"]))
        if m["skipped"] >= c.train.max_consecutive_skips:
            raise TrainingStopped(
                f"step {step}: {m['skipped']} consecutive non-finite steps (loss {m['loss']}, grad norm "
                f"{m['grad_norm']}); stopping. Those updates were skipped, so the last checkpoint holds the "
                "last good state."
            )


def _model_json(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["rope_scaling"] = cfg.rope_scaling.to_hf(rope_theta=cfg.rope_theta, head_dim=cfg.head_dim)
    return d


# ---- CLI ------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="config-driven training (resumes in WORKDIR)", add_help=False,
        description="longrope-jax train --config configs/X.py --workdir DIR [--config.a.b=value ...]",
    )
    p.add_argument("argv", nargs="*", help="--config FILE --workdir DIR [--config.a.b=value ...]")
    p.set_defaults(func=_train_cli, passthrough=True)


def parse_train_args(argv: list[str], command: str = "train"):
    """(ConfigDict, workdir) from absl-style flags: --config FILE --workdir DIR [--config.a.b=value ...]."""
    config, values = config_lib.parse_config_args(
        argv, command, {"workdir": "run directory (checkpoints, metrics, logs)"})
    if values["workdir"] is None:
        raise ValueError(f"{command}: --config FILE and --workdir DIR are both required")
    return config, values["workdir"]


def _train_cli(args) -> int:
    argv = list(args.argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: longrope-jax train --config configs/X.py --workdir DIR [--config.section.key=value ...]")
        return 0
    config, workdir = parse_train_args(argv)
    try:
        summary = train(config, workdir)
    except TrainingStopped as e:
        print(f"longrope-jax train: stopped: {e}")
        return 3
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0
