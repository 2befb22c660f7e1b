"""Question-aware visual tokens: NMS frame selection (Hu et al.), PPLLaVA's prompt-guided pooling, the CLIP side of
the export, and both end to end on tiny random LLaVA + CLIP checkpoints.

No CLIP tokenizer files are reachable here, so the tiny CLIP text towers (`checkpoints.tiny_clip`) use the real
SmolLM2 tokenizer (vocabulary sized to it), given CLIP's template: a start token before the text and an end token
after it."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import export_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from sfedge.export import clip as clip_io
from sfedge.export.prompt_pooling import PromptGuidedPooling, reference_pooling
from sfedge.runtime.errors import BadBundle, BadCheckpoint
from sfedge.runtime.question_aware import fast_positions
from sfedge.runtime.selection import nms_select
from sfedge.runtime import Runtime
from sfedge.runtime.tokens import prompt_pooled_count, slow_indices

# ------------------------------------------------------------------ NMS ----------------------------------------


def test_nms_hand_worked():
    scores = np.array([0, 9, 8, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 6.0])
    # n=16, k=2: radius 2. Take 1 (9), which suppresses 0..3 (so 2, the runner-up, goes); then 7 (7).
    assert nms_select(scores, 2).tolist() == [1, 7]
    # k=4: radius 1. 1 suppresses 0..2; 7 suppresses 6..8; 15 suppresses 14; then the best left is 3 (0, earliest).
    assert nms_select(scores, 4).tolist() == [1, 3, 7, 15]
    # A radius that suppresses everything after two picks: the rest is filled from the best remaining.
    s = np.array([9, 1, 1, 1, 1, 8, 1, 1, 1, 2.0])
    assert nms_select(s, 3, radius=5).tolist() == [0, 5, 9]
    assert nms_select(s, 1).tolist() == [0]
    assert nms_select(np.arange(5.0), 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        nms_select(np.zeros(3), 4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=n, max_size=n), st.integers(1, n))))
def test_nms_invariants(case):
    scores, k = np.array(case[0]), case[1]
    n = len(scores)
    got = nms_select(scores, k)
    assert len(got) == k == len(set(got.tolist()))  # k distinct
    assert np.all(np.diff(got) > 0) and got.min() >= 0 and got.max() < n  # sorted, in range
    assert scores[got].max() == scores.max()  # the best frame is always taken
    assert np.all(np.diff(got) > n / (4 * k))  # the paper's spacing always holds: no fill is ever needed


def test_fast_pathway_takes_the_candidates_nearest_the_uniform_positions():
    cands = np.floor((np.arange(128) + 0.5) * 1000 / 128).astype(int)  # 128 candidates of a 1000-frame video
    pos = fast_positions(cands, 1000, 50)
    uniform = np.floor((np.arange(50) + 0.5) * 1000 / 50)
    assert len(set(pos.tolist())) == 50 and np.all(np.diff(pos) > 0)
    np.testing.assert_array_equal(np.abs(cands[pos] - uniform), np.abs(cands[None] - uniform[:, None]).min(1))
    assert fast_positions(np.arange(8), 8, 8).tolist() == list(range(8))  # candidates = uniform frames


# ------------------------------------------------------------------ prompt-guided pooling -----------------------

UNEVEN = [(5, (5, 7), (2, 3, 3), 1), (1, (4, 4), (2, 3, 3), 0), (4, (6, 6), (2, 3, 3), 0), (7, (3, 5), (3, 2, 4), 1)]


@pytest.mark.parametrize("t,grid,kernel,skip", UNEVEN)
def test_equal_relevance_is_plain_average_pooling(t, grid, kernel, skip):
    feats = torch.randn(t, grid[0] * grid[1] + skip, 6)
    patches = torch.ones(t, grid[0] * grid[1], 4)  # every token equally relevant
    got = PromptGuidedPooling(grid, skip, 100.0, kernel)(feats, patches, torch.randn(4), torch.tensor(0.01))
    assert got.shape == (prompt_pooled_count(t, grid, kernel), 6)
    torch.testing.assert_close(got, torch.stack([w.mean(0) for w in windows(feats[:, skip:], t, grid, kernel)]))
    x = feats[:, skip:].reshape(t, *grid, 6).permute(3, 0, 1, 2)[None]
    if all(n >= k for n, k in zip((t, *grid), kernel)):  # PyTorch's own pool refuses inputs smaller than a window
        torch.testing.assert_close(got, F.avg_pool3d(x, kernel, kernel, ceil_mode=True)[0].reshape(6, -1).T)


def windows(x, t, grid, kernel):
    """[T, H*W, D] -> each 3-D window's tokens [n, D], row-major over windows; edge windows partial."""
    x = x.reshape(t, *grid, x.shape[-1])
    kt, kh, kw = kernel
    return [x[a:a + kt, b:b + kh, c:c + kw].reshape(-1, x.shape[-1]) for a in range(0, t, kt)
            for b in range(0, grid[0], kh) for c in range(0, grid[1], kw)]


