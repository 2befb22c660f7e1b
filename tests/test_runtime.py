"""The runtime end to end on a tiny bundle: answers equal the transformers reference token for token (fp32
language model, greedy); follow-ups reuse the video's KV prefix; bad inputs give clear errors."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sfedge.export.reference import answer_ids
from sfedge.export import checkpoint as ckpt_io
from sfedge.runtime import Runtime
from sfedge.runtime import prompt as prompts
from sfedge.runtime.errors import BadInput, DoesNotFit
from sfedge.runtime.video import read_frames

QUESTIONS = ["What happens in the video?", "What color is the car?"]


@pytest.fixture
def rt(tiny_bundle):
    # Each test its own runtime (a load takes a tenth of a second): tests that patch it or fill its caches
    # cannot reach the next one, whatever the order.
    return Runtime.load(tiny_bundle[0], vision_variant="fp32", max_new_tokens=12)


@pytest.fixture(scope="module")
def hf(tiny_bundle):
    return SimpleNamespace(**dict(zip(("model", "tokenizer"), ckpt_io.whole(tiny_bundle[1]))))


class DecodeRecorder:
    """Stands in for rt.llm.tokenizer and keeps the longest id list decoded: the answer is streamed by decoding
    the ids generated so far, so this is every id generated."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []

    def decode(self, ids, **kw):
        if len(ids) > len(self.ids):
            self.ids = list(ids)
        return self.tokenizer.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_answers_equal_transformers_token_for_token(rt, hf, monkeypatch):
    video = rt.encode("demo")
    frames = read_frames("demo", rt.plan.frames, rt.size).pixels
    for i, q in enumerate(QUESTIONS):
        recorder = DecodeRecorder(rt.llm.tokenizer)
        monkeypatch.setattr(rt.llm, "tokenizer", recorder)
        ans = rt.ask(video, q, max_new_tokens=12)
        want = answer_ids(hf.model, hf.tokenizer, rt.manifest, frames, q, 12)
        assert len(want) > 0 and recorder.ids == want
        assert ans.generated_tokens == len(want)
        assert hf.tokenizer.decode(want, skip_special_tokens=True) == ans.text
        assert ans.reused_prefix == (i > 0)


def test_follow_up_reuses_the_prefix_and_matches_a_fresh_answer(tiny_bundle, rt, monkeypatch):
    video = rt.encode("demo")
    first = rt.ask(video, QUESTIONS[0])
    fed = []
    forward = rt.llm.decoder.forward
    monkeypatch.setattr(rt.llm.decoder, "forward", lambda e, *a: fed.append(len(e)) or forward(e, *a))
    follow = rt.ask(video, QUESTIONS[1])
    assert follow.reused_prefix and not first.reused_prefix
    assert 0 < sum(fed) < video.count  # the question and answer were fed, the visual prefix not again
    from sfedge.runtime.prompt import build
    q_len = [len(rt.llm.tokenize(build(rt.manifest["prompt"], q).question)) for q in QUESTIONS]
    assert follow.prompt_tokens - first.prompt_tokens == q_len[1] - q_len[0]
    fresh = Runtime.load(tiny_bundle[0], vision_variant="fp32", max_new_tokens=12)
    assert fresh.ask(fresh.encode("demo"), QUESTIONS[1]).text == follow.text


def test_answer_records_timings_memory_and_frames(rt):
    ans = rt.ask("demo", "Describe it.", max_new_tokens=4)
    assert set(ans.timings) == {"decode", "encode", "aggregate", "prefill", "generate"}
    assert ans.peak_memory_bytes > 10_000_000
    assert len(ans.frames_used) == rt.plan.frames and ans.visual_tokens == rt.manifest["visual_tokens_per_video"]
    again = rt.ask("demo", "And now?", max_new_tokens=4)  # same path: tokens and KV prefix reused
    assert again.reused_prefix and again.timings["encode"] == 0.0


def test_streaming_gives_the_same_text(rt):
    video = rt.encode("demo")
    whole = rt.ask(video, QUESTIONS[0]).text
    s = rt.ask(video, QUESTIONS[0], stream=True)
    pieces = list(s)
    assert "".join(pieces) == whole == s.answer.text


