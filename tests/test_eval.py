"""sf-eval: the answer scoring, the statistics on hand-worked numbers, both questions-file conventions and their
errors, and the command on a fake runtime and reference (no bundle, no torch: seconds)."""
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sfedge.eval import cli, report
from sfedge.eval.data import Question, by_video, load_questions
from sfedge.eval.scoring import choose
from sfedge.eval.stats import (bootstrap_accuracy, flip_rate, mcnemar, mcnemar_p, option_agreement, option_kl,
                               sure_flips)
from sfedge.runtime.errors import BackendUnavailable, BadInput, GraphFailed

COLORS = ["red", "blue", "green", "yellow"]


# --- scoring ---

@pytest.mark.parametrize("text, index, kind", [
    ("Best option:(B) red", 1, "letter"),  # the runtime's answers: the prefill, then the model's text
    ("Best option:(C", 2, "letter"),
    ("A", 0, "letter"),
    ("(D) yellow", 3, "letter"),
    ("Based on the video, the answer is B.", 1, "letter"),  # "Based": a word, not option B
    ("I think (C) is right", 2, "letter"),  # "I" is out of range for 4 options
    ("The Answer is: D", 3, "letter"),
    ("Best option:(the ball is green", 2, "text"),
    ("a dog that is BLUE", 1, "text"),  # a leading lower-case "a" is the article
    ("red or blue", None, "unparsed"),  # two options named
    ("the redness of it", None, "unparsed"),  # whole words only
    ("Best option:(E) purple", None, "unparsed"),  # a letter out of range
    ("(a) red-ish", 0, "text"),  # "(a)" is not read as a letter; "red" is a whole word
    ("Best option:(", None, "empty"),
    ("   ", None, "empty"),
    (None, None, "empty"),
])
def test_choose(text, index, kind):
    assert tuple(choose(text, COLORS)) == (index, kind)


def test_choose_by_log_probabilities_ignores_the_text():
    """The "text" choice: each option's text was scored as the answer, and the likeliest is chosen."""
    assert choose("", COLORS, [-3.0, -0.1, -2.0, -5.0]) == (1, "likeliest")
    assert choose("Best option:(A) red", COLORS, [-3.0, -2.0, -0.5, -5.0]) == (2, "likeliest")


def test_choose_counts_letters_of_these_options_only():
    assert choose("C", ["yes", "no"]) == (None, "unparsed")
    assert choose("B", ["yes", "no"]) == (1, "letter")


# --- statistics ---

def test_bootstrap_all_right_is_certain():
    assert bootstrap_accuracy([True] * 6, ["a", "a", "b", "b", "c", "c"]) == (1.0, 1.0, 1.0)


def test_bootstrap_resamples_videos_not_questions():
    # Video a: 1 question, right; video b: 3, wrong. Resampling two videos gives {a,a} 1 (p 1/4), {a,b} 1/4 (p 1/2),
    # {b,b} 0 (p 1/4): the 2.5th and 97.5th percentiles are 0 and 1 around the point estimate 1/4.
    assert bootstrap_accuracy([True, False, False, False], ["a", "b", "b", "b"]) == (0.25, 0.0, 1.0)


def test_bootstrap_interval_narrows_with_more_videos_and_widens_with_clustering():
    def videos(n):  # n videos of 5 questions, every other one all right
        return [i % 2 == 0 for i in range(n) for _ in range(5)], [i for i in range(n) for _ in range(5)]

    few, many = bootstrap_accuracy(*videos(4)), bootstrap_accuracy(*videos(40))
    for acc, low, high in (few, many):
        assert acc == 0.5 and low < acc < high
    assert few[2] - few[1] > many[2] - many[1]
    correct, clusters = videos(40)
    as_if_independent = bootstrap_accuracy(correct, list(range(len(correct))))
    assert as_if_independent[2] - as_if_independent[1] < many[2] - many[1]


