"""Evaluation: sliding-window perplexity, method specs, passkey retrieval, outputs and the CLI.

References nobody here wrote for this module: transformers' loss with labels=-100 on each window (the
PI/YaRN protocol, run as their script does), a plain per-window loop over the unpadded model, and
dense attention without a mesh (for blockwise and ring under a mesh).
"""

import json
import math

import jax
import numpy as np
import pytest

from longrope_jax import cli
from longrope_jax.data.tokenizer import ByteTokenizer
from longrope_jax.eval import perplexity, report
from longrope_jax.eval.methods import parse_method, parse_methods
from longrope_jax.eval.passkey import evaluate_passkey, passkey_cells, score_passkey
from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.io.orbax_params import save_jax
from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.rope import RopeScaling
from longrope_jax.sharding import mesh as parallel

ORIG, D_HALF, BOS = 32, 4, 256
LONGROPE = RopeScaling("longrope", short_factor=(1.0, 1.2, 1.5, 2.0), long_factor=(1.0, 1.5, 3.0, 4.0),
                       original_max_position_embeddings=ORIG, factor=4.0)


def tiny_config(**kw) -> LlamaConfig:
    # A large init makes the random model's perplexity depend visibly on the rotary frequencies.
    return LlamaConfig(**{**dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIG,
                                 bos_token_id=BOS, eos_token_id=257, initializer_range=0.3), **kw})


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return cfg, jax.jit(lambda rng: init_params(cfg, rng))(jax.random.key(0))  # jitted: eager init is slow


def random_docs(sizes, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n) for n in sizes]


# ---- perplexity against references ------------------------------------------------------------------