@pytest.mark.parametrize("t,grid,kernel,skip", UNEVEN)
def test_zero_temperature_picks_the_most_relevant_token_per_window(t, grid, kernel, skip):
    g = torch.Generator().manual_seed(t)
    feats, patches, text = torch.randn(t, grid[0] * grid[1] + skip, 6, generator=g), \
        torch.randn(t, grid[0] * grid[1], 4, generator=g), torch.randn(4, generator=g)
    # logit scale 10: at CLIP's 100, random cosines (range 2, unlike real ones) underflow float32 relevances to 0
    got = PromptGuidedPooling(grid, skip, 10.0, kernel)(feats, patches, text, torch.tensor(1e-9))
    cos = F.cosine_similarity(patches, text, dim=-1)[..., None]
    best = [w[c[:, 0].argmax()] for w, c in zip(windows(feats[:, skip:], t, grid, kernel),
                                                windows(cos, t, grid, kernel))]
    torch.testing.assert_close(got, torch.stack(best))


def test_pooling_graph_matches_the_plain_statement_for_uneven_sizes(tmp_path):
    from sfedge.export.graphs import run_graph

    vision = {"patch_grid": [5, 7], "has_cls_token": True, "tokens_per_frame": 36, "hidden_size": 16}
    path = clip_io.export_pooling(vision, 8, 30.0, (2, 3, 3), tmp_path / "pp.onnx")
    rng = np.random.default_rng(0)
    for t in (1, 2, 5, 9):
        feats, patches = rng.standard_normal((t, 36, 16), np.float32), rng.standard_normal((t, 35, 8), np.float32)
        text = rng.standard_normal(8).astype(np.float32)
        for temp in (0.01, 1.0):
            got = run_graph(path, {"features": feats, "clip_patches": patches, "text": text,
                                   "temperature": np.array(temp, np.float32)})
            want = reference_pooling(*map(torch.from_numpy, (feats, patches, text)), 30.0, (5, 7), 1, (2, 3, 3),
                                     temp).numpy()
            assert got.shape == (prompt_pooled_count(t, (5, 7), (2, 3, 3)), 16)
            np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------ the CLIP side ------------------------------

@pytest.fixture(scope="session")
def make_clip(tmp_path_factory):
    """make_clip(llava_ckpt, kind, perturb) -> a tiny CLIPModel / SiglipModel folder whose vision tower is the
    LLaVA checkpoint's (unless perturb: one weight changed)."""
    import transformers
    from checkpoints import tiny_clip

    def make(llava_ckpt, kind="clip", perturb=False):
        out = tmp_path_factory.getbasetemp() / "clips" / f"{llava_ckpt.name}-{kind}-{perturb}"
        if not out.exists():
            tiny_clip(llava_ckpt, out, kind)
            if perturb:
                model = transformers.CLIPModel.from_pretrained(out)
                with torch.no_grad():
                    model.vision_model.encoder.layers[1].mlp.fc1.weight[0, 0] += 0.5
                model.save_pretrained(out)
        return out

    return make


