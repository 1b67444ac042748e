"""`longrope-jax compile` on the tiny config for a small TPU slice: every kernel and program compiles with
libtpu's compiler on this CPU machine, and bad input gets a one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longrope_jax import cli
from longrope_jax.aot import topology

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.py")

# (kernel, mesh data,fsdp,seq,tensor): every attention the train step can use on a 4-chip slice.
KERNELS = {
    "dense": ("dense", (1, 4, 1, 1), True),
    "blockwise": ("blockwise", (1, 4, 1, 1), True),
    "ring_zigzag": ("ring", (1, 2, 2, 1), True),
    "ring_contiguous": ("ring", (1, 2, 2, 1), False),
    "splash": ("splash", (1, 2, 1, 2), True),
    "ring_pallas": ("ring", (1, 2, 2, 1), True),  # 1024 tokens: 256-token zig-zag parts, Pallas flash blocks
}


def compile_args(kernel: str, programs: str) -> list:
    attention, (d, f, s, t), zigzag = KERNELS[kernel]
    return ["compile", "--config", TINY, "--topology", "v5p:2x2x1", "--programs", programs,
            f"--config.model.attention={attention}", "--config.model.attention_chunk=128",
            f"--config.model.ring_zigzag={zigzag}", f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}",
            f"--config.mesh.seq={s}", f"--config.mesh.tensor={t}", "--config.train.batch_size=4",
            "--config.eval.batch_size=4"] + (["--config.train.seq_len=1024"] if kernel == "ring_pallas" else [])


def rows_of(out: str) -> dict:
    return {r["program"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_tiny_model_compiles_for_a_tpu_slice_with_every_kernel(kernel, capsys):
    programs = {"dense": "train,perplexity,prefill,decode", "ring_zigzag": "train,search,prefill,decode"}.get(kernel, "train")
    assert cli.main(compile_args(kernel, programs)) == 0
    rows = rows_of(capsys.readouterr().out)
    assert sorted(rows) == sorted(programs.split(","))
    for r in rows.values():
        assert r["fits"] and r["topology"] == "v5p:2x2x1" and 0 < r["total_gib"] < r["hbm_gib"]
        assert r["params_and_state_gib"] > 0 and r["largest_buffers"]
    train = rows["train"]
    # tiny_cpu: ~1.0M parameters; AdamW keeps two moments, so the state is ~3x the fp32 params per chip share.
    assert train["tflops_per_chip"] > 0 and train["tokens_per_s_per_chip_at_40pct_mfu"] > 0


def test_splash_rejects_a_split_sequence_before_compiling(capsys):
    args = compile_args("splash", "train")
    args[args.index("--config.mesh.seq=1")] = "--config.mesh.seq=2"
    args[args.index("--config.mesh.tensor=2")] = "--config.mesh.tensor=1"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "attention 'splash' needs config.mesh.seq == 1" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    (("--topology", "v9-8"), "--topology 'v9-8': expected a slice name such as v5p-256"),
    (("--config.mesh.fsdp=4", "--config.mesh.fsdp=8"), "does not match the slice's 4 chips"),
    (("--programs", "train,bogus"), "unknown ['bogus']"),
    (("--config.train.batch_size=4", "--config.train.batch_size=-4"), "batch_size"),
])
def test_bad_input_exits_2_with_one_line(change, message, capsys):
    args = compile_args("dense", "train")
    old, new = change
    if old.startswith("--config"):
        args[args.index(old)] = new
    else:
        args[args.index(old) + 1] = new
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_topology_is_required(capsys):
    args = compile_args("dense", "train")
    i = args.index("--topology")
    assert cli.main(args[:i] + args[i + 2:]) == 2
    err = capsys.readouterr().err.strip()
    assert "--topology is required" in err and len(err.splitlines()) == 1


def test_missing_libtpu_is_one_line_naming_the_extra_and_exit_1(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)
    assert cli.main(compile_args("dense", "train")) == 1
    err = capsys.readouterr().err.strip()
    assert "libtpu is not installed" in err and "pip install -e '.[tpu]'" in err and len(err.splitlines()) == 1


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu now raises ImportError
    with pytest.raises(topology.MissingLibtpu, match=r"pip install -e '\.\[tpu\]'"):
        topology.tpu_devices(topology.parse_topology("v5p:2x2x1"))


def test_a_program_that_does_not_fit_exits_2_with_the_compilers_figures(tmp_path):
    # Dense attention at 64k tokens: [heads, L, L] fp32 scores are 32 GiB, more than a v5e chip's 16 GiB.
    args = ["compile", "--config", TINY, "--topology", "v5e:1x1", "--programs", "eval", "--config.mesh.fsdp=1",
            "--config.train.seq_len=65536", "--config.model.max_position_embeddings=65536",
            "--config.eval.batch_size=1", "--config.train.batch_size=1"]
    proc = subprocess.run([sys.executable, "-m", "longrope_jax", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "eval does not fit in 90% of HBM on v5e:1x1" in last and "GiB" in last


def test_a_recipe_whose_factors_file_is_not_here_keeps_its_mixed_window():
    from longrope_jax.aot.cli import model_for
    from longrope_jax.train.trainer import parse_train_args

    root = Path(__file__).resolve().parents[2]
    c, _ = parse_train_args(["--config", str(root / "configs" / "llama3_8b_longrope2_128k.py"), "--workdir", "x"])
    said = []
    model = model_for(c, said.append)
    assert model.mixed_window is True and model.rope_scaling.rope_type == "longrope"
    assert any("factors_file" in s and "is not here" in s for s in said)