def loop_reference(config, params, docs, length, stride, scaling=None, truncate=False, bos=BOS):
    """YaRN's loop, one unpadded window at a time through the model, float64 log-softmax."""
    apply = jax.jit(Llama(config).apply, static_argnames="rope_scaling")
    window_means, total, count = [], 0.0, 0
    for ids in docs:
        ids = list(ids[: length - 1]) if truncate else list(ids)
        step = length - 1 if truncate else stride
        prev = 0
        for begin in range(0, len(ids), step):
            end = min(begin + length - 1, len(ids))
            trg = end - prev
            window = np.asarray([bos] + ids[begin:end])
            logits = np.asarray(apply({"params": params}, window[None], rope_scaling=scaling)[0], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            nll = -logp[np.arange(len(window) - 1), window[1:]][-trg:]
            window_means.append(nll.mean())
            total, count = total + nll.sum(), count + trg
            prev = end
            if end == len(ids):
                break
    return math.exp(np.mean(window_means)), math.exp(total / count), len(window_means), count


def assert_rel(got, want, rel=2e-5):
    assert abs(got - want) <= rel * abs(want), f"{got} vs {want}"


def test_plan_windows_follow_the_yarn_loop():
    # 100 tokens, L = 48 (47 document tokens per window), stride 16: the last window is short.
    assert perplexity.plan_windows(100, 48, 16) == [(0, 47, 47), (16, 63, 16), (32, 79, 16), (48, 95, 16),
                                                    (64, 100, 5)]
    assert perplexity.plan_windows(100, 48) == [(0, 47, 47), (47, 94, 47), (94, 100, 6)]
    assert perplexity.plan_windows(100, 48, 16, truncate=True) == [(0, 47, 47)]
    assert perplexity.plan_windows(20, 48, 16) == [(0, 20, 20)]


@pytest.mark.parametrize("method", ["default", "dynamic", "longrope"])
def test_sliding_window_perplexity_equals_a_per_window_loop(model, method):
    cfg, params = model
    scaling = {"default": None, "dynamic": RopeScaling("dynamic", factor=2.0), "longrope": LONGROPE}[method]
    # 20 tokens: one window of 21 <= ORIG (LongRoPE's short factors) beside windows of 48 (long factors).
    docs = random_docs([100, 75, 20])
    rows = perplexity.evaluate_perplexity(cfg, params, docs, lengths=[48], methods={method: scaling}, stride=16,
                                          bos_id=BOS, batch_size=3)
    want_window, want_token, windows, tokens = loop_reference(cfg, params, docs, 48, 16, scaling)
    (row,) = rows
    assert (row["method"], row["length"], row["windows"], row["tokens"]) == (method, 48, windows, 195)
    assert tokens == 195  # every token scored exactly once
    assert_rel(row["ppl_window_mean"], want_window)
    assert_rel(row["ppl_token"], want_token)
    # Short last windows weigh as much as full ones in the papers' mean: the two numbers differ.
    assert abs(row["ppl_window_mean"] - row["ppl_token"]) > 1e-3 * row["ppl_token"]


def test_truncate_scores_the_first_window_of_each_document(model):
    cfg, params = model
    docs = random_docs([100, 75, 60], seed=1)
    rows = perplexity.evaluate_perplexity(cfg, params, docs, lengths=[32, 48], methods={"longrope": LONGROPE},
                                          truncate=True, bos_id=BOS)
    for row in rows:
        want_window, want_token, _, _ = loop_reference(cfg, params, docs, row["length"], None, LONGROPE, truncate=True)
        assert (row["windows"], row["tokens"]) == (3, 3 * (row["length"] - 1))
        assert_rel(row["ppl_window_mean"], want_window)
        assert_rel(row["ppl_token"], want_token)


def test_one_compile_per_method_and_length(model):
    cfg, params = model
    scorer = perplexity.WindowScorer(cfg, params)
    methods = {"pi": RopeScaling("linear", factor=2.0), "longrope": LONGROPE}
    rows = perplexity.evaluate_perplexity(cfg, params, random_docs([100, 75, 20]), lengths=[32, 48],
                                          methods=methods, stride=12, bos_id=BOS, batch_size=2, scorer=scorer)
    assert [(r["method"], r["length"]) for r in rows] == [("pi", 32), ("pi", 48), ("longrope", 32), ("longrope", 48)]
    assert scorer.traces == 4  # short windows are padded, never recompiled


def test_perplexity_matches_transformers_with_labels_minus_100(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from longrope_jax.io.hf import load_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    # Phi-3 style LongRoPE: short factors up to 32 positions, long ones beyond.
    d = json.loads((tmp_path / "config.json").read_text())
    d.pop("rope_parameters", None)
    d.update(max_position_embeddings=128, original_max_position_embeddings=ORIG, rope_theta=10000.0,
             rope_scaling={"type": "longrope", "short_factor": list(LONGROPE.short_factor),
                           "long_factor": list(LONGROPE.long_factor)})
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, params = load_hf(tmp_path)

    bos, length, stride = 1, 48, 20
    docs = random_docs([90, 30], vocab=97, seed=2)
    nlls, counts = [], []
    for ids in docs:  # the loop of yarn/eval/perplexity.py::compute_perplexity
        labels = torch.tensor(ids[None])
        prev_end = 0
        for begin in range(0, labels.size(1), stride):
            end = min(begin + length - 1, labels.size(1))
            trg_len = end - prev_end
            input_ids = torch.cat([torch.tensor([[bos]]), labels[:, begin:end]], dim=1)
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                nlls.append(float(hf(input_ids, labels=target_ids).loss))
            counts.append(trg_len)
            prev_end = end
            if end == labels.size(1):
                break
    (row,) = perplexity.evaluate_perplexity(config, params, docs, lengths=[length], stride=stride, bos_id=bos)
    assert row["windows"] == len(nlls) and row["tokens"] == sum(counts) == 120
    assert_rel(row["ppl_window_mean"], math.exp(np.mean(nlls)), rel=1e-4)
    assert_rel(row["ppl_token"], math.exp(np.dot(nlls, counts) / sum(counts)), rel=1e-4)


MESH_METHODS = {"default": None, "longrope": LONGROPE}


@pytest.fixture(scope="module")
def dense_rows(model):
    cfg, params = model
    return perplexity.evaluate_perplexity(cfg, params, random_docs([150, 40], seed=3), lengths=[64],
                                          methods=MESH_METHODS, stride=24, bos_id=BOS)


@pytest.mark.parametrize("attention", ["blockwise", "ring"])
def test_blockwise_and_ring_perplexity_on_a_mesh_equal_dense(model, dense_rows, attention):
    cfg, params = model
    methods, docs, want = MESH_METHODS, random_docs([150, 40], seed=3), dense_rows
    mesh = parallel.make_mesh(data=2, fsdp=1, seq=4, tensor=1)
    got = perplexity.evaluate_perplexity(cfg, params, docs, lengths=[64], methods=methods, stride=24, bos_id=BOS,
                                         attention=attention, attention_chunk=8, mesh=mesh)
    for g, w in zip(got, want, strict=True):
        assert (g["method"], g["windows"], g["tokens"]) == (w["method"], w["windows"], w["tokens"])
        assert_rel(g["ppl_window_mean"], w["ppl_window_mean"], rel=1e-5)
        assert_rel(g["ppl_token"], w["ppl_token"], rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[1]), "perplexity length: expected an integer >= 2, got 1"),
    (dict(lengths=[32, 48], stride=40), "stride 40: expected at most L - 1 = 31 for length 32"),
    (dict(lengths=[32], batch_size=3, attention="blockwise", mesh="2x4"), "batch_size 3: not a multiple of"),
    (dict(lengths=[36], attention="ring", mesh="2x4"), "perplexity length 36: not a multiple of 8"),
    (dict(lengths=[48], attention="blockwise", attention_chunk=32), "per-device length 48 is not a multiple of "
                                                                    "attention_chunk 32"),
    (dict(lengths=[32], attention="ring"), "attention 'ring': needs a mesh"),
    (dict(lengths=[32], documents=[[5, 300]]), "token ids reach 300; expected ids below the model's vocab_size 264"),
])
def test_bad_perplexity_input_names_the_value(model, kwargs, message):
    cfg, params = model
    kwargs = dict(kwargs)
    docs = kwargs.pop("documents", random_docs([50]))
    if kwargs.get("mesh") == "2x4":
        kwargs["mesh"] = parallel.make_mesh(data=2, fsdp=1, seq=4, tensor=1)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        perplexity.evaluate_perplexity(cfg, params, docs, bos_id=BOS, **kwargs)


