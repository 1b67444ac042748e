"""Bad input to every command, as a new user would give it: each case runs `cli.main` in-process and must
exit with its code (2 bad input, 1 runtime failure, 0 where the input was in fact valid), print one error
line that names the offending item, print no traceback, and leave its target as it was.

The table is the issue-13 audit made permanent. Cases that would train fail at validation, before
anything is compiled; the shared tiny checkpoints are built once per module. `SHOW_BAD_INPUT=1 pytest -s`
prints every case's message for review."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import pytest

from longrope_jax import cli
from tests.tiny import BYTE_BOS, BYTE_EOS, BYTE_VOCAB, REPO, TINY_CPU, TRAIN_MODEL

EXTEND_TINY = REPO / "configs" / "extend_tiny.py"


# ---- shared inputs ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    root: Path
    kjv: str
    hf: Path  # a tiny HF checkpoint (byte vocabulary, head_dim 16 -> 8 LongRoPE factors)
    jax: Path  # the same model, `convert hf-to-jax` output
    big_tok: Path  # a tokenizer.json with more ids than the model's vocabulary
    run: Path  # a train workdir holding step 1 of TRAIN (for the resume cases)

    def train(self, workdir, *extra) -> list[str]:
        return ["train", "--config", str(TINY_CPU), "--workdir", str(workdir), *TRAIN, f"--config.data.data_dir={self.kjv}",
                *extra]


TRAIN = [f"--config.model.{k}={v}" for k, v in TRAIN_MODEL.items()] + [
    "--config.train.steps=1", "--config.train.batch_size=8", "--config.train.seq_len=64", "--config.mesh.fsdp=8",
    "--config.eval.every_steps=0", "--config.checkpoint.every_steps=1", "--config.logging.progress=False",
    "--config.logging.tensorboard=False"]


def _model_config():
    from longrope_jax.model import LlamaConfig

    return LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                       bos_token_id=BYTE_BOS, eos_token_id=BYTE_EOS)


@pytest.fixture(scope="module")
def env(tmp_path_factory, kjv_dir) -> Env:
    from tokenizers import Tokenizer, models

    from longrope_jax.io.hf import save_hf
    from longrope_jax.io.orbax_params import save_jax
    from longrope_jax.model import init_params

    root = tmp_path_factory.mktemp("bad_input")
    cfg = _model_config()
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    save_hf(cfg, params, root / "hf")
    save_jax(cfg, params, root / "jax")
    big = root / "big_tok"
    big.mkdir()
    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(BYTE_VOCAB + 40)}}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(big / "tokenizer.json"))
    e = Env(root, kjv_dir, root / "hf", root / "jax", big, root / "run")
    assert cli.main(e.train(e.run)) == 0, "the resume cases need a finished run"
    return e


def _factors(path: Path, values) -> str:
    path.write_text(json.dumps({"rope_type": "longrope", "short_factor": [1.0] * len(values),
                                "long_factor": list(values), "original_max_position_embeddings": 32}))
    return str(path)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _truncate_largest(directory: Path) -> None:
    f = max((p for p in directory.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _hf_with_config(t: Path, e: Env, **changes) -> Path:
    d = _copy(e.hf, t / "hf")
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _gguf(path: Path, iq4_nl: str | None = None, **kw) -> Path:
    """A tiny LLaMA GGUF file (tests/io/gguf_files.py); `iq4_nl` names a tensor stored as IQ4_NL (unsupported)."""
    import gguf
    import numpy as np

    from tests.io.gguf_files import TINY, write_tiny_gguf

    if iq4_nl:
        blocks = np.zeros((TINY["ffn"], TINY["hidden"] // 32 * 18), np.uint8)
        kw["raw"] = {iq4_nl: (blocks, gguf.GGMLQuantizationType.IQ4_NL)}
    write_tiny_gguf(path, **kw)
    return path


def _disk_error(code: int, what: str):
    """Patch the safetensors writer to fail as a read-only or full filesystem does."""
    def patch(monkeypatch):
        from longrope_jax.io import safetensors

        def fail(path, *a, **k):
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(safetensors, "write_file", fail)
    return patch


# ---- the table --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """`argv(env, tmp)` runs with `setup(env, tmp)` done first; exit `code`; stderr holds each of `names`
    (formatted with env and tmp); `target(env, tmp)` (default tmp/"out") is the same before and after."""

    id: str
    argv: Callable
    code: int
    names: tuple
    setup: Callable | None = None
    target: Callable | None = None
    patch: Callable | None = None
    cwd: Callable | None = None


def C(id, argv, code, *names, **kw) -> Case:
    return Case(id, argv, code, names, **kw)


def _convert(direction, src, dst, *extra):
    return ["convert", direction, str(src), str(dst), *extra]


CASES = [
    # ---- convert ----
    C("h2j-src-missing", lambda e, t: _convert("hf-to-jax", t / "nope", t / "out"), 2, "nope", "not a directory"),
    C("h2j-src-is-file", lambda e, t: _convert("hf-to-jax", _write(t / "f.txt", "x"), t / "out"), 2, "f.txt"),
    C("h2j-dst-not-empty", lambda e, t: _convert("hf-to-jax", e.hf, t / "out"), 2, "out", "not empty", "--overwrite",
      setup=lambda e, t: _write(t / "out" / "keep.txt", "old")),
    C("h2j-overwrite-dst-contains-src", lambda e, t: _convert("hf-to-jax", t / "par" / "src", t / "par", "--overwrite"),
      2, "contains SRC", setup=lambda e, t: (_copy(e.hf, t / "par" / "src"), _write(t / "par" / "other.txt", "x")),
      target=lambda e, t: t / "par"),
    C("h2j-overwrite-dst-inside-src", lambda e, t: _convert("hf-to-jax", t / "src", t / "src" / "sub", "--overwrite"),
      2, "lies inside SRC", setup=lambda e, t: (_copy(e.hf, t / "src"), _write(t / "src" / "sub" / "x.txt", "x")),
      target=lambda e, t: t / "src"),
    C("h2j-dst-is-src", lambda e, t: _convert("hf-to-jax", t / "src", t / "src", "--overwrite"), 2, "is SRC",
      setup=lambda e, t: _copy(e.hf, t / "src"), target=lambda e, t: t / "src"),
    C("h2j-overwrite-cwd", lambda e, t: _convert("hf-to-jax", e.hf, ".", "--overwrite"), 2, "current directory",
      setup=lambda e, t: _write(t / "out" / "keep.txt", "x"), cwd=lambda e, t: t / "out"),
    C("h2j-dst-is-file", lambda e, t: _convert("hf-to-jax", e.hf, t / "out", "--overwrite"), 2, "out",
      "not a directory", setup=lambda e, t: _write(t / "out", "x")),
    C("h2j-config-bad-json", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2, "config.json", "not valid JSON",
      setup=lambda e, t: _write(_copy(e.hf, t / "hf") / "config.json", "{")),
    C("h2j-config-missing", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2, "config.json", "not found",
      setup=lambda e, t: (_copy(e.hf, t / "hf") / "config.json").unlink()),
    C("h2j-safetensors-truncated", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2, "model.safetensors",
      setup=lambda e, t: os.truncate(_copy(e.hf, t / "hf") / "model.safetensors", 1000)),
    C("h2j-safetensors-missing", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2, "model.safetensors",
      setup=lambda e, t: (_copy(e.hf, t / "hf") / "model.safetensors").unlink()),
    C("h2j-rope-scaling-vs-max-positions", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2,
      "original_max_position_embeddings 128", "max_position_embeddings 64",
      setup=lambda e, t: _hf_with_config(t, e, rope_scaling=None, rope_parameters={
          "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0})),
    C("h2j-rope-parameters-vs-rope-scaling", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2,
      "config.json", "disagree", setup=lambda e, t: _hf_with_config(t, e, rope_scaling={
          "rope_type": "linear", "factor": 2.0})),
    C("h2j-tensor-shape", lambda e, t: _convert("hf-to-jax", t / "hf", t / "out"), 2, "model.embed_tokens.weight",
      "expected", setup=lambda e, t: _hf_with_config(t, e, vocab_size=300)),
    C("h2j-bad-dtype", lambda e, t: _convert("hf-to-jax", e.hf, t / "out", "--dtype", "float7"), 2, "--dtype",
      "float7"),
    C("h2j-gs-src", lambda e, t: _convert("hf-to-jax", "gs://bucket/llama", t / "out"), 2, "gs://bucket/llama",
      "remote path"),
    C("h2j-empty-dst-is-fine", lambda e, t: _convert("hf-to-jax", e.hf, t / "out"), 0, (),
      setup=lambda e, t: (t / "out").mkdir(), target=lambda e, t: t / "unused"),
    C("j2h-src-missing-config", lambda e, t: _convert("jax-to-hf", t / "jax", t / "out"), 2, "llama_config.json",
      setup=lambda e, t: (_copy(e.jax, t / "jax") / "llama_config.json").unlink()),
    C("j2h-orbax-truncated", lambda e, t: _convert("jax-to-hf", t / "jax", t / "out"), 2, "params", "corrupt Orbax",
      setup=lambda e, t: _truncate_largest(_copy(e.jax, t / "jax") / "params")),
    C("j2h-orbax-metadata-deleted", lambda e, t: _convert("jax-to-hf", t / "jax", t / "out"), 2, "params",
      setup=lambda e, t: (_copy(e.jax, t / "jax") / "params" / "_METADATA").unlink()),
    C("j2h-unknown-config-field", lambda e, t: _convert("jax-to-hf", t / "jax", t / "out"), 2, "llama_config.json",
      "hidden_sise", setup=lambda e, t: _write(_copy(e.jax, t / "jax") / "llama_config.json",
                                               json.dumps({"hidden_sise": 3}))),
    C("j2h-bad-shard-size", lambda e, t: _convert("jax-to-hf", e.jax, t / "out", "--max-shard-size", "5 lots"), 2,
      "max_shard_size", "5 lots"),
    C("j2h-tokenizer-missing", lambda e, t: _convert("jax-to-hf", e.jax, t / "out", "--tokenizer", str(t / "tok")), 2,
      "tok", "not found"),
    C("j2h-read-only-fs", lambda e, t: _convert("jax-to-hf", e.jax, t / "out", "--overwrite"), 1, "out",
      "Read-only file system", setup=lambda e, t: _write(t / "out" / "keep.txt", "old"),
      patch=_disk_error(errno.EROFS, "ro")),
    C("j2h-disk-full", lambda e, t: _convert("jax-to-hf", e.jax, t / "out", "--overwrite"), 1, "out",
      "No space left", setup=lambda e, t: _write(t / "out" / "keep.txt", "old"), patch=_disk_error(errno.ENOSPC, "full")),
    C("convert-no-direction", lambda e, t: ["convert"], 2, "DIRECTION"),
    C("g2h-truncated", lambda e, t: _convert("gguf-to-hf", t / "m.gguf", t / "out", "--overwrite"), 2, "m.gguf",
      "truncated", setup=lambda e, t: (_write(t / "out" / "keep.txt", "old"), _gguf(t / "m.gguf"),
                                       os.truncate(t / "m.gguf", (t / "m.gguf").stat().st_size // 2))),
    C("g2h-unknown-architecture", lambda e, t: _convert("gguf-to-hf", t / "m.gguf", t / "out"), 2, "m.gguf",
      "general.architecture", "'gpt2'", setup=lambda e, t: _gguf(t / "m.gguf", arch="gpt2")),
    C("g2j-missing-tensor", lambda e, t: _convert("gguf-to-jax", t / "m.gguf", t / "out"), 2, "m.gguf",
      "blk.1.ffn_down.weight", setup=lambda e, t: _gguf(t / "m.gguf", drop=("blk.1.ffn_down.weight",))),
    C("g2j-unsupported-quant-type", lambda e, t: _convert("gguf-to-jax", t / "m.gguf", t / "out", "--overwrite"), 2,
      "m.gguf", "blk.0.ffn_up.weight", "IQ4_NL", setup=lambda e, t: (_write(t / "out" / "keep.txt", "old"),
                                                                     _gguf(t / "m.gguf", iq4_nl="blk.0.ffn_up.weight"))),
    C("models-get-unknown", lambda e, t: ["models", "get", "llama-9000", str(t / "out")], 2, "llama-9000", "smollm2"),

    # ---- train (all fail before anything is written) ----
    C("train-config-missing", lambda e, t: ["train", "--config", str(t / "nope.py"), "--workdir", str(t / "out")], 2,
      "nope.py", "not found"),
    C("train-config-syntax", lambda e, t: ["train", "--config", str(t / "c.py"), "--workdir", str(t / "out")], 2,
      "c.py:2", setup=lambda e, t: _write(t / "c.py", "def get_config():\n    return (\n")),
    C("train-config-raises", lambda e, t: ["train", "--config", str(t / "c.py"), "--workdir", str(t / "out")], 2,
      "c.py", "get_config() failed", "NameError",
      setup=lambda e, t: _write(t / "c.py", "def get_config():\n    return undefined_thing\n")),
    C("train-unknown-key", lambda e, t: e.train(t / "out", "--config.train.stpes=3"), 2, "--config.train.stpes",
      "unknown key 'stpes'"),
    C("train-bad-value-type", lambda e, t: e.train(t / "out", "--config.train.steps=many"), 2, "config.train.steps",
      "many"),
    C("train-no-workdir", lambda e, t: ["train", "--config", str(TINY_CPU)], 2, "--workdir"),
    C("train-steps-negative", lambda e, t: e.train(t / "out", "--config.train.steps=-5"), 2, "config.train.steps",
      "positive integer"),
    C("train-batch-zero", lambda e, t: e.train(t / "out", "--config.train.batch_size=0"), 2, "config.train.batch_size"),
    C("train-seq-len-zero", lambda e, t: e.train(t / "out", "--config.train.seq_len=0"), 2, "config.train.seq_len"),
    C("train-grad-accum-zero", lambda e, t: e.train(t / "out", "--config.train.grad_accum=0"), 2,
      "config.train.grad_accum"),
    C("train-lr-nan", lambda e, t: e.train(t / "out", "--config.optimizer.lr=nan"), 2, "config.optimizer.lr", "finite"),
    C("train-lr-negative", lambda e, t: e.train(t / "out", "--config.optimizer.lr=-0.1"), 2, "config.optimizer.lr"),
    C("train-b1-above-one", lambda e, t: e.train(t / "out", "--config.optimizer.b1=1.5"), 2, "config.optimizer.b1"),
    C("train-b2-inf", lambda e, t: e.train(t / "out", "--config.optimizer.b2=inf"), 2, "config.optimizer.b2"),
    C("train-eps-zero", lambda e, t: e.train(t / "out", "--config.optimizer.eps=0"), 2, "config.optimizer.eps"),
    C("train-checkpoint-every-zero", lambda e, t: e.train(t / "out", "--config.checkpoint.every_steps=0"), 2,
      "config.checkpoint.every_steps"),
    C("train-passkey-fraction", lambda e, t: e.train(t / "out", "--config.data.passkey_fraction=1.5"), 2,
      "config.data.passkey_fraction"),
    C("train-rope-factor-nan", lambda e, t: e.train(t / "out", "--config.rope.type=linear",
                                                    "--config.rope.factor=nan"), 2, "config.rope.factor"),
    C("train-factors-not-monotone", lambda e, t: e.train(
        t / "out", "--config.rope.type=longrope",
        f"--config.rope.factors_file={_factors(t / 'f.json', [1, 2, 3, 4, 3, 6, 7, 8])}"), 2, "f.json", "not monotone"),
    C("train-factors-other-head-dim", lambda e, t: e.train(
        t / "out", "--config.rope.type=longrope", f"--config.rope.factors_file={_factors(t / 'f.json', [1.0] * 4)}"),
      2, "f.json", "has 4 values", "expected rotary_dim/2 = 8"),
    C("train-files-empty", lambda e, t: e.train(t / "out", f"--config.data.source=files:{t / 'c' / '*.txt'}"), 2,
      "*.txt", "empty", setup=lambda e, t: _write(t / "c" / "a.txt", "")),
    C("train-files-binary", lambda e, t: e.train(t / "out", f"--config.data.source=files:{t / 'c' / '*.txt'}"), 2,
      "b.txt", "byte 5", setup=lambda e, t: _write(t / "c" / "b.txt", b"hello\xff\xfe\x00")),
    C("train-files-no-match", lambda e, t: e.train(t / "out", f"--config.data.source=files:{t / 'none' / '*.txt'}"), 2,
      "no file matches"),
    C("train-tokenizer-bigger-than-model", lambda e, t: e.train(t / "out", f"--config.data.tokenizer=hf:{e.big_tok}"),
      2, "vocab_size 264", "306"),
    C("train-init-from-missing", lambda e, t: e.train(t / "out", f"--config.init_from=hf:{t / 'nope'}"), 2, "nope"),
    C("train-gs-workdir-no-gcsfs", lambda e, t: e.train("gs://bucket/run"), 1, "gs://bucket/run", "gcsfs",
      target=lambda e, t: t / "unused"),
    C("train-workdir-is-file", lambda e, t: e.train(t / "out"), 2, "out", "not a directory",
      setup=lambda e, t: _write(t / "out", "x")),
    C("train-resume-other-model", lambda e, t: e.train(e.run, "--config.model.hidden_size=128"), 2,
      "params/embed_tokens/embedding", "(264, 64)", "(264, 128)", target=lambda e, t: e.run),

    # ---- eval ----
    C("eval-length-beyond-every-doc", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                                    "--data-dir", e.kjv, "--lengths", "64", "--min-tokens", "1",
                                                    "--max-tokens", "40", "--docs", "2", "--no-progress"], 2,
      "perplexity length 64", "the longest", "40 tokens"),
    C("eval-factors-not-monotone", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                                 "--lengths", "32", "--method",
                                                 f"lr=longrope:{_factors(t / 'f.json', [2, 1] * 4)}"], 2,
      "f.json", "not monotone"),
    C("eval-factors-other-head-dim", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                                   "--lengths", "32", "--method",
                                                   f"lr=longrope:{_factors(t / 'f.json', [1.0] * 16)}"], 2,
      "f.json", "expected rotary_dim/2 = 8"),
    C("eval-tokenizer-bigger-than-model", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                                        "--lengths", "32", "--tokenizer", f"hf:{e.big_tok}"], 2,
      "big_tok", "vocab_size 264"),
    C("eval-model-missing", lambda e, t: ["eval", "--model", f"jax:{t / 'nope'}", "--workdir", str(t / "out"),
                                          "--lengths", "32"], 2, "nope"),
    C("eval-model-bad-spec", lambda e, t: ["eval", "--model", str(e.jax), "--workdir", str(t / "out"), "--lengths",
                                           "32"], 2, "--model", "hf:DIR"),
    C("eval-model-gs", lambda e, t: ["eval", "--model", "hf:gs://bucket/m", "--workdir", str(t / "out"), "--lengths",
                                     "32"], 2, "gs://bucket/m"),
    C("eval-data-empty", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"), "--lengths",
                                       "32", "--data", f"files:{t / 'c' / '*.jsonl'}"], 2, "*.jsonl", "empty",
      setup=lambda e, t: _write(t / "c" / "a.jsonl", '{"text": ""}\n')),
    C("eval-data-binary-jsonl", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                              "--lengths", "32", "--data", f"files:{t / 'c' / '*.jsonl'}"], 2,
      "a.jsonl:2", "byte 15", setup=lambda e, t: _write(t / "c" / "a.jsonl", b'{"text": "ok"}\n\xff\n')),
    C("eval-length-one", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"), "--lengths",
                                       "1"], 2, "perplexity length"),
    C("eval-ruler-unknown-task", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"), "--ruler",
                                               "niah_single_1,qa_1", "--ruler-lengths", "1024"], 2, "--ruler task 'qa_1'",
      "unknown"),
    C("eval-ruler-length-zero", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"), "--ruler",
                                              "vt", "--ruler-lengths", "1024,0"], 2, "--ruler-lengths", "got 0"),
    C("eval-ruler-samples-zero", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"), "--ruler",
                                               "vt", "--ruler-lengths", "1024", "--ruler-samples", "0"], 2,
      "--ruler-samples", "got 0"),
    C("eval-ruler-length-too-short", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                                   "--ruler", "vt", "--ruler-lengths", "300"], 2,
      "--ruler-lengths 300", "too short for task vt"),
    C("eval-ruler-without-lengths", lambda e, t: ["eval", "--model", f"jax:{e.jax}", "--workdir", str(t / "out"),
                                                  "--ruler", "vt"], 2, "--ruler-lengths"),

    # ---- search ----
    C("search-target-not-longer", lambda e, t: ["search", "--model", f"jax:{e.jax}", "--target-length", "64",
                                                "--out", str(t / "out")], 2, "target_length 64", "original length 64"),
    C("search-init-factors-not-monotone", lambda e, t: [
        "search", "--model", f"jax:{e.jax}", "--target-length", "128", "--out", str(t / "out"), "--init-factors",
        str(_write(t / "f.csv", "1\n2\n3\n2\n5\n6\n7\n8\n"))], 2, "f.csv", "not monotone"),
    C("search-init-factors-other-head-dim", lambda e, t: [
        "search", "--model", f"jax:{e.jax}", "--target-length", "128", "--out", str(t / "out"), "--init-factors",
        str(_write(t / "f.csv", "1\n2\n3\n4\n"))], 2, "f.csv", "expected 8"),
    C("search-mutation-prob", lambda e, t: ["search", "--model", f"jax:{e.jax}", "--target-length", "128", "--out",
                                            str(t / "out"), "--mutation-prob", "2"], 2, "mutation_prob"),
    C("search-model-missing", lambda e, t: ["search", "--model", f"hf:{t / 'nope'}", "--target-length", "128",
                                            "--out", str(t / "out")], 2, "nope"),
    C("search-tokenizer-bigger-than-model", lambda e, t: [
        "search", "--model", f"jax:{e.jax}", "--target-length", "128", "--out", str(t / "out"), "--tokenizer",
        f"hf:{e.big_tok}"], 2, "big_tok", "vocab_size 264"),
    C("search-target-not-int", lambda e, t: ["search", "--model", f"jax:{e.jax}", "--target-length", "lots", "--out",
                                             str(t / "out")], 2, "--target-length"),

    # ---- extend ----
    C("extend-config-missing", lambda e, t: ["extend", "--config", str(t / "nope.py"), "--workdir", str(t / "out")], 2,
      "nope.py", "not found"),
    C("extend-config-syntax", lambda e, t: ["extend", "--config", str(t / "c.py"), "--workdir", str(t / "out")], 2,
      "c.py:1", setup=lambda e, t: _write(t / "c.py", "def get_config(:\n")),
    C("extend-model-missing", lambda e, t: ["extend", "--config", str(EXTEND_TINY), "--workdir", str(t / "out"),
                                            f"--config.model=hf:{t / 'nope'}"], 2, "config.model", "nope"),
    C("extend-finetune-config-missing", lambda e, t: [
        "extend", "--config", str(EXTEND_TINY), "--workdir", str(t / "out"), f"--config.model=jax:{e.jax}",
        "--config.stage1_length=128", "--config.stage2_length=256", f"--config.finetune.config={t / 'nope.py'}"], 2,
      "config.finetune.config", "nope.py"),
    C("extend-finetune-steps-negative", lambda e, t: [
        "extend", "--config", str(EXTEND_TINY), "--workdir", str(t / "out"), f"--config.model=jax:{e.jax}",
        "--config.stage1_length=128", "--config.stage2_length=256", f"--config.finetune.config={TINY_CPU}",
        "--config.finetune.overrides.train.steps=-1"], 2, "config.train.steps"),
    C("extend-stage-lengths", lambda e, t: ["extend", "--config", str(EXTEND_TINY), "--workdir", str(t / "out"),
                                            "--config.stage1_length=4096", "--config.stage2_length=2048"], 2,
      "stage1_length 4096"),
    C("extend-unknown-key", lambda e, t: ["extend", "--config", str(EXTEND_TINY), "--workdir", str(t / "out"),
                                          "--config.serach.population=3"], 2, "unknown key 'serach'"),

    # ---- demo ----
    C("demo-workdir-is-file", lambda e, t: ["demo", "--workdir", str(t / "out")], 2, "out", "not a directory",
      setup=lambda e, t: _write(t / "out", "x")),
    C("demo-other-plan", lambda e, t: ["demo", "--workdir", str(t / "out"), "--quick"], 2, "plan.json",
      setup=lambda e, t: _write(t / "out" / "plan.json", "{}")),
    C("demo-unknown-flag", lambda e, t: ["demo", "--workdir", str(t / "out"), "--fast"], 2, "--fast"),

    # ---- data ----
    C("data-prepare-files", lambda e, t: ["data", "prepare", "files:x/*.txt"], 2, "files:x/*.txt",
      target=lambda e, t: t / "unused"),
    C("data-prepare-unknown-tfds", lambda e, t: ["data", "prepare", "tfds:no_such_dataset_xyz", "--data-dir",
                                                 str(t / "out")], 2, "no_such_dataset_xyz"),
    C("data-prepare-bad-spec", lambda e, t: ["data", "prepare", "s3:corpus"], 2, "s3:corpus",
      target=lambda e, t: t / "unused"),

    # ---- compile (its own checks; only what compile already does) ----
    C("compile-no-topology", lambda e, t: ["compile", "--config", str(TINY_CPU)], 2, "--topology",
      target=lambda e, t: t / "unused"),
    C("compile-bad-topology", lambda e, t: ["compile", "--config", str(TINY_CPU), "--topology", "v9x-3"], 2, "v9x-3",
      target=lambda e, t: t / "unused"),
    C("compile-config-missing", lambda e, t: ["compile", "--config", str(t / "nope.py"), "--topology", "v5p-8"], 2,
      "nope.py", target=lambda e, t: t / "unused"),
]


def snapshot(path: Path) -> dict | None:
    """{relative path: bytes} of every file under `path` (None if it does not exist)."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line_and_changes_nothing(case, env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LONGROPE_DEBUG", raising=False)
    if case.setup:
        case.setup(env, tmp_path)
    target = (case.target or (lambda e, t: t / "out"))(env, tmp_path)
    argv = case.argv(env, tmp_path)
    before = snapshot(target)
    if case.patch:
        case.patch(monkeypatch)
    if case.cwd:
        monkeypatch.chdir(case.cwd(env, tmp_path))
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == case.code, f"exit {rc}, expected {case.code}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in out + err, err
    if os.environ.get("SHOW_BAD_INPUT"):
        sys.__stdout__.write(f"\n[{case.id}] rc={rc}\n{err.strip()[-600:]}\n")
    if case.code == 0:
        return
    lines = [line for line in err.splitlines() if line.startswith(("longrope-jax", "usage:"))]
    assert lines, err
    message = err[err.index(lines[-1]):]
    assert len(message.strip().splitlines()) <= 4, message
    assert "\\n" not in message, message  # no Python repr with escaped newlines
    for name in case.names:
        assert str(name) in message, f"{name!r} not in: {message}"
    if "gs://" not in str(target):
        assert snapshot(target) == before, f"{target} changed"


def test_resume_with_another_model_leaves_config_json_untouched(env, capsys):
    before = (env.run / "config.json").read_bytes()
    assert cli.main(env.train(env.run, "--config.model.num_hidden_layers=3")) == 2
    err = capsys.readouterr().err
    assert "params/layers_2" in err and "missing there" in err, err
    assert (env.run / "config.json").read_bytes() == before


def test_no_traceback_end_to_end_and_debug_shows_it(tmp_path):
    # A separate interpreter: what a user sees, exit code and all. --debug adds the traceback.
    (tmp_path / "c.py").write_text("def get_config(:\n")
    cmd = [sys.executable, "-m", "longrope_jax", "train", "--config", str(tmp_path / "c.py"), "--workdir",
           str(tmp_path / "out")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("LONGROPE_DEBUG", None)
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stderr.strip().splitlines() == [
        f"longrope-jax train: error: --config {tmp_path / 'c.py'}:1: invalid syntax; expected a Python file "
        "with get_config()"], plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "invalid syntax" in debug.stderr
    assert not (tmp_path / "out").exists()