def test_mismatched_clip_is_refused_unless_allowed(make_checkpoint, make_clip, tmp_path):
    from sfedge.export import checkpoint as ckpt_io

    ckpt = make_checkpoint()
    llava = ckpt_io.load(ckpt)
    good = clip_io.load(make_clip(ckpt), llava, allow_mismatch=False)
    assert good.matched and good.difference is None
    bad = make_clip(ckpt, perturb=True)
    with pytest.raises(BadCheckpoint, match=r"vision tower is not the one in .*encoder\.layers\.1\.mlp\.fc1\.weight: "
                                            r"values differ.*--allow-mismatched-clip") as e:
        clip_io.load(bad, llava, allow_mismatch=False)
    assert str(bad) in str(e.value) and str(ckpt) in str(e.value)
    allowed = clip_io.load(bad, llava, allow_mismatch=True)
    assert not allowed.matched and allowed.checksum != good.checksum
    other = make_checkpoint(image_size=48, patch=8)  # a 6x6 grid: the configs differ first
    with pytest.raises(BadCheckpoint, match="vision config image_size: 48 .* 32 in"):
        clip_io.load(make_clip(ckpt), ckpt_io.load(other), allow_mismatch=False)
    # Allowed, the CLIP head runs on the LLaVA tower's features, and the graph is checked against that statement.
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    clip_io.export_vision(llava.model, llava.vision, allowed, tmp_path / "v.onnx", torch.from_numpy(frames[:2]))
    ref = clip_io.reference_outputs(allowed, llava.model, llava.vision, torch.from_numpy(frames))
    report = clip_io.vision_fidelity(tmp_path / "v.onnx", frames, ref, "fp32")
    assert all(v["passed"] for v in report.values()) and len(report) == 2


def test_not_a_clip_folder(make_checkpoint, tmp_path):
    from sfedge.export import checkpoint as ckpt_io

    llava = ckpt_io.load(make_checkpoint())
    with pytest.raises(BadCheckpoint, match="config.json: missing; --clip needs"):
        clip_io.load(tmp_path, llava, False)
    with pytest.raises(BadCheckpoint, match="model_type 'llava' is not a CLIP or SigLIP"):
        clip_io.load(make_checkpoint(), llava, False)


# ------------------------------------------------------------------ end to end ---------------------------------

@pytest.fixture(scope="module")
def clip_bundle(make_checkpoint, make_clip, tmp_path_factory):
    ckpt = make_checkpoint()
    out = tmp_path_factory.mktemp("qa") / "bundle"
    m = export_tiny(ckpt, out, clip=str(make_clip(ckpt)))
    return out, ckpt, m


def test_export_writes_a_checked_clip_side(clip_bundle, tmp_path):
    from sfedge.runtime import manifest as manifest_io

    out, _, m = clip_bundle
    c, fid = m["clip"], m["fidelity"]
    assert c["tower_match"] and c["model_type"] == "clip" and c["embed_dim"] == 32 and c["context_length"] == 24
    assert {c["text_graph"], c["tokenizer"], m["prompt_pooling"]["graph"]} <= set(m["artifacts"])
    assert m["prompt_pooling"] == {"graph": "prompt_pooling.onnx", "kernel": [2, 3, 3], "temperature": 0.01}
    for name in ("vision.fp32.clip_frame", "vision.fp32.clip_patches", "vision.int8.clip_frame", "clip_text",
                 "aggregator.selected", "prompt_pooling.T5"):
        assert fid[name]["passed"], name
    assert fid["vision.fp32.clip_patches"]["rel_max_abs_error"] <= 1e-4 and fid["all_passed"]
    copy = shutil.copytree(out, tmp_path / "bundle")  # the module's bundle stays untouched for the other tests
    (copy / c["tokenizer"]).write_bytes((copy / c["tokenizer"]).read_bytes() + b" ")  # tampered: refused
    with pytest.raises(BadBundle, match="clip_tokenizer.json: size"):
        manifest_io.load(copy)


@pytest.fixture(scope="module")
def torch_side(clip_bundle, make_clip):
    """The PyTorch originals: the LLaVA checkpoint and the CLIP model, through transformers."""
    import transformers
    from sfedge.export import checkpoint as ckpt_io

    _, ckpt, _ = clip_bundle
    return ckpt_io.load(ckpt), transformers.CLIPModel.from_pretrained(make_clip(ckpt)).eval(), \
        transformers.AutoTokenizer.from_pretrained(make_clip(ckpt))


def _torch_inputs(torch_side, rt, n, question):
    """Candidate frames' features, CLIP frame and patch embeddings and the question's embedding, by PyTorch."""
    from sfedge.export.vision import VisionGraph, reference_features
    from sfedge.runtime.video import read_frames

    llava, model, tok = torch_side
    got = read_frames("demo", n, rt.size)
    frames = torch.from_numpy(got.pixels)
    with torch.no_grad():
        feats = reference_features(llava.model, llava.vision, frames)
        pixels = VisionGraph(llava.model, llava.vision).pixel_values(frames)
        frame = model.get_image_features(pixel_values=pixels).pooler_output
        last = model.vision_model(pixel_values=pixels).last_hidden_state
        patches = model.visual_projection(model.vision_model.post_layernorm(last[:, 1:]))
        text = model.get_text_features(**tok(question, return_tensors="pt")).pooler_output[0]
    return got, feats, frame, patches, text