def test_documents_are_the_first_long_enough_ones_in_order():
    docs = ["a" * 10, "b" * 50, "c" * 30, "d" * 60, "e" * 70]
    got = perplexity.select_documents(docs, ByteTokenizer(), docs=2, min_tokens=40, max_tokens=55)
    assert [bytes(g.tolist()) for g in got] == [b"b" * 50, b"d" * 55]
    with pytest.raises(ValueError, match="needs 3 documents of >= 60 tokens, found 2"):
        perplexity.select_documents(docs, ByteTokenizer(), docs=3, min_tokens=60)


# ---- method specs -------------------------------------------------------------------------------------


def test_method_specs_build_the_rope_scaling_they_name(tmp_path):
    cfg = tiny_config(rope_scaling=RopeScaling("linear", factor=3.0))
    factors = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIG,
               "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.0, 2.0, 3.0, 4.0], "start_tokens": 4}
    (tmp_path / "rope_scaling.json").write_text(json.dumps(factors))
    hf_config = {"model_type": "phi3", "max_position_embeddings": 128, "original_max_position_embeddings": 16,
                 "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4,
                                                         "long_factor": [2.0] * 4}}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    want = {
        "none": RopeScaling("linear", factor=3.0),
        "default": RopeScaling(),
        "linear:4": RopeScaling("linear", factor=4.0),
        "ntk:4": RopeScaling("ntk", factor=4.0),
        "dynamic:2.5": RopeScaling("dynamic", factor=2.5),
        "yarn:4": RopeScaling("yarn", factor=4.0, original_max_position_embeddings=24),
        "llama3:8": RopeScaling("llama3", factor=8.0, original_max_position_embeddings=24, low_freq_factor=1.0,
                                high_freq_factor=4.0),
        f"longrope:{tmp_path / 'rope_scaling.json'}": RopeScaling(
            "longrope", factor=4.0, original_max_position_embeddings=ORIG, short_factor=(1.0, 1.1, 1.2, 1.3),
            long_factor=(1.0, 2.0, 3.0, 4.0), start_tokens=4),
        f"longrope:{tmp_path / 'config.json'}": RopeScaling(
            "longrope", original_max_position_embeddings=16, short_factor=(1.0,) * 4, long_factor=(2.0,) * 4),
    }
    for spec, scaling in want.items():
        assert parse_method(spec, cfg, original_length=24) == scaling, spec
    # Unnamed specs are named by themselves; no spec at all is the model's own RoPE.
    methods, specs = parse_methods(["pi=linear:4", "yarn:4"], cfg)
    assert specs == {"pi": "linear:4", "yarn:4": "yarn:4"}
    assert methods["yarn:4"].original_max_position_embeddings == ORIG  # default: max_position_embeddings
    assert parse_methods(None, cfg)[0] == {"model": cfg.rope_scaling}


