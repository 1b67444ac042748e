"""RULER's synthetic tasks: prompts fitted to the length (byte tokenizer and a BPE), answers where the
definitions put them (needles at their depths), determinism by seed, RULER's scoring on hand-made
cases, the effective-length rule, stand-in generators that score 100 and 0, and `eval --ruler` end to end."""

import collections
import json
import re

import numpy as np
import pytest

from longrope_jax import cli
from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import ByteTokenizer, build_tokenizer
from longrope_jax.eval import ruler_tasks as rt
from longrope_jax.eval.ruler import (effective_length, evaluate_ruler, postprocess, ruler_samples, string_match_all,
                                     string_match_part, summarize)
from tests.eval.tiny_eval import eval_model_config

# Long enough for every task with each tokenizer (cwe's few-shot list is the longest template).
LENGTHS = {"byte": 2048, "bpe": 1536}


@pytest.fixture(scope="module")
def essay(kjv_dir):
    return rt.essay_words(open_source("kjv", "train", data_dir=kjv_dir))


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory, kjv_dir):
    """The byte tokenizer and a byte-level BPE of 1000 ids trained on KJV and RULER's templates."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    src = open_source("kjv", "validation", data_dir=kjv_dir)
    texts = [src[i] for i in range(len(src))] + [rt.NIAH_TEMPLATE, rt.NIAH_PREFIX, rt.VT_TEMPLATE, rt.VT_PREFIX,
                                                  rt.CWE_TEMPLATE, rt.CWE_PREFIX, rt.FWE_TEMPLATE, rt.FWE_PREFIX] * 20
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "pad_token": "<pad>"}))
    return {"byte": ByteTokenizer(), "bpe": build_tokenizer(f"hf:{d}")}


@pytest.mark.parametrize("kind", ["byte", "bpe"])
@pytest.mark.parametrize("task", rt.TASKS)
def test_every_task_fills_its_length_and_one_more_haystack_unit_would_not_fit(task, kind, tokenizers_, essay):
    tok, length = tokenizers_[kind], LENGTHS[kind]
    for s in rt.make_samples(task, tok, length, 2, essay=essay, seed=3):
        assert list(s.ids) == [tok.bos_id] + tok.encode(s.input + s.answer_prefix)
        assert len(s.ids) + s.max_new_tokens <= length
        assert len(s.ids) + s.max_new_tokens >= 0.85 * length, (task, kind, len(s.ids))
        assert s.max_new_tokens == rt.TOKENS_TO_GENERATE[rt.task_kind(task)]
        bigger = rt.build_sample(task, tok, length, s.index, seed=3, essay=essay, haystack=s.haystack + 1)
        assert len(bigger.ids) + s.max_new_tokens > length  # the binary search found the largest haystack
        assert bigger.outputs == s.outputs  # only the haystack grew


@pytest.mark.parametrize("task", list(rt.NIAH_TASKS))
def test_niah_needles_hold_the_answers_at_their_depths(task, essay):
    spec, tok = rt.NIAH_TASKS[task], ByteTokenizer()
    for s in rt.make_samples(task, tok, 4096, 2, essay=essay, seed=1):
        body = s.input.split("\n", 1)[1].rsplit("\n", 1)[0]  # the context, between the task and question lines
        keys = s.answer_prefix.split(" for ")[1].split(" mentioned")[0].replace(", and ", ", ").split(", ")
        assert len(keys) == spec.num_q and len(s.outputs) == spec.num_q * spec.num_v
        needles = list(re.finditer(r"One of the special magic (\w+) for (\S+) is: (\S+)\.", body))
        real = needles if spec.haystack == "essay" else [m for m in needles if m.group(3) in s.outputs]
        assert len(s.depths) == max(spec.num_k, spec.num_q) * spec.num_v
        assert all(m.group(1) == spec.value_type for m in needles)
        for value in s.outputs:  # exactly one needle holds each answer, under a key that is asked for
            (m,) = [m for m in needles if m.group(3) == value]
            assert m.group(2) in keys
        value_re = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                    "words": r"[a-z]+-[a-zA-Z]+"}[spec.value_type]
        assert all(re.fullmatch(value_re, v) for v in s.outputs + tuple(keys) if v in s.outputs or spec.key_type
                   == spec.value_type)
        assert s.depths == tuple(sorted(s.depths)) and all(round(d * 100) in rt.DEPTHS for d in s.depths)
        if spec.haystack == "essay":  # needle j follows int(sentences * depth_j) essay sentences
            rest = re.sub(r"One of the special magic \w+ for \S+ is: \S+\. ?", "", body).strip()
            units = len([p for p in re.split(r"(?<=[.!?])\s+", rest) if p])
            before = [len([p for p in re.split(r"(?<=[.!?])\s+", body[:m.start()].strip()) if p]) - j
                      for j, m in enumerate(real)]
        else:  # needle j follows int(n * depth_j) haystack lines (noise or distractor needles)
            lines = body.split("\n")
            assert len(lines) == s.haystack + len(s.depths)
            units = s.haystack
            real_rows = [i for i, line in enumerate(lines) if line != rt.NOISE] if spec.haystack == "noise" else [
                body[:m.start()].count("\n") for m in real]
            before = [row - j for j, row in enumerate(real_rows)]
        assert len(before) == len(s.depths)
        assert before == [int(units * d) for d in s.depths], (before, units, s.depths)


def test_niah_single_wording_and_multiquery_wording_follow_niah_py(essay):
    single = rt.make_samples("niah_single_1", ByteTokenizer(), 1024, 1)[0]
    assert single.input.startswith("A special magic number is hidden within the following text. Make sure to "
                                   "memorize it. I will quiz you about the number afterwards.\n")
    key = single.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    assert single.input.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert single.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {single.outputs[0]}." in single.input
    multi = rt.make_samples("niah_multiquery", ByteTokenizer(), 2048, 1, essay=essay)[0]
    assert multi.input.startswith("Some special magic numbers are hidden")
    assert re.search(r"for \S+, \S+, \S+, and \S+ mentioned in the provided text are$", multi.answer_prefix)


def test_vt_chain_is_in_the_prompt_after_a_one_shot_example():
    s = rt.make_samples("vt", ByteTokenizer(), 2048, 1, seed=5)[0]
    names = s.outputs
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(r"assigned the value (\d{5}) in the text above\.$", s.input).group(1)
    main = s.input.split("\n\n\n")[-1] if "\n\n\n" in s.input else s.input
    assert f"VAR {names[0]} = {value}\n" in main
    pos = [main.index(f"VAR {names[j + 1]} = VAR {names[j]} \n") for j in range(4)]
    assert pos == sorted(pos)
    assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, "
                               f"5 variables are assigned the value {value}, they are: ")
    # The one-shot example comes first, with 3-letter names and its answer written out.
    shot = s.input.split("Memorize and track")[1]
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n", shot)


def test_cwe_answers_are_the_ten_words_repeated_most():
    s = rt.make_samples("cwe", ByteTokenizer(), 2048, 1)[0]
    listed = s.input.rsplit("\n", 2)[-2]
    words = re.findall(r"\d+\. (\S+)", listed)
    counts = collections.Counter(words)
    assert len(s.outputs) == 10 and all(counts[w] == 6 for w in s.outputs)  # below 4096: 6 and 1
    assert all(c == 1 for w, c in counts.items() if w not in s.outputs)
    assert [int(i) for i in re.findall(r"(\d+)\. ", listed)] == list(range(1, len(words) + 1))


def test_fwe_answers_are_the_three_most_frequent_coded_words():
    s = rt.make_samples("fwe", ByteTokenizer(), 2048, 1)[0]
    counts = collections.Counter(s.input.split("coded words. ")[1].split("\nQuestion")[0].split(" "))
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert counts.most_common(1)[0][0] == "..."
    assert set(s.outputs) == set(ranked[:3]) and counts[ranked[2]] > counts[ranked[3]]
    assert len(counts) - 1 <= rt.fwe_vocab_size(2048) - 1


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_single_2", "vt", "cwe", "fwe"])
def test_same_seed_same_samples_other_seed_other_samples(task, essay):
    tok = ByteTokenizer()
    a = rt.make_samples(task, tok, 2048, 2, seed=7, essay=essay)
    assert a == rt.make_samples(task, tok, 2048, 2, seed=7, essay=essay)
    assert rt.make_samples(task, tok, 2048, 1, seed=7, essay=essay)[0] == a[0]  # independent of the count
    b = rt.make_samples(task, tok, 2048, 2, seed=8, essay=essay)
    assert a[0].outputs != b[0].outputs and a[0].input != b[0].input and a[0].input != a[1].input


def test_scoring_matches_rulers_definitions_on_hand_made_cases():
    preds = ["The numbers are 1234567 and 7654321.", "Nothing here", "ABC-def"]
    refs = [["1234567", "7654321"], ["1234567"], ["abc-DEF", "x"]]
    assert string_match_all(preds, refs) == round((1 + 0 + 0.5) / 3 * 100, 2) == 50.0
    assert string_match_part(preds, refs) == round((1 + 0 + 1) / 3 * 100, 2) == 66.67
    assert string_match_all(["a"], [["a", "b", "c"]]) == 33.33
    assert postprocess("  \x00 7654321\tand\x1f1234567 \n") == "7654321\nand\n1234567"
    with pytest.raises(ValueError, match="one non-empty reference list per prediction"):
        string_match_all(["a"], [[]])


def test_effective_length_is_the_longest_length_up_to_which_the_average_holds():
    assert effective_length({4096: 95.0, 8192: 85.6, 16384: 80.0, 32768: 90.0}) == 8192
    assert effective_length({4096: 85.59, 8192: 99.0}) is None
    assert effective_length({8192: 90.0, 4096: 88.0}) == 8192
    rows = [{"method": "m", "task": t, "length": n, "score": s}
            for t, n, s in [("a", 1, 100.0), ("b", 1, 80.0), ("a", 2, 90.0), ("b", 2, 70.0)]]
    assert summarize(rows) == {"m": {"average": {1: 90.0, 2: 80.0}, "effective_length": 1}}


def _stand_in(cells, tokenizer, right: bool, calls: list):
    """A generator that answers every prompt with its references (right) or with 'unknown'."""
    answers = {s.ids: " " + " ".join(s.outputs) for group in cells.values() for s in group}  # vt: 30 bytes

    def generate(config, params, prompts_BxT, max_new_tokens, *, rope_scaling=None, temperature=0.0, eos_id=None,
                 **_):
        calls.append((prompts_BxT.shape, max_new_tokens))
        out = []
        for row in prompts_BxT:
            text = answers[tuple(int(t) for t in row)] if right else " unknown"
            ids = tokenizer.encode(text) + [eos_id]
            out.append((ids + [eos_id] * max_new_tokens)[:max_new_tokens])
        return np.asarray(out, np.int32)
    return generate


@pytest.mark.parametrize("right, score", [(True, 100.0), (False, 0.0)])
def test_a_stand_in_that_answers_right_scores_100_and_one_that_does_not_scores_0(right, score):
    tok, cfg = ByteTokenizer(), eval_model_config()
    cells = ruler_samples(tok, tasks=["niah_single_1", "vt", "fwe"], lengths=[1024], samples=3, seed=2)
    calls = []
    rows = evaluate_ruler(cfg, None, tok, tasks=["niah_single_1", "vt", "fwe"], lengths=[1024], cells=cells,
                          batch_size=2, generate_fn=_stand_in(cells, tok, right, calls), methods={"m": None})
    assert [(r["method"], r["task"], r["length"], r["samples"], r["score"]) for r in rows] == [
        ("m", t, 1024, 3, score) for t in ("niah_single_1", "vt", "fwe")]
    assert summarize(rows)["m"]["effective_length"] == (1024 if right else None)
    # Equal-length prompts share a call, at most batch_size rows each; every prompt is decoded once.
    sizes = {t: collections.Counter(len(s.ids) for s in cells[t, 1024]) for t, _ in cells}
    want = sorted((n, min(2, c - i)) for t in sizes for n, c in sizes[t].items() for i in range(0, c, 2))
    assert sorted((shape[1], shape[0]) for shape, _ in calls) == want
    assert {m for _, m in calls} == {128, 30, 50}


def test_eval_cli_runs_ruler_end_to_end_and_deterministically(tmp_path, kjv_dir, jax_model, capsys):
    argv = ["eval", "--model", f"jax:{jax_model}", "--data-dir", kjv_dir, "--ruler", "niah_single_1,vt",
            "--ruler-lengths", "1024", "--ruler-samples", "2", "--no-progress"]  # one method: each compiles ~15 s
    assert cli.main([*argv, "--workdir", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert "## RULER" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert [(r["method"], r["task"], r["length"], r["samples"]) for r in saved["ruler"]] == [
        ("model", t, 1024, 2) for t in ("niah_single_1", "vt")]
    for r in saved["ruler"]:
        assert 0.0 <= r["score"] <= 100.0 and r["prompt_tokens"] <= 1024 - 30
        assert all(isinstance(e["prediction"], str) and e["outputs"] for e in r["examples"])
    summary = saved["ruler_summary"]
    for m in ("model",):
        avg = np.mean([r["score"] for r in saved["ruler"] if r["method"] == m])
        assert summary[m]["average"] == {"1024": round(float(avg), 2)}
        assert summary[m]["effective_length"] == (1024 if avg >= 85.6 else None)
    assert saved["settings"]["ruler_tasks"] == ["niah_single_1", "vt"]
    md = (tmp_path / "a" / "summary.md").read_text()
    assert "## RULER" in md and "### model" in md and "| **average** |" in md and "| vt |" in md
    assert (tmp_path / "a" / "ruler.png").read_bytes()[:4] == b"\x89PNG"
    # The same command gives the same prompts and the same greedy completions.
    assert cli.main([*argv, "--workdir", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert again["ruler"] == saved["ruler"]


@pytest.mark.parametrize("args, message", [
    (["--ruler", "niah_single_1,nope", "--ruler-lengths", "1024"], "--ruler task 'nope': unknown"),
    (["--ruler", "vt", "--ruler-lengths", "-5"], "--ruler-lengths: expected an integer >= 1, got -5"),
    (["--ruler", "vt", "--ruler-lengths", "1024", "--ruler-samples", "0"], "--ruler-samples: expected an integer >= 1"),
    (["--ruler", "niah_single_1", "--ruler-lengths", "200"], "--ruler-lengths 200: too short for task niah_single_1"),
    (["--ruler", "vt,vt", "--ruler-lengths", "1024"], "a task is named twice"),
])
def test_bad_ruler_input_exits_2_naming_the_flag(tmp_path, kjv_dir, jax_model, capsys, args, message):
    rc = cli.main(["eval", "--model", f"jax:{jax_model}", "--workdir", str(tmp_path / "w"), "--data-dir", kjv_dir,
                   "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_ruler_on_smollm2_at_a_short_length_is_deterministic(tmp_path, kjv_dir, smollm2, capsys):
    argv = ["eval", "--model", f"hf:{smollm2}", "--data-dir", kjv_dir, "--ruler", "niah_single_1",
            "--ruler-lengths", "512", "--ruler-samples", "2", "--attention-chunk", "128", "--no-progress"]
    runs = []
    for name in ("a", "b"):
        assert cli.main([*argv, "--workdir", str(tmp_path / name)]) == 0, capsys.readouterr().err
        runs.append(json.loads((tmp_path / name / "eval.json").read_text())["ruler"])
    assert runs[0] == runs[1]
    (row,) = runs[0]
    assert row["task"] == "niah_single_1" and row["samples"] == 2 and row["prompt_tokens"] <= 512 - 128
    assert all(e["outputs"] for e in row["examples"])  # SmolLM2's tokenizer and greedy decoding end to end