def test_bootstrap_is_seeded():
    correct, clusters = [True, False, True, True, False, True], [0, 0, 1, 2, 2, 3]
    assert bootstrap_accuracy(correct, clusters) == bootstrap_accuracy(correct, clusters)


@pytest.mark.parametrize("b, c, p", [(0, 5, 0.0625), (5, 0, 0.0625), (3, 3, 1.0), (1, 9, 2 * (1 + 10) / 1024),
                                     (0, 0, 1.0), (0, 1, 1.0)])
def test_mcnemar_exact(b, c, p):
    assert mcnemar_p(b, c) == pytest.approx(p)


def test_mcnemar_counts_discordant_pairs():
    bundle = [True, True, False, False, True]
    reference = [True, False, True, True, False]
    assert mcnemar(bundle, reference) == (2, 2, 1.0)


def test_flip_rate_counts_no_choice_as_a_choice():
    assert flip_rate([0, 1, None, 2], [0, 2, None, None]) == (2, 0.5)


def test_sure_flips_count_only_questions_the_reference_is_sure_of():
    # renormalised over the options: [.45, .05] is [.9, .1] (sure); [.5, .5] and [.7, .3] are not at 0.8
    ref = [np.log([0.45, 0.05]), np.log([0.5, 0.5]), np.log([0.7, 0.3]), np.log([0.85, 0.15])]
    assert sure_flips(ref, [1, 1, 1, 0], [0, 0, 0, 0], 0.8) == (2, 1)  # the first flipped, the last kept
    assert sure_flips(ref, [1, 1, 1, 0], [0, 0, 0, 0], 0.5) == (4, 3)


def test_option_kl():
    # Renormalised over the options: [.1, .3] of the vocabulary is [.25, .75], the same as [.2, .6].
    assert option_kl(np.log([0.1, 0.3]), np.log([0.2, 0.6])) == pytest.approx(0, abs=1e-12)
    # KL([.5, .5] || [.25, .75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert option_kl(np.log([0.4, 0.4]), np.log([0.1, 0.3])) == pytest.approx(0.5 * math.log(4 / 3))


def test_option_agreement():
    ref = [np.log([0.5, 0.5]).tolist(), np.log([0.9, 0.1]).tolist()]
    bundle = [np.log([0.25, 0.75]).tolist(), np.log([0.9, 0.1]).tolist()]
    mean, largest, top1 = option_agreement(ref, bundle)
    assert mean == pytest.approx(0.25 * math.log(4 / 3)) and largest == pytest.approx(0.5 * math.log(4 / 3))
    assert top1 == 0.5  # argmax of the tie [.5, .5] is A, the bundle's B


# --- the questions file ---