def test_clip_selection_end_to_end(clip_bundle, torch_side):
    from sfedge.export.bundle import selected_reference
    from sfedge.runtime import Runtime

    out, _, m = clip_bundle
    rt = Runtime.load(out, vision_variant="fp32", max_new_tokens=4, frame_selection="clip", candidates=20)
    assert rt.plan.candidates == 20 and "CLIP selection among 20 candidates" in rt.plan.table()
    video = rt.encode("demo")
    assert video.count == m["visual_tokens_per_video"] and video.tokens is None  # known before the question
    q = "Where is the rabbit?"
    ans = rt.ask(video, q)
    got, feats, frame, _, text = _torch_inputs(torch_side, rt, 20, q)
    scores = torch.nn.functional.cosine_similarity(frame, text[None], dim=-1).numpy()
    picked = nms_select(scores, 4)  # the PyTorch scores pick the same frames
    assert ans.selected_frames == got.indices[picked].tolist()
    fast = fast_positions(got.indices, got.total_frames, 8)
    assert set(ans.frames_used) == set(got.indices[picked]) | set(got.indices[fast])
    assert ans.visual_tokens == m["visual_tokens_per_video"] and ans.timings["question"] > 0
    tokens, _ = rt.qa.tokens(video, q, rt.aggregator)
    want = selected_reference(feats, picked, fast, m["vision"], m["aggregator"])
    np.testing.assert_allclose(tokens.tokens, want, atol=1e-4 * np.abs(want).max())
    again = rt.ask(video, q)
    assert again.reused_prefix and again.text == ans.text and again.selected_frames == ans.selected_frames


def test_prompt_guided_pooling_end_to_end(clip_bundle, torch_side):
    from sfedge.runtime import Runtime

    out, _, m = clip_bundle
    rt = Runtime.load(out, vision_variant="fp32", max_new_tokens=4, pooling="prompt-guided")
    n_tokens = prompt_pooled_count(8, (4, 4), (2, 3, 3))
    assert rt.plan.visual_tokens == n_tokens == 16
    video = rt.encode("demo")
    q1, q2 = "What color is the sky?", "Is anyone running?"
    a1, a2 = rt.ask(video, q1), rt.ask(video, q2)
    assert a1.visual_tokens == a2.visual_tokens == n_tokens and not a2.reused_prefix  # tokens follow the question
    assert a1.selected_frames == a1.frames_used == video.frame_indices
    for q in (q1, q2):
        _, feats, _, patches, text = _torch_inputs(torch_side, rt, 8, q)
        want = reference_pooling(feats, patches, text, m["clip"]["logit_scale"], (4, 4), 0, (2, 3, 3), 0.01).numpy()
        got = rt.qa.tokens(video, q, rt.aggregator)[0].tokens
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    both = Runtime.load(out, vision_variant="fp32", max_new_tokens=2, pooling="prompt-guided",
                        frame_selection="clip", candidates=16)
    ans = both.ask("demo", q1)
    assert len(ans.selected_frames) == 8 and ans.visual_tokens == n_tokens


def test_uniform_tokens_are_unchanged_by_the_clip_side(clip_bundle, tiny_bundle):
    from sfedge.runtime import Runtime

    with_clip = Runtime.load(clip_bundle[0], vision_variant="fp32").encode("demo")
    plain = Runtime.load(tiny_bundle[0], vision_variant="fp32").encode("demo")
    np.testing.assert_allclose(with_clip.tokens, plain.tokens, atol=1e-6)
    assert with_clip.selected_frames == [plain.frame_indices[i] for i in (0, 2, 4, 6)]


def test_bundle_without_clip_side_is_refused(tiny_bundle):
    from sfedge.runtime import Runtime
    from sfedge.runtime.errors import BadInput

    with pytest.raises(BadBundle, match="has no CLIP text side.*sf-export --clip"):
        Runtime.load(tiny_bundle[0], frame_selection="clip")
    with pytest.raises(BadInput, match="pooling 'max'"):
        Runtime.load(tiny_bundle[0], pooling="max")


