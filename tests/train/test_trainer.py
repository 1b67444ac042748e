"""Config-driven training on the bundled KJV corpus: exact resume, preemption, checkpoints, HF export,
and bad configs failing before anything compiles.

The reference for every resume test is an uninterrupted run of the same config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from longrope_jax.io.hf import load_hf
from longrope_jax.io.orbax_params import save_jax
from longrope_jax.model import Llama, init_params
from longrope_jax.train import config as config_lib
from longrope_jax.train.trainer import TrainingStopped, parse_train_args, train
from tests.tiny import REPO, TINY_CPU, tiny_train_config


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_params(workdir, step):
    mngr = ocp.CheckpointManager(Path(workdir) / "checkpoints", item_names=("state",))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored["state"]["params"]


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_resume_is_bit_exact(tmp_path, kjv_dir):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(tiny_train_config(kjv_dir), full)
    first = train(tiny_train_config(kjv_dir), cut, stop_at=3)
    assert first["stopped_at"] == 3 and first["preempted"]
    second = train(tiny_train_config(kjv_dir), cut)
    assert second["start_step"] == 3
    assert losses(cut) == losses(full) and len(losses(full)) == 6
    assert_trees_equal(final_params(cut, 6), final_params(full, 6))
    for name in ("config.json", "DONE"):
        assert (full / name).is_file()
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "tokens_per_s"} <= set(rows[0])
    assert any("eval_perplexity" in r for r in rows)


def test_leftover_tmp_checkpoint_is_ignored(tmp_path, kjv_dir):
    train(tiny_train_config(kjv_dir), tmp_path, stop_at=4)
    junk = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    junk.mkdir()
    (junk / "state").mkdir()
    (junk / "state" / "garbage").write_text("cut off mid-save")
    (tmp_path / "checkpoints" / "10").mkdir()  # a stray empty step, newer than the real ones: moved aside
    summary = train(tiny_train_config(kjv_dir), tmp_path)
    assert summary["start_step"] == 4 and summary["stopped_at"] == 6
    assert not junk.exists()
    assert (tmp_path / "checkpoints" / "corrupt-10").is_dir() and not (tmp_path / "checkpoints" / "10").exists()


def test_restore_onto_a_different_mesh(tmp_path, kjv_dir):
    # Saved with fsdp 2 x tensor 4, resumed with fsdp 8 x tensor 1.
    two_by_four = dict(mesh__fsdp=2, mesh__tensor=4, model__num_key_value_heads=4, data__shards=8)
    train(tiny_train_config(kjv_dir, **two_by_four), tmp_path / "run", stop_at=2)
    saved = final_params(tmp_path / "run", 2)
    eight_by_one = dict(mesh__fsdp=8, mesh__tensor=1, model__num_key_value_heads=4, data__shards=8)
    summary = train(tiny_train_config(kjv_dir, **eight_by_one), tmp_path / "run", stop_at=4)
    assert summary["start_step"] == 2
    reference = tmp_path / "reference"
    train(tiny_train_config(kjv_dir, **two_by_four), reference, stop_at=4)
    ref_losses = losses(reference)
    got = losses(tmp_path / "run")
    np.testing.assert_allclose([got[s] for s in (3, 4)], [ref_losses[s] for s in (3, 4)], rtol=1e-5)
    assert jax.tree.structure(saved) == jax.tree.structure(final_params(tmp_path / "run", 4))


def test_sigterm_saves_and_exits_zero(tmp_path, kjv_dir):
    cmd = [sys.executable, "-m", "longrope_jax", "train", "--config", str(TINY_CPU), "--workdir", str(tmp_path),
           "--config.train.steps=100000", "--config.train.seq_len=64", "--config.train.batch_size=8",
           "--config.model.hidden_size=64", "--config.model.num_hidden_layers=1", "--config.model.head_dim=16",
           "--config.model.max_position_embeddings=64", "--config.checkpoint.every_steps=100000",
           "--config.eval.every_steps=0", "--config.logging.every_steps=1", "--config.logging.progress=False",
           f"--config.data.data_dir={kjv_dir}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    step = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert (tmp_path / "checkpoints" / str(step)).is_dir()
    assert not (tmp_path / "DONE").exists()


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, kjv_dir):
    c = tiny_train_config(kjv_dir)
    model = config_lib.model_config(c)
    params = init_params(model, jax.random.key(0))
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(jnp.nan)
    save_jax(model, params, tmp_path / "poisoned")
    c.init_from = f"jax:{tmp_path / 'poisoned'}"
    c.train.max_consecutive_skips = 2
    with pytest.raises(TrainingStopped, match="2 consecutive non-finite steps"):
        train(c, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == 2
    assert not (tmp_path / "run" / "DONE").exists()


def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path, kjv_dir):
    c = tiny_train_config(kjv_dir, train__steps=2, rope__type="yarn", rope__factor=2.0,
                          rope__original_max_position_embeddings=32)
    c.export_hf = True
    train(c, tmp_path)
    config, params = load_hf(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    tokens = np.arange(48)[None] % 200
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens)))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    np.testing.assert_allclose(ours, np.asarray(Llama(config).apply({"params": final_params(tmp_path, 2)},
                                                                     jnp.asarray(tokens))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "override,match",
    [
        (["--config.train.stpes=3"], "stpes"),
        (["--config.mesh.fsdp=3"], "does not equal 8 devices|does not divide 8"),
        (["--config.train.batch_size=12"], "not divisible by the data-parallel size"),
        (["--config.mesh.fsdp=4", "--config.mesh.seq=2", "--config.model.attention=ring", "--config.train.seq_len=66"],
         "seq_len 66 is not divisible by 4"),
        (["--config.rope.type=longrope", "--config.rope.factors_file=MISSING.json"], "factors_file"),
        (["--config.rope.type=yarn"], "rope_scaling.factor: required"),
        (["--config.model.vocab_size=100"], "smaller than the tokenizer"),
        (["--config.model.loss_chunk=0"], "LlamaConfig.loss_chunk: expected a positive integer"),
        (["--config.model.loss_chunk=24"], "config.model.loss_chunk 24 does not divide the per-device length 256"),
        (["--config.profile.steps=3,2"], "config.profile.steps '3,2': expected 'N,M'"),
        (["--config.train.steps=-5"], "config.train.steps: -5; expected a positive integer"),
        (["--config.optimizer.lr=nan"], "config.optimizer.lr: nan; expected a finite number"),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, override, match):
    args = ["--config", str(TINY_CPU), "--workdir", str(tmp_path), "--config.train.steps=1", *override]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        config, workdir = parse_train_args(args)
        train(config, workdir)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
