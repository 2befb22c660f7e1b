"""The synthetic clips with labelled questions: sf-eval data, and the training data of sfedge.train.demo_model."""
import json

import numpy as np
import pytest
from sfedge.eval.data import load_questions
from sfedge.train import synthetic as syn


def test_a_seed_gives_the_same_clip_frames_and_questions():
    a, b = syn.make_clip(7), syn.make_clip(7)
    assert a == b and syn.make_clip(8) != a
    for f in (0, a.needle_start, syn.FRAMES - 1):
        assert np.array_equal(syn.render(a, f), syn.render(b, f))
    assert syn.question_rows(a, "v.mp4") == syn.question_rows(b, "v.mp4")


@pytest.mark.parametrize("seed", range(0, 60, 7))
def test_a_clip_has_distinct_shapes_in_frame_apart_and_a_short_needle(seed):
    clip = syn.make_clip(seed)
    assert 1 <= len(clip.movers) <= 4
    assert len({m.shape for m in clip.movers}) == len({m.colour for m in clip.movers}) == len(clip.movers)
    assert len(clip.needle_frames()) / syn.FRAMES <= 0.03
    for m in clip.movers:
        for f in (0, syn.FRAMES - 1):
            x, y = clip.position(m, f)
            assert syn.RADIUS <= x <= syn.SIZE - syn.RADIUS and syn.RADIUS <= y <= syn.SIZE - syn.RADIUS
    # the flash (the only white in a clip) is in its two frames and in no other
    on = lambda f: (syn.render(clip, f).min(-1) >= 250).sum() > 20
    assert all(on(f) for f in clip.needle_frames())
    assert not any(on(f) for f in (clip.needle_start - 1, clip.needle_start + syn.NEEDLE_FRAMES))


def test_every_question_has_four_distinct_candidates_with_the_answer_among_them():
    counts = {c: 0 for c in syn.CATEGORIES}
    for seed in range(40):
        clip = syn.make_clip(seed)
        for row in syn.question_rows(clip, "v.mp4"):
            assert len(set(row["candidates"])) == 4 and row["answer"] in row["candidates"]
            counts[row["category"]] += 1
        truth = {r["category"]: r["answer"] for r in syn.question_rows(clip, "v.mp4")}
        assert truth["needle"] == clip.needle and truth["count"] == syn.COUNTS[len(clip.movers) - 1]
    assert set(counts.values()) == {40}


def test_the_dataset_is_sf_eval_data(tmp_path):
    data = syn.write_dataset(tmp_path, range(3))
    qs = load_questions(data)
    assert len(qs) == 15 and all(q.video.exists() for q in qs)
    assert [json.loads(line)["id"] for line in data.read_text().splitlines()][:2] == ["0-colour", "0-shape"]

