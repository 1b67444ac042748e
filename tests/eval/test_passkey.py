"""Passkey retrieval: the prompt against the literal landmark-attention template, scoring, and the grid
with a stand-in generator and with the real one."""

import numpy as np
import pytest

from longrope_jax.data.tokenizer import ByteTokenizer
from longrope_jax.eval.passkey import evaluate_passkey, passkey_cells, score_passkey
from longrope_jax.rope import RopeScaling
from tests.eval.tiny_eval import eval_model_config

TASK_TEXT = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
             "I will quiz you about the important information there.")
NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUERY_TEXT = "What is the pass key? The pass key is"


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_is_the_landmark_template_exactly(depth):
    tok, key, length = ByteTokenizer(), 31337, 700
    ids = passkey_cells(tok, lengths=[length], depths=[depth], trials=1)[0][3][0].tolist()
    assert len(ids) == length and ids[0] == tok.bos_id
    text = bytes(ids[1:]).decode()
    key = int(text.split("The pass key is ")[1].split(".")[0])
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    noise = length - 1 - len("\n".join([TASK_TEXT, "", info, "", QUERY_TEXT]))
    haystack = " ".join([NOISE_TEXT] * 20)
    before = round(depth * noise)
    assert text == "\n".join([TASK_TEXT, haystack[:before], info, haystack[:noise - before], QUERY_TEXT])


def test_passkey_scoring_takes_the_first_integer_only():
    completions = [" 4242.", "no digits at all", " 42 4242", " 42420", "4242 is it"]
    assert score_passkey(completions, [4242] * 5) == [True, False, False, False, True]


def test_passkey_rows_from_a_stand_in_generator():
    tok, cfg = ByteTokenizer(), eval_model_config()
    calls = []

    def fake_generate(config, params, prompts_BxT, max_new_tokens, *, rope_scaling=None, temperature=0.0, eos_id=None,
                      **_):
        # Answers the key of even rows (then EOS and junk digits), nothing numeric for odd rows.
        calls.append((prompts_BxT.shape, rope_scaling, max_new_tokens))
        out = []
        for i, row in enumerate(prompts_BxT):
            key = bytes(int(t) for t in row if t < 256).decode().split("The pass key is ")[1].split(".")[0]
            answer = list(f" {key}.".encode()) + [eos_id] + list(b"99") if i % 2 == 0 else list(b" none")
            out.append((answer + [eos_id] * max_new_tokens)[:max_new_tokens])
        return np.asarray(out, np.int32)

    methods = {"a": None, "b": RopeScaling("linear", factor=2.0)}
    rows = evaluate_passkey(cfg, None, tok, lengths=[400, 500], depths=2, trials=3, methods=methods,
                                     generate_fn=fake_generate)
    assert len(calls) == 2 * 2 * 2  # one call per method x length x depth cell, all trials batched
    assert {c[0] for c in calls} == {(3, 400), (3, 500)} and {c[2] for c in calls} == {10}
    assert [c[1] for c in calls] == [None] * 4 + [methods["b"]] * 4
    assert [(r["method"], r["length"], r["depth"]) for r in rows] == [
        (m, n, d) for m in "ab" for n in (400, 500) for d in (0.0, 1.0)]
    for r in rows:
        assert (r["trials"], r["correct"], r["accuracy"]) == (3, 2, 2 / 3)
        assert r["samples"][0]["completion"] == f" {r['samples'][0]['key']}."  # cut at EOS
    # Every method sees the same keys.
    assert [s["key"] for s in rows[0]["samples"]] == [s["key"] for s in rows[4]["samples"]]


def test_passkey_length_shorter_than_the_template_is_a_clear_error():
    with pytest.raises(ValueError, match=r"passkey length 100: the template alone takes \d+ tokens"):
        passkey_cells(ByteTokenizer(), lengths=[100], depths=3, trials=2)


def test_passkey_with_the_real_generator_returns_well_formed_rows(model):
    cfg, params = model
    rows = evaluate_passkey(cfg, params, ByteTokenizer(), lengths=[300], depths=2, trials=2)
    assert len(rows) == 2
    for r in rows:
        assert set(r) == {"method", "length", "depth", "trials", "correct", "accuracy", "samples"}
        assert r["trials"] == 2 and 0 <= r["correct"] <= 2 and r["accuracy"] == r["correct"] / 2
        assert all(isinstance(s["completion"], str) and 1 <= s["key"] <= 50000 for s in r["samples"])


def test_passkey_on_a_mesh_gives_the_one_device_completions(model):
    """Prompts and KV caches split over 8 devices (the ring fills them): the same rows, completions included."""
    import dataclasses

    from longrope_jax.sharding.mesh import make_mesh

    cfg, params = model
    cfg = dataclasses.replace(cfg, attention="blockwise", attention_chunk=32)
    kw = dict(lengths=[300], depths=2, trials=2)
    one = evaluate_passkey(cfg, params, ByteTokenizer(), **kw)
    assert evaluate_passkey(cfg, params, ByteTokenizer(), mesh=make_mesh(fsdp=2, seq=4), **kw) == one