def test_sf_run_question_aware(clip_bundle):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", *map(str, args)], check=False,
                              capture_output=True, text=True)

    b = clip_bundle[0]
    run = cli("ask", b, "--video", "demo", "-q", "What is it?", "--json", "--max-new-tokens", 2, "--vision", "fp32",
              "--frame-selection", "clip", "--candidates", 12)
    assert run.returncode == 0, run.stderr
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(line["selected_frames"]) == 4 and "question" in line["timings"]
    plan = cli("plan", b, "--pooling", "prompt-guided")
    assert plan.returncode == 0 and "visual tokens 16" in plan.stdout and "prompt-guided" in plan.stdout
    bad = cli("plan", b, "--frame-selection", "clip", "--candidates", 4)
    assert bad.returncode == 2 and "4 candidates are fewer than the 8 frames" in bad.stderr


def test_siglip_side_end_to_end(make_checkpoint, make_clip, tmp_path):
    """SigLIP: no CLS, a 9x9 grid (uneven for 3x3 windows), the attention-pooling head per patch, questions padded
    to the context as SigLIP is trained."""
    from sfedge.runtime import Runtime

    ckpt = make_checkpoint("LlavaOnevisionForConditionalGeneration", tower="siglip", image_size=36, patch=4,
                           strategy="full")
    m = export_tiny(ckpt, tmp_path / "b", clip=str(make_clip(ckpt, kind="siglip")), vision_variants=("fp32",))
    c = m["clip"]
    assert c["model_type"] == "siglip" and c["pad_to_context"] and c["embed_dim"] == 32 and m["fidelity"]["all_passed"]
    assert m["fidelity"]["vision.fp32.clip_patches"]["rel_max_abs_error"] <= 1e-4
    rt = Runtime.load(tmp_path / "b", max_new_tokens=2, pooling="prompt-guided", frame_selection="clip",
                      candidates=10)
    assert rt.qa.text.tokenize("a cat").shape == (1, 24)
    ans = rt.ask("demo", "Is there a cat?")
    assert ans.visual_tokens == prompt_pooled_count(8, (9, 9), (2, 3, 3)) == 36 and len(ans.selected_frames) == 8


def test_bench_worker_measures_each_mode(clip_bundle):
    from sfedge.bench import workers

    for mode in ("slowfast", "clip+prompt-guided"):
        res = workers.question_aware(clip_bundle[0], "demo", mode)
        assert res["per_question_s"] >= res["prefill_s"] > 0 and res["encode_s"] > 0
        assert res["frames_encoded"] == (128 if mode.startswith("clip") else 8)
    assert res["question_s"] > 0 and res["visual_tokens"] == 16


@pytest.mark.parametrize("selection, choice", [("uniform", "letter"), ("clip", "letter"), ("uniform", "text")])
def test_sf_eval_reference_answers_as_the_fp32_bundle_on_its_frames(clip_bundle, tmp_path, selection, choice):
    """sf-eval --reference: the PyTorch original, fed the source frames the bundle used (uniform, or the slow frames
    CLIP chose), gives the fp32 bundle's answer and option log-probabilities, by letter or by each option's text
    (options of several tokens: teacher-forced a token at a time in the runtime, in one pass in PyTorch)."""
    from sfedge.eval.reference import Reference
    from sfedge.train import synthetic

    out, ckpt, _ = clip_bundle
    video = synthetic.write_video(synthetic.make_clip(5), tmp_path / "clip.mp4")
    rt = Runtime.load(out, vision_variant="fp32", frame_selection=selection, candidates=40)
    ref = Reference(ckpt, rt.manifest)
    options = ["red", "dark green", "blue", "a yellow one"]
    ans = rt.ask(rt.encode(video), "What colour is the circle?", options=options, max_new_tokens=4, choice=choice)
    assert len(ans.option_logprobs) == 4 and all(lp < 0 for lp in ans.option_logprobs)
    if selection == "clip":
        assert sorted(ans.selected_frames) != sorted(ans.fast_frames[i] for i in slow_indices(len(ans.fast_frames), 4))
    text, logprobs = ref.answer(video, "What colour is the circle?", options, ans.selected_frames, ans.fast_frames, 4,
                                choice)
    assert text == ans.text
    np.testing.assert_allclose(logprobs, ans.option_logprobs, atol=2e-4)  # the wrong slow frames: 4e-3 off