def test_prompt_styles(rt):
    video = rt.encode("demo")
    assert rt.ask(video, "What happens?", style="open-ended", max_new_tokens=3).text.startswith("In the video,")
    mc = rt.ask(video, "Which animal?", options=["a rabbit", "a bird"], max_new_tokens=2)
    assert mc.text.startswith("Best option:(")


def test_text_choice_scores_each_option_and_leaves_the_cache_as_it_was(rt):
    """The "text" choice asks the question as is (no options listed) and scores each option's text as the answer,
    a token at a time for longer ones; the answer then generated is the plain question's, token for token."""
    video = rt.encode("demo")
    options = ["a rabbit in a field", "a bird", "nothing at all"]
    ans = rt.ask(video, "Which animal?", options=options, choice="text", max_new_tokens=6)
    plain = rt.ask(video, "Which animal?", max_new_tokens=6)
    assert ans.text == plain.text and ans.prompt_tokens == plain.prompt_tokens
    assert len(ans.option_logprobs) == 3 and all(lp < 0 for lp in ans.option_logprobs)
    ids = prompts.token_ids(rt.manifest["prompt"], rt.llm.tokenize, "Which animal?", options=options, choice="text")
    assert [len(o) for o in ids.option_ids][0] > 2 and "(A)" not in rt.llm.tokenizer.decode(ids.question)
    with pytest.raises(BadInput, match="choice 'cloze'"):
        rt.ask(video, "Which animal?", options=options, choice="cloze")


def test_sampling_is_seeded(rt):
    video = rt.encode("demo")
    a = rt.ask(video, "Tell a story.", temperature=1.0, top_p=0.9, top_k=50, seed=3, max_new_tokens=8).text
    b = rt.ask(video, "Tell a story.", temperature=1.0, top_p=0.9, top_k=50, seed=3, max_new_tokens=8).text
    other = rt.ask(video, "Tell a story.", temperature=1.0, top_p=0.9, top_k=50, seed=4, max_new_tokens=8).text
    assert a == b != other  # the seed, not greedy decoding, makes them equal


def test_bad_inputs(rt, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(BadInput, match="notes.mp4"):
        rt.ask(bad, "What?")
    with pytest.raises(BadInput, match="no such file"):
        rt.ask(tmp_path / "missing.mp4", "What?")
    with pytest.raises(BadInput, match="empty"):
        rt.ask("demo", "   \x00\x07  ")


def test_an_over_long_question_is_refused_before_any_prefill(rt, monkeypatch):
    video = rt.encode("demo")
    fed = []
    monkeypatch.setattr(rt.llm.decoder, "forward", lambda e, *a: fed.append(len(e)))
    with pytest.raises(BadInput, match="does not fit the planned context"):
        rt.ask(video, "why " * 400)
    assert fed == [] and rt.llm.decoder.length == 0


def test_budget_too_small_is_refused_with_the_reason(tiny_bundle):
    with pytest.raises(DoesNotFit, match="over the .* budget; the largest part is"):
        Runtime.load(tiny_bundle[0], memory_budget="50MB")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", *map(str, args)], capture_output=True,
                          text=True)


def test_sf_run_ask_json_and_errors(tiny_bundle, tmp_path):
    b = tiny_bundle[0]
    run = cli("ask", b, "--video", "demo", "-q", QUESTIONS[0], "-q", QUESTIONS[1], "--json", "--max-new-tokens", 5,
              "--vision", "fp32")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in run.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[1]["reused_prefix"] and lines[0]["visual_tokens"] > 0
    assert set(lines[0]["timings"]) == {"decode", "encode", "aggregate", "prefill", "generate"}
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00" * 100)
    for args, code in [(("ask", b, "--video", bad, "-q", "hi"), 2),
                       (("ask", tmp_path, "--video", "demo", "-q", "hi"), 4),
                       (("plan", b, "--memory-budget", "10MB"), 5),
                       (("plan", b, "--memory-budget", "lots"), 2)]:
        r = cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("sf-run: error:")
    plan = cli("plan", b, "--memory-budget", "6GB")
    assert plan.returncode == 0 and "kv cache" in plan.stdout and "budget" in plan.stdout