def _write(folder: Path, records, name="questions.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture()
def clips(tmp_path):
    (tmp_path / "clips").mkdir()
    for name in ("a.mp4", "b.mp4", "broken.mp4"):
        (tmp_path / "clips" / name).write_bytes(b"not decoded by these tests")
    return tmp_path


MVBENCH = {"id": "q1", "video": "clips/a.mp4", "question": "What color is the ball?",
           "candidates": ["red", "blue", "green"], "answer": "blue", "category": "color"}
VIDEO_MME = {"question_id": "q1", "video": "clips/a.mp4", "question": "What color is the ball?",
             "options": ["A. red", "B. blue", "C. green"], "answer": "B", "task_type": "color"}


def test_both_conventions_read_alike(clips):
    mv = load_questions(_write(clips, [MVBENCH], "mv.jsonl"))
    mme = load_questions(_write(clips, [VIDEO_MME], "mme.jsonl"))
    want = Question("q1", clips / "clips" / "a.mp4", "What color is the ball?", ["red", "blue", "green"], 1, "color", 1)
    assert mv == mme == [want]
    assert want.video.is_absolute()


def test_limit_category_and_grouping(clips):
    records = [dict(MVBENCH, id=f"q{i}", video=f"clips/{v}.mp4", category=None) for i, v in enumerate("abab")]
    path = _write(clips, ["", *records])  # a blank line is skipped, and still counted in the line numbers
    questions = load_questions(path)
    assert [q.line for q in questions] == [2, 3, 4, 5] and {q.category for q in questions} == {"uncategorized"}
    groups = by_video(questions)
    assert [(v.name, [q.id for q in qs]) for v, qs in groups] == [("a.mp4", ["q0", "q2"]), ("b.mp4", ["q1", "q3"])]
    assert [q.id for q in load_questions(path, limit=3)] == ["q0", "q1", "q2"]


@pytest.mark.parametrize("records, line, words", [
    ([dict(MVBENCH, video="clips/missing.mp4")], 1, "missing.mp4 does not exist"),
    ([dict(MVBENCH, answer="purple")], 1, "not one of the candidates"),
    ([dict(VIDEO_MME, answer="D")], 1, "not a letter of the 3 options"),
    ([dict(MVBENCH, candidates=["blue"])], 1, "at least 2"),
    ([MVBENCH, '{"id": "q2", "video": '], 2, "not valid JSON"),
    ([MVBENCH, MVBENCH], 2, "already the id of line 1"),
    ([{k: v for k, v in MVBENCH.items() if k != "question"}], 1, "missing field 'question'"),
    ([dict(VIDEO_MME, options=["A. red", "C. blue"])], 1, "lettered 'C'"),
])
def test_bad_questions_name_file_and_line(clips, records, line, words):
    path = _write(clips, records)
    with pytest.raises(BadInput, match=words) as e:
        load_questions(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and "\n" not in str(e.value)


def test_empty_and_missing_files(clips):
    with pytest.raises(BadInput, match="holds no questions"):
        load_questions(_write(clips, ["", "  "]))
    with pytest.raises(BadInput, match="no such questions file"):
        load_questions(clips / "nope.jsonl")


def test_fidelity_summary_keeps_verdicts_only():
    f = report.fidelity_summary({**FIDELITY, "llm": dict(FIDELITY["llm"], passed=False), "all_passed": False,
                                 "low_fidelity_allowed": ["llm"]})
    assert f["failed"] == ["llm"] and f["low_fidelity_allowed"] and not f["all_passed"]
    assert f["checks"]["vision.int8"] == {"passed": True, "measured": "min cosine 0.99987",
                                          "threshold": "min_cosine >= 0.99"}


# --- the command ---

FIDELITY = {  # as sf-export writes it: every check's figures, verdict and one-line measure
    "vision.int8": {"min_cosine": 0.99987, "threshold": "min_cosine >= 0.99", "measured": "min cosine 0.99987",
                    "passed": True},
    "llm": {"perplexity": {"ratio": 1.004}, "threshold": "perplexity <= 1.35x PyTorch's",
            "measured": "perplexity 1.004x", "passed": True},
    "all_passed": True,
}
ANSWERS = {"Which color?": ("Best option:(B) blue", [-3.0, -0.1, -4.0]),  # bundle: right
           "Which shape?": ("Best option:(", [-1.0, -2.0, -3.0]),  # bundle: empty, wrong
           "Which size?": ("Best option:(C) big", [-5.0, -4.0, -0.2])}  # bundle: right
REFERENCE = {"Which color?": ("Best option:(B) blue", [-3.1, -0.1, -4.0]),
             "Which shape?": ("Best option:(A) round", [-0.5, -2.0, -3.0]),  # the reference gets it right
             "Which size?": ("Best option:(A) small", [-0.4, -4.0, -0.6])}  # and this one wrong


class FakeRuntime:
    manifest = {"fidelity": FIDELITY, "prompt": {}, "vision": {"image_size": [32, 32], "graphs": {}},
                "aggregator": {"slow_frames": 4}}
    loads = []

    @classmethod
    def load(cls, bundle, **settings):
        cls.loads.append((bundle, settings))
        return cls()

    def encode(self, path):
        if path.name == "broken.mp4":
            raise GraphFailed("vision graph failed: out of memory")
        return types.SimpleNamespace(path=path, timings={"decode": 0.5, "encode": 1.0, "aggregate": 0.0})

    def ask(self, vt, question, options, max_new_tokens, choice):
        text, logprobs = ANSWERS[question]
        return types.SimpleNamespace(text=text, option_logprobs=logprobs, selected_frames=[0, 8],
                                     fast_frames=[0, 2, 4, 6, 8], timings={"prefill": 0.25, "generate": 0.5})


class FakeReference:
    made, calls = [], []

    def __init__(self, checkpoint, manifest):
        FakeReference.made.append((checkpoint, manifest))

    def answer(self, video_path, question, options, selected_frames, fast_frames, max_new_tokens, choice):
        FakeReference.calls.append((video_path, question, options, selected_frames, fast_frames, max_new_tokens))
        return REFERENCE[question]


@pytest.fixture()
def fakes(monkeypatch):
    from sfedge.runtime import pipeline

    FakeRuntime.loads, FakeReference.made, FakeReference.calls = [], [], []
    monkeypatch.setattr(pipeline.Runtime, "load", FakeRuntime.load)
    module = types.ModuleType("sfedge.eval.reference")
    module.Reference = FakeReference
    monkeypatch.setitem(sys.modules, "sfedge.eval.reference", module)


def _sf_eval(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["sf-eval", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code


def _data(clips) -> Path:
    q = dict(candidates=["small", "round", "big"], category="objects")
    return _write(clips, [
        dict(MVBENCH, id="1", question="Which color?", candidates=["red", "blue", "green"], answer="blue",
             category="color"),
        dict(q, id="2", video="clips/broken.mp4", question="Which shape?", answer="round"),
        dict(q, id="3", video="clips/a.mp4", question="Which shape?", answer="small"),
        dict(q, id="4", video="clips/b.mp4", question="Which size?", answer="big"),
        dict(q, id="5", video="clips/broken.mp4", question="Which size?", answer="big"),
    ])


def test_cli_encode_failure_becomes_error_rows_and_out_writes_three_files(clips, fakes, monkeypatch, capsys):
    out = clips / "report"
    code = _sf_eval(monkeypatch, "bundle", "--data", _data(clips), "--reference", "ckpt", "--out", out,
                    "--frames", 16)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert FakeRuntime.loads[0][0] == "bundle" and FakeRuntime.loads[0][1]["frames"] == 16
    assert FakeReference.made == [("ckpt", FakeRuntime.manifest)]
    # The reference is asked on the bundle's own frames, with the bundle's token allowance.
    a = clips / "clips" / "a.mp4"
    assert FakeReference.calls[0] == (a, "Which color?", ["red", "blue", "green"], [0, 8], [0, 2, 4, 6, 8], 8)
    assert len(FakeReference.calls) == 3  # not for the broken video's questions
    assert "[1/3] video" in captured.err and "vision graph failed" in captured.err

    results = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in results["questions"]}
    assert len(rows) == 5
    assert rows["2"]["error"] == rows["5"]["error"] == "vision graph failed: out of memory"
    assert rows["1"]["correct"] and not rows["3"]["correct"] and rows["3"]["parse"] == "empty"
    assert rows["3"]["reference_choice"] == 0 and rows["3"]["reference_correct"]
    assert rows["4"]["reference_logprobs"] == [-0.4, -4.0, -0.6]

    s = results["summary"]
    overall = s["overall"]
    assert (overall["n"], overall["errors"], overall["accuracy"], overall["empty_rate"]) == (3, 2, 2 / 3, 1 / 3)
    ref = overall["reference"]
    assert ref["accuracy"] == 2 / 3 and ref["flips"] == 2 and ref["mcnemar"] == {"b": 1, "c": 1, "p": 1.0}
    assert ref["top1_agreement"] == pytest.approx(2 / 3)  # question 4: C against A
    assert ref["sure"]["threshold"] == 0.8 and ref["sure"]["n"] <= 3 and "flips where sure" in captured.out
    assert s["categories"]["objects"]["errors"] == 2 and s["categories"]["color"]["accuracy"] == 1.0
    assert s["fidelity"]["all_passed"] and s["fidelity"]["checks"]["llm"]["measured"] == "perplexity 1.004x"
    assert s["speed"] == {"video_s": 1.5, "question_s": 0.75}  # decode + encode once per video; prefill + generate

    assert "overall" in captured.out and "2 question(s) not scored" in captured.out
    assert "| overall | 3 |" in (out / "report.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_text_choice_scores_the_likeliest_option(clips, fakes, monkeypatch, capsys):
    out = clips / "text"
    assert _sf_eval(monkeypatch, "bundle", "--data", _data(clips), "--reference", "ckpt", "--out", out,
                    "--choice", "text") == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in results["questions"] if r["error"] is None}
    assert {r["parse"] for r in rows.values()} == {"likeliest"}
    assert rows["3"]["correct"]  # its text is empty, but the option it finds likeliest is right
    s = results["summary"]
    assert s["settings"]["choice"] == "text" and s["overall"]["accuracy"] == 1.0
    assert s["overall"]["reference"]["accuracy"] == 2 / 3  # question 4: the reference finds "small" likeliest
    assert "choice: the option whose text is the likeliest answer" in capsys.readouterr().out


def test_reference_cache_runs_the_original_once_per_question(clips, fakes, monkeypatch, capsys):
    ckpt, cache = clips / "ckpt", clips / "reference.jsonl"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    run = lambda out: _sf_eval(monkeypatch, "bundle", "--data", _data(clips), "--reference", ckpt,
                               "--reference-cache", cache, "--out", clips / out)
    assert run("first") == 0
    assert len(FakeReference.made) == 1 and len(FakeReference.calls) == 3 and len(cache.read_text().splitlines()) == 3
    FakeReference.made, FakeReference.calls = [], []
    assert run("second") == 0  # another bundle of the same checkpoint: the original is not even loaded
    assert FakeReference.made == [] and FakeReference.calls == []
    assert "3 of the reference's answers reused" in capsys.readouterr().err
    first, second = (json.loads((clips / o / "results.json").read_text())["questions"] for o in ("first", "second"))
    assert [r.get("reference_logprobs") for r in first] == [r.get("reference_logprobs") for r in second]

    # A line cut short by an interrupted run is ignored and said; new weights are a miss, never a stale answer.
    cache.write_text(cache.read_text() + '{"key": "ab')
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    assert run("third") == 0
    assert len(FakeReference.calls) == 3 and "1 unreadable lines ignored" in capsys.readouterr().err
    FakeReference.made, FakeReference.calls = [], []
    assert run("fourth") == 0 and FakeReference.calls == []  # the answers after the cut line were kept whole


def test_reference_cache_needs_a_reference(clips, fakes, monkeypatch, capsys):
    assert _sf_eval(monkeypatch, "bundle", "--data", _data(clips), "--reference-cache", clips / "r.jsonl") == 2
    assert "--reference-cache goes with --reference" in capsys.readouterr().err


def test_cli_without_reference(clips, fakes, monkeypatch, capsys):
    assert _sf_eval(monkeypatch, "bundle", "--data", _data(clips), "--limit", 2) == 0
    out = capsys.readouterr().out
    assert "2 questions on 2 videos" in out and "McNemar" not in out and not FakeReference.made


def test_cli_refuses_before_loading(clips, fakes, monkeypatch, capsys):
    bad = _write(clips, [dict(MVBENCH, video="clips/missing.mp4")], "bad.jsonl")
    assert _sf_eval(monkeypatch, "bundle", "--data", bad) == BadInput.exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"sf-eval: error: {bad}:1: video ") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert _sf_eval(monkeypatch, "bundle", "--data", _data(clips), "--out", clips / "o") == \
        BackendUnavailable.exit_code
    err = capsys.readouterr().err
    assert 'pip install "sfedge[eval]"' in err and err.count("\n") == 1
    assert not FakeRuntime.loads


def test_cli_does_not_import_torch():
    code = "import sys, sfedge.eval.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