@pytest.mark.parametrize("spec, message", [
    ("rope:2", "method spec 'rope:2': unknown kind 'rope'"),
    ("linear:two", "method spec 'linear:two': expected linear:FACTOR with a number, got 'two'"),
    ("yarn:0.5", "method spec 'yarn:0.5': rope_scaling.factor: expected a number >= 1, got 0.5"),
    ("none:2", "method spec 'none:2': 'none' takes no argument"),
    ("longrope:missing.json", "missing.json not found"),
    ("longrope:short.json", "method spec 'longrope:short.json': rope_scaling.short_factor: has 2 values; "
                            "expected rotary_dim/2 = 4"),
    ("longrope:yarn.json", "has rope_type 'yarn'; expected a 'longrope' rope_scaling"),
])
def test_bad_method_specs_name_the_value(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.json").write_text(json.dumps({"rope_type": "longrope", "short_factor": [1, 1],
                                                     "long_factor": [2, 2]}))
    (tmp_path / "yarn.json").write_text(json.dumps({"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        parse_method(spec, tiny_config())


# ---- passkey ------------------------------------------------------------------------------------------


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
    tok, cfg = ByteTokenizer(), tiny_config()
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


# ---- outputs ------------------------------------------------------------------------------------------


def test_write_results_writes_json_plots_and_tables(tmp_path):
    ppl = [{"method": m, "length": n, "ppl_window_mean": v, "ppl_token": v * 1.1, "tokens": 10, "windows": 1}
           for m, base in (("pi", 5.0), ("yarn", 4.0)) for n, v in ((64, base), (128, base * 2))]
    ppl[-1]["ppl_window_mean"] = math.inf  # a diverged method must not break the plot
    pk = [{"method": m, "length": n, "depth": d, "trials": 4, "correct": c, "accuracy": c / 4, "samples": []}
          for m in ("pi", "yarn") for n in (300, 400) for d, c in ((0.0, 4), (1.0, 1))]
    paths = report.write_results(tmp_path / "out", config=tiny_config(), methods={"pi": {"rope_type": "linear"}},
                                 perplexity_rows=ppl, passkey_rows=pk, trained_length=ORIG)
    saved = json.loads(paths["json"].read_text())
    assert saved["perplexity"][:3] == ppl[:3] and saved["passkey"] == pk and saved["config"]["vocab_size"] == 264
    for key in ("perplexity_plot", "passkey_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = paths["summary"].read_text()
    assert "| method | 64 | 128 |" in summary and "| pi | 5 (5.5) | 10 (11) |" in summary
    assert "| yarn | 4 (4.4) | inf (8.8) |" in summary
    assert "| method | 300 | 400 |" in summary and "| pi | 0.62 | 0.62 |" in summary
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


# ---- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jax_model(tmp_path_factory, model) -> str:
    cfg, params = model
    return str(save_jax(cfg, params, tmp_path_factory.mktemp("ckpt") / "tiny"))


def test_cli_evaluates_methods_and_lengths_end_to_end(tmp_path, kjv_dir, jax_model, capsys):
    work = tmp_path / "eval"
    rc = cli.main(["eval", "--model", f"jax:{jax_model}", "--workdir", str(work), "--data-dir", kjv_dir,
                   "--lengths", "32,64", "--method", "base=none", "--method", "pi=linear:2", "--stride", "16",
                   "--docs", "2", "--max-tokens", "150", "--passkey-lengths", "300", "--passkey-depths", "2",
                   "--passkey-trials", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((work / "eval.json").read_text())
    assert saved["methods"] == {"base": None, "pi": {"rope_type": "linear", "factor": 2.0}}
    assert [(r["method"], r["length"]) for r in saved["perplexity"]] == [
        ("base", 32), ("base", 64), ("pi", 32), ("pi", 64)]
    assert all(r["tokens"] == 300 and math.isfinite(r["ppl_token"]) for r in saved["perplexity"])
    assert (work / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| base |" in (work / "summary.md").read_text()
    assert "| method | 32 | 64 |" in capsys.readouterr().out
    assert [(r["method"], r["depth"], r["trials"]) for r in saved["passkey"]] == [
        ("base", 0.0, 2), ("base", 1.0, 2), ("pi", 0.0, 2), ("pi", 1.0, 2)]
    assert saved["settings"]["passkey_depths"] == [0.0, 1.0]
    assert (work / "passkey.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--lengths", "1"], "perplexity length: expected an integer >= 2, got 1"),
    (["--lengths", "32,x"], "--lengths '32,x': expected comma-separated integers"),
    (["--lengths", "32", "--method", "bad=rope:2"], "method spec 'rope:2': unknown kind 'rope'"),
    (["--lengths", "32", "--docs", "50"], "needs 50 documents of >= 32 tokens, found 6"),
    (["--passkey-lengths", "100"], "passkey length 100: the template alone takes"),
    (["--lengths", "32", "--mesh", "1,2"], "--mesh '1,2': expected four sizes data,fsdp,seq,tensor"),
    (["--lengths", "32,64", "--stride", "40"], "stride 40: expected at most L - 1 = 31 for length 32"),
    ([], "nothing to do"),
])
def test_cli_bad_input_exits_2_naming_the_value(tmp_path, kjv_dir, jax_model, capsys, args, message):
    rc = cli.main(["eval", "--model", f"jax:{jax_model}", "--workdir", str(tmp_path / "w"), "--data-dir", kjv_dir,
                   "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "longrope-jax eval: error:" in err and message in err, err


def test_rope_json_files_fail_the_same_way_in_eval_and_training(tmp_path):
    from longrope_jax.train import config as config_lib

    (tmp_path / "list.json").write_text("[1.0, 2.0]")
    (tmp_path / "bad.json").write_text("{")
    cases = {"list.json": (ValueError, "holds a JSON list; expected a rope_scaling JSON object"),
             "bad.json": (ValueError, "is not valid JSON"),
             "missing.json": (FileNotFoundError, "not found; expected a rope_scaling JSON object")}
    for name, (error, message) in cases.items():
        with pytest.raises(error, match=f"longrope method: .*{name}.* {message}"):
            read_rope_scaling(tmp_path / name, "longrope method", 256)
        c = config_lib.default_config()
        c.rope.update(type="longrope", factors_file=str(tmp_path / name))
        with pytest.raises(error, match=f"config.rope.factors_file: .*{name}.* {message}"):
            config_lib.rope_scaling(c, RopeScaling())
