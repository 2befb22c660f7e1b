"""sf-bench: our runtime against the reference, side by side, in one invocation.

Every measurement runs in its own worker process (so peak resident memory belongs to one backend), backends
alternate within each repeat, a warm-up precedes the timed work, and the report gives medians, ranges and ratios
against the reference (Hugging Face transformers fp32, default sdpa attention).

  sf-bench llm     prefill and decode at 30 tokens and at a video-length context (3,680 + 30)
  sf-bench e2e     a 50-frame question about a real video, then a follow-up, against the reference pipeline
  sf-bench vision  frames per second of the vision graph variants against PyTorch eager, with cosine
  sf-bench scale   the cost of each stage of our path as the frame count (and so the context) grows
  sf-bench watch   standing questions over 10 minutes of looped real footage: per-question latency and memory
                   growth, against answering each question from scratch (re-encoding its window)
  sf-bench question-aware  per-question cost of CLIP frame selection (128 candidates) and prompt-guided pooling
                   against plain SlowFast (a ViT-B/16-sized CLIP text tower added to the default workload)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sfedge.runtime.clitools import run_cli
from sfedge.runtime.errors import BackendUnavailable, BadInput

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfedge" / "bench"
SHORT, VISUAL, QUESTION = 30, 3680, 30
DECODE_STEPS = 64


# ---------------------------------------------------------------- workload -------------------------------------

def default_bundle(log) -> tuple[Path, Path]:
    """The default workload: ViT-B/16-sized seeded tower + real SmolLM2, exported once and cached."""
    from .bundle import Log, Options, export
    from .demo import UNTRAINED_NOTE, build_demo_checkpoint

    ckpt, bundle = CACHE / "checkpoint", CACHE / "bundle"
    if not (ckpt / "config.json").exists():
        log("building the default workload's checkpoint (ViT-B/16-sized tower + SmolLM2-135M-Instruct)")
        build_demo_checkpoint(ckpt)
    if not (bundle / "manifest.json").exists():
        log("exporting it (once; cached under ~/.cache/sfedge/bench)")
        export(ckpt, bundle, Options(note=UNTRAINED_NOTE, vision_variants=("fp32", "fp16", "int8"), force=True),
               Log())
    return ckpt, bundle


def question_aware_bundle(log) -> tuple[Path, Path]:
    """The default workload plus a CLIP side: a seeded ViT-B/16-sized CLIP whose vision tower is the demo's."""
    from .bundle import Log, Options, export
    from .demo import UNTRAINED_NOTE, build_clip_checkpoint, build_demo_checkpoint

    ckpt, clip, bundle = CACHE / "checkpoint", CACHE / "clip-b16", CACHE / "qa-bundle"
    if not (ckpt / "config.json").exists():
        log("building the default workload's checkpoint (ViT-B/16-sized tower + SmolLM2-135M-Instruct)")
        build_demo_checkpoint(ckpt)
    if not (clip / "config.json").exists():
        log("building a ViT-B/16-sized random CLIP around the demo's vision tower")
        build_clip_checkpoint(ckpt, clip, size="base")
    if not (bundle / "manifest.json").exists():
        log("exporting it with --clip (once; cached under ~/.cache/sfedge/bench)")
        export(ckpt, bundle, Options(note=UNTRAINED_NOTE, clip=str(clip), force=True), Log())
    return ckpt, bundle


# ---------------------------------------------------------------- workers --------------------------------------

def _peak():
    from sfedge.runtime.memory import peak_rss
    return peak_rss()


def worker_llm(backend: str, bundle: Path, ckpt: Path, context: int) -> dict:
    rng = np.random.default_rng(0)
    if backend == "ours":
        from sfedge.runtime import manifest
        from sfedge.runtime.llm import LanguageModel

        m = manifest.load(bundle)
        lm = LanguageModel(bundle, m, max_len=context + DECODE_STEPS + 8)
        embeds = lm.embed(rng.integers(0, 40000, context))
        step = lambda tok: lm.prefill(lm.embed([tok]))  # noqa: E731
        lm.prefill(embeds[:8]), lm.rewind(0)  # warm-up
        t0 = time.perf_counter()
        logits = lm.prefill(embeds)
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        model = _torch_lm(backend, ckpt)
        table = model.get_input_embeddings().weight.detach()
        embeds = table[torch.from_numpy(rng.integers(0, 40000, context))][None].float()
        cache = {}

        def step(tok):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache["pkv"], use_cache=True)
            cache["pkv"] = out.past_key_values
            return out.logits[0, -1].float().numpy()

        with torch.no_grad():
            model(inputs_embeds=embeds[:, :8])  # warm-up
            t0 = time.perf_counter()
            out = model(inputs_embeds=embeds, use_cache=True)
            cache["pkv"] = out.past_key_values
            logits = out.logits[0, -1].float().numpy()
    prefill = time.perf_counter() - t0
    import contextlib
    ctx = __import__("torch").no_grad() if backend != "ours" else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            logits = step(int(np.argmax(logits)))
    decode = DECODE_STEPS / (time.perf_counter() - t0)
    return {"prefill_s": prefill, "decode_tok_s": decode, "peak_rss": _peak()}


def _torch_lm(backend: str, ckpt: Path):
    import torch
    import transformers

    from .llm import language_model

    if backend == "transformers-fp32":
        full = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        return language_model(full).eval()
    if backend == "bnb-nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise BackendUnavailable("bitsandbytes is not installed (pip install '.[nf4]')") from None
        lm_dir = CACHE / "lm-hf"
        if not (lm_dir / "config.json").exists():
            full = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
            language_model(full).save_pretrained(lm_dir)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
        return transformers.AutoModelForCausalLM.from_pretrained(lm_dir, quantization_config=q,
                                                                 device_map="cpu").eval()
    raise BadInput(f"unknown backend {backend}")


def worker_llamacpp(quant: str, ckpt: Path, context: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same SmolLM2 weights: the shipped Q4_1 GGUF requantized to `quant`.
    Token ids stand in for the embeddings (llama.cpp's Python API takes tokens); the cost per position is the same."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        raise BackendUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    from .demo import GGUF, smollm2_dir

    dst = CACHE / f"smollm2-{quant}.gguf"
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(smollm2_dir() / GGUF).encode(), str(dst).encode(),
                                          ctypes.byref(params)) != 0:
            raise BackendUnavailable(f"llama.cpp could not requantize SmolLM2 to {quant}")
    llm = llama_cpp.Llama(model_path=str(dst), n_ctx=context + DECODE_STEPS + 16, n_threads=os.cpu_count(),
                          n_batch=512, verbose=False)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 40000, context)]
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):  # a fixed token: the cost of a step does not depend on which token it is
        llm.eval([100])
    return {"prefill_s": prefill, "decode_tok_s": DECODE_STEPS / (time.perf_counter() - t0), "peak_rss": _peak()}


def worker_e2e(backend: str, bundle: Path, ckpt: Path, video: str, frames: int) -> dict:
    q1, q2 = "Describe the video.", "What is the main character doing?"
    if backend == "ours":
        from sfedge.runtime import Runtime

        rt = Runtime.load(bundle, frames=frames, max_new_tokens=32)
        rt.ask(rt.encode(video, frames=2), "warm up", max_new_tokens=1)
        res = {}
        for name, q in (("first", q1), ("follow_up", q2)):
            t0 = time.perf_counter()
            s = rt.ask(video, q, max_new_tokens=32, min_new_tokens=32, stream=True)
            ttft = None
            for _ in s:
                ttft = ttft or time.perf_counter() - t0
            res[name] = {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "tokens": s.answer.generated_tokens}
        return {**res, "peak_rss": _peak()}
    import torch

    from sfedge.export import checkpoint as ckpt_io
    from sfedge.export.aggregator import reference_tokens
    from sfedge.export.vision import reference_features
    from sfedge.runtime import manifest
    from sfedge.runtime.prompt import build
    from sfedge.runtime.video import read_frames

    torch.set_num_threads(os.cpu_count())
    c = ckpt_io.load(ckpt)
    m = manifest.load(bundle)
    p, agg, v = m["prompt"], m["aggregator"], m["vision"]
    table = c.model.get_input_embeddings().weight

    def answer(q):  # the official SlowFast-LLaVA flow: every question decodes, encodes and prefills again
        t0 = time.perf_counter()
        px = read_frames(video, frames, tuple(v["image_size"])).pixels
        with torch.no_grad():
            feats = reference_features(c.model, v, torch.from_numpy(px))
            tok = reference_tokens(feats, agg["slow_frames"], v["patch_grid"], int(v["has_cls_token"]),
                                   agg["slow_pool"], agg["fast_grid"])
            text = build(p, q)
            pre = c.tokenizer(text.prefix, add_special_tokens=p["add_special_tokens"])["input_ids"]
            post = c.tokenizer(text.question, add_special_tokens=False)["input_ids"]
            emb = torch.cat([table[pre], tok, table[post]])[None]
            first = {}
            streamer = _FirstToken(first, t0)
            out = c.model.generate(inputs_embeds=emb, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                   streamer=streamer,
                                   eos_token_id=p["eos_token_ids"], pad_token_id=p["eos_token_ids"][0])
        # generate() on inputs_embeds returns only the new tokens
        return {"ttft_s": first.get("t"), "total_s": time.perf_counter() - t0, "tokens": out.shape[1]}

    with torch.no_grad():  # warm-up, as ours gets one
        reference_features(c.model, v, torch.zeros(2, *v["image_size"], 3, dtype=torch.uint8))
        c.model(inputs_embeds=table[:8][None])
    return {"first": answer(q1), "follow_up": answer(q2), "peak_rss": _peak()}


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self, out, t0):
        self.out, self.t0, self.calls = out, t0, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.out["t"] = time.perf_counter() - self.t0

    def end(self):
        pass


SCALE_FRAMES = (8, 16, 32, 50, 100, 200)


def worker_scale(bundle: Path, video: str, frames: int) -> dict:
    from sfedge.runtime import Runtime
    from sfedge.runtime.errors import DoesNotFit

    try:
        rt = Runtime.load(bundle, frames=frames, max_new_tokens=16)
    except DoesNotFit as e:
        raise BackendUnavailable(str(e)) from None
    rt.ask(rt.encode(video, frames=2), "warm up", max_new_tokens=1)
    ans = rt.ask(video, "Describe the video.", max_new_tokens=16, min_new_tokens=16)
    return {**ans.timings, "visual_tokens": ans.visual_tokens, "frames": len(ans.frames_used),
            "per_token_s": ans.timings["generate"] / max(ans.generated_tokens, 1), "peak_rss": _peak()}


def worker_vision(backend: str, bundle: Path, ckpt: Path, video: str, frames: int) -> dict:
    from sfedge.runtime import manifest
    from sfedge.runtime.video import read_frames

    m = manifest.load(bundle)
    v = m["vision"]
    px = read_frames(video, frames, tuple(v["image_size"])).pixels
    if backend == "pytorch":
        import torch

        from sfedge.export import checkpoint as ckpt_io
        from sfedge.export.vision import reference_features
        torch.set_num_threads(os.cpu_count())
        c = ckpt_io.load(ckpt)
        run = lambda x: reference_features(c.model, c.vision, torch.from_numpy(x)).numpy()  # noqa: E731
        with torch.no_grad():
            run(px[:2])
            t0 = time.perf_counter()
            out = run(px)
    else:
        from sfedge.runtime.sessions import Graph
        if backend not in v["graphs"]:
            raise BackendUnavailable(f"the bundle has no {backend} vision graph")
        g = Graph(bundle / v["graphs"][backend], ["CPUExecutionProvider"])
        g.run({"frames": px[:2]})
        t0 = time.perf_counter()
        out = np.concatenate([g.run({"frames": px[i:i + 16]}) for i in range(0, len(px), 16)])
    dt = time.perf_counter() - t0
    np.save(CACHE / f"vision-{backend}.npy", out)
    return {"fps": frames / dt, "peak_rss": _peak()}


QA_MODES = {"slowfast": ("uniform", "slowfast"), "clip-selection": ("clip", "slowfast"),
            "prompt-guided": ("uniform", "prompt-guided"), "clip+prompt-guided": ("clip", "prompt-guided")}
QA_QUESTIONS = ("What is the rabbit doing?", "Is there a butterfly?", "What color is the sky?",
                "Does anything fall from a tree?")


def worker_question_aware(bundle: Path, video: str, mode: str) -> dict:
    """One video, then several different questions, one generated token each: what each question costs on top of
    the encoded video. The first question is left out (it prefills the video under every mode)."""
    from sfedge.runtime import Runtime

    selection, pooling = QA_MODES[mode]
    rt = Runtime.load(bundle, max_new_tokens=8, frame_selection=selection, pooling=pooling, candidates=128)
    v = rt.manifest["vision"]
    rt.vision.run_all({"frames": np.zeros((2, *v["image_size"], 3), np.uint8)})  # warm-up
    if rt.qa:
        rt.qa.text.embed("warm up")
    video_tokens = rt.encode(video)
    answers = [rt.ask(video_tokens, q, max_new_tokens=1) for q in QA_QUESTIONS]
    per_q = [{k: a.timings.get(k, 0.0) for k in ("question", "aggregate", "prefill")} for a in answers[1:]]
    return {"decode_s": video_tokens.timings["decode"], "encode_s": video_tokens.timings["encode"],
            "frames_encoded": len(video_tokens.frame_indices), "visual_tokens": answers[-1].visual_tokens,
            **{f"{k}_s": statistics.median(x[k] for x in per_q) for k in per_q[0]},
            "per_question_s": statistics.median(sum(x.values()) for x in per_q), "peak_rss": _peak()}


WATCH_RULES = [{"name": "what", "question": "What is happening?", "every": "10s", "window": "20s"},
               {"name": "who", "question": "Is anyone in the scene?", "every": "10s", "window": "20s"}]


def _looped_footage(size, seconds: float, fps: float = 25.0):
    """bigbuckbunny.mp4 then bikes.mp4, looped, as (t, frame) pairs: real footage for as long as a soak needs."""
    import cv2

    from sfedge.runtime.video import demo_video
    frames = []
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        cap = cv2.VideoCapture(str(demo_video().with_name(name)))
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(cv2.resize(f, size[::-1], interpolation=cv2.INTER_AREA))
        cap.release()
    return ((i / fps, frames[i % len(frames)]) for i in range(int(seconds * fps)))


def worker_watch(backend: str, bundle: Path, minutes: int) -> dict:
    from sfedge.runtime import Runtime
    from sfedge.runtime.pipeline import VisualTokens

    rt = Runtime.load(bundle, max_new_tokens=16)
    if backend == "ours":
        t0 = time.perf_counter()
        recs = [r for r in rt.watch(_looped_footage(rt.size, minutes * 60), WATCH_RULES, sample_fps=2)
                if r["kind"] == "answer"]
        wall = time.perf_counter() - t0
        lat = [r["latency_s"] for r in recs]
        return {"first_s": statistics.median(x["answer"] for x in lat[0::2]),
                "second_s": statistics.median(x["answer"] for x in lat[1::2]),
                "encode_per_frame_s": lat[-1]["encode_per_frame"], "stream_s_per_wall_s": minutes * 60 / wall,
                "answers": len(recs), "rss_warm_mb": recs[4]["rss_mb"],
                "rss_growth": (max(r["rss_mb"] for r in recs[4:]) - recs[4]["rss_mb"]) / recs[4]["rss_mb"],
                "peak_rss": _peak()}
    # From scratch: each question decodes nothing (frames are in memory) but encodes its 40-frame window again and
    # prefills the whole prompt: what a loop of rt.ask over clips would cost.
    window = [f for _, f in _looped_footage(rt.size, 20)][6::12][:40]  # 20 s at 2 frames/s, as the watcher keeps
    pixels = np.ascontiguousarray(np.stack(window)[..., ::-1])  # BGR -> RGB
    times = []
    for rule in WATCH_RULES * 3:
        t0 = time.perf_counter()
        vt = VisualTokens(rt.aggregate(rt.encode_pixels(pixels)), [], 0, "bench", "memory", {})
        rt.ask(vt, rule["question"], max_new_tokens=16)
        times.append(time.perf_counter() - t0)
    return {"first_s": statistics.median(times), "second_s": statistics.median(times), "peak_rss": _peak()}


WORKERS = {"llm": worker_llm, "e2e": worker_e2e, "vision": worker_vision, "llamacpp": worker_llamacpp,
           "scale": worker_scale, "watch": worker_watch, "question-aware": worker_question_aware}


def _spawn(kind: str, *args) -> dict:
    cmd = [sys.executable, "-m", "sfedge.export.bench", "_worker", kind, *map(str, args)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (run.stderr.strip().splitlines() or ["worker failed"])[-1]}


# ---------------------------------------------------------------- statistics -----------------------------------

def summarize(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(ours: dict, ref: dict, higher_is_better: bool) -> float | None:
    if not ours["median"] or not ref["median"]:
        return None
    return ours["median"] / ref["median"] if higher_is_better else ref["median"] / ours["median"]


def read_bandwidth(gb: float = 0.5) -> float:
    """Bytes per second read from memory by all cores at once (numpy sums, which release the GIL, over parts of
    an array far larger than the caches): what the decoders can use."""
    from concurrent.futures import ThreadPoolExecutor

    n = os.cpu_count() or 1
    a = np.ones(int(gb * 1e9 / 8))
    parts = np.array_split(a, n)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(np.sum, parts))
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            t.append(time.perf_counter() - t0)
    return a.nbytes / min(t)


# ---------------------------------------------------------------- suites ---------------------------------------

def bench_llm(bundle, ckpt, repeats, log) -> dict:
    from sfedge.runtime import manifest
    from sfedge.runtime.decoder import kv_bytes_per_token

    backends = ["ours", "transformers-fp32", "bnb-nf4", "llama.cpp Q4_0", "llama.cpp Q4_K_M"]
    contexts = {"short": SHORT, "video": VISUAL + QUESTION}
    raw = {(b, c): [] for b in backends for c in contexts}
    skipped = {}
    for r in range(repeats):
        for c, n in contexts.items():
            for b in backends:
                if b in skipped:
                    continue
                log(f"llm repeat {r + 1}/{repeats}: {b} at {n} tokens")
                res = (_spawn("llamacpp", b.split()[-1], ckpt, n) if b.startswith("llama.cpp")
                       else _spawn("llm", b, bundle, ckpt, n))
                if "error" in res:
                    skipped[b] = res["error"]
                    log(f"  skipped {b}: {res['error']}")
                    continue
                raw[(b, c)].append(res)
    m = manifest.load(bundle)
    files = [m["llm"]["graph"], *m["llm"].get("external_data", [])]
    weight_bytes = sum(m["artifacts"][f]["size"] for f in files)
    bw = read_bandwidth()
    table = {}
    for c, n in contexts.items():
        ref_p = summarize([x["prefill_s"] for x in raw[("transformers-fp32", c)]])
        ref_d = summarize([x["decode_tok_s"] for x in raw[("transformers-fp32", c)]])
        ceiling = bw / (weight_bytes + kv_bytes_per_token(m["llm"]) * n)
        for b in backends:
            if not raw[(b, c)]:
                continue
            p = summarize([x["prefill_s"] for x in raw[(b, c)]])
            d = summarize([x["decode_tok_s"] for x in raw[(b, c)]])
            mem = summarize([x["peak_rss"] / 1e6 for x in raw[(b, c)]])
            table[f"{b} @ {n}"] = {"prefill_s": p, "decode_tok_s": d, "peak_mb": mem,
                                   "prefill_speedup": ratio(p, ref_p, False), "decode_speedup": ratio(d, ref_d, True),
                                   "decode_vs_ceiling": d["median"] / ceiling if b == "ours" else None}
        table[f"ceiling @ {n}"] = {"decode_tok_s": {"median": ceiling}, "bytes_per_token":
                                   weight_bytes + kv_bytes_per_token(m["llm"]) * n, "read_bandwidth_gb_s": bw / 1e9}
    return {"results": table, "skipped": skipped}


def bench_e2e(bundle, ckpt, repeats, log, video="demo", frames=50) -> dict:
    raw = {"ours": [], "reference": []}
    for r in range(repeats):
        for b in raw:
            log(f"e2e repeat {r + 1}/{repeats}: {b}")
            res = _spawn("e2e", b, bundle, ckpt, video, frames)
            if "error" in res:
                raise BackendUnavailable(f"e2e {b} failed: {res['error']}")
            raw[b].append(res)
    out = {}
    for b, runs in raw.items():
        out[b] = {f"{q}_{k}": summarize([x[q][k] for x in runs]) for q in ("first", "follow_up")
                  for k in ("ttft_s", "total_s", "tokens")}
        out[b]["peak_mb"] = summarize([x["peak_rss"] / 1e6 for x in runs])
    o, ref = out["ours"], out["reference"]
    out["speedup"] = {k: ratio(o[k], ref[k], False) for k in o if k.endswith("_s")}
    out["memory_ratio"] = o["peak_mb"]["median"] / ref["peak_mb"]["median"]
    return out


def bench_vision(bundle, ckpt, repeats, log, video="demo", frames=32) -> dict:
    raw = {b: [] for b in ("pytorch", "fp32", "fp16", "int8")}
    skipped = {}
    for r in range(repeats):
        for b in raw:
            if b in skipped:
                continue
            log(f"vision repeat {r + 1}/{repeats}: {b}")
            res = _spawn("vision", b, bundle, ckpt, video, frames)
            if "error" in res:
                skipped[b] = res["error"]
                continue
            raw[b].append(res)
    ref_out = np.load(CACHE / "vision-pytorch.npy")
    ref = summarize([x["fps"] for x in raw["pytorch"]])
    out = {}
    for b, runs in raw.items():
        if not runs:
            continue
        f = summarize([x["fps"] for x in runs])
        got = np.load(CACHE / f"vision-{b}.npy").reshape(frames, -1).astype(np.float64)
        r = ref_out.reshape(frames, -1)
        cos = (got * r).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(r, axis=1))
        out[b] = {"fps": f, "speedup": ratio(f, ref, True), "min_cosine": float(cos.min()),
                  "peak_mb": summarize([x["peak_rss"] / 1e6 for x in runs])}
    return {"results": out, "skipped": skipped}


def bench_scale(bundle, ckpt, repeats, log, video="bikes") -> dict:
    from sfedge.runtime.video import demo_video

    source = str(demo_video().with_name("bikes.mp4")) if video == "bikes" else video  # 250 frames: room for 200
    stages = ("decode", "encode", "aggregate", "prefill", "generate")
    raw, skipped = {n: [] for n in SCALE_FRAMES}, {}
    for r in range(repeats):
        for n in SCALE_FRAMES:
            if n in skipped:
                continue
            log(f"scale repeat {r + 1}/{repeats}: {n} frames")
            res = _spawn("scale", bundle, source, n)
            if "error" in res:
                skipped[n] = res["error"]
                continue
            raw[n].append(res)
    out = {}
    for n, runs in raw.items():
        if runs:
            out[f"{n} frames"] = {**{f"{k}_s": summarize([x[k] for x in runs]) for k in stages},
                                  "visual_tokens": runs[0]["visual_tokens"],
                                  "per_token_s": summarize([x["per_token_s"] for x in runs]),
                                  "peak_mb": summarize([x["peak_rss"] / 1e6 for x in runs])}
    return {"results": out, "skipped": {f"{k} frames": v for k, v in skipped.items()}}


def bench_watch(bundle, ckpt, repeats, log, minutes=10) -> dict:
    raw = {"ours": [], "from scratch": []}
    for r in range(repeats):
        for b in raw:
            log(f"watch repeat {r + 1}/{repeats}: {b}")
            res = _spawn("watch", b.replace(" ", "-"), bundle, minutes)
            if "error" in res:
                raise BackendUnavailable(f"watch {b} failed: {res['error']}")
            raw[b].append(res)
    out = {b: {k: summarize([x[k] for x in runs]) for k in runs[0]} for b, runs in raw.items()}
    for b in out:
        out[b]["peak_mb"] = summarize([x["peak_rss"] / 1e6 for x in raw[b]])
        del out[b]["peak_rss"]
    ref = out["from scratch"]
    out["speedup"] = {k: ratio(out["ours"][k], ref[k], False) for k in ("first_s", "second_s")}
    return out


def bench_question_aware(bundle, ckpt, repeats, log, video="demo") -> dict:
    raw = {m: [] for m in QA_MODES}
    for r in range(repeats):
        for mode, runs in raw.items():
            log(f"question-aware repeat {r + 1}/{repeats}: {mode}")
            res = _spawn("question-aware", bundle, video, mode)
            if "error" in res:
                raise BackendUnavailable(f"question-aware {mode} failed: {res['error']}")
            runs.append(res)
    keys = ("decode_s", "encode_s", "question_s", "aggregate_s", "prefill_s", "per_question_s")
    out = {}
    for mode, runs in raw.items():
        out[mode] = {**{k: summarize([x[k] for x in runs]) for k in keys},
                     "frames_encoded": runs[0]["frames_encoded"], "visual_tokens": runs[0]["visual_tokens"],
                     "peak_mb": summarize([x["peak_rss"] / 1e6 for x in runs])}
    base = out["slowfast"]["per_question_s"]["median"]
    for mode in out:
        out[mode]["overhead_per_question_s"] = out[mode]["per_question_s"]["median"] - base
    return {"results": out}


# ---------------------------------------------------------------- report ---------------------------------------

def _fmt(v):
    if isinstance(v, dict) and "median" in v:
        if v["median"] is None:
            return "-"
        rng = f" [{v['min']:.3g}-{v['max']:.3g}]" if v.get("n", 1) > 1 else ""
        return f"{v['median']:.3g}{rng}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def markdown(report: dict) -> str:
    lines = [f"# sf-bench {report['suite']}", "", f"machine: {report['machine']}", f"command: `{report['command']}`",
             ""]
    res = report["data"].get("results", report["data"])
    rows = {k: v for k, v in res.items() if isinstance(v, dict)}
    cols = sorted({c for v in rows.values() for c in v})
    lines.append("| | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, v in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |")
    for k, v in report["data"].items():
        if not isinstance(v, dict) or k == "results":
            if k != "results":
                lines.append(f"\n{k}: {_fmt(v)}")
    for k, why in report["data"].get("skipped", {}).items():
        lines.append(f"\nskipped {k}: {why}")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res = report["data"].get("results", report["data"])
    fig, ax = plt.subplots(figsize=(8, 4))
    if report["suite"] == "scale":  # where the time goes, stage by stage, as frames grow
        names = list(res)
        left = np.zeros(len(names))
        for stage in ("decode", "encode", "aggregate", "prefill", "generate"):
            vals = np.array([res[n][f"{stage}_s"]["median"] or 0 for n in names])
            ax.barh(names, vals, left=left, label=stage)
            left += vals
        ax.set_xlabel("seconds (median)")
        ax.legend()
    else:
        key = {"llm": "decode_tok_s", "vision": "fps", "e2e": "first_total_s", "watch": "first_s",
               "question-aware": "per_question_s"}[report["suite"]]
        names = [k for k, v in res.items() if isinstance(v, dict) and isinstance(v.get(key), dict)
                 and v[key].get("median")]
        ax.barh(names, [res[n][key]["median"] for n in names])
        ax.set_xlabel(key)
    ax.set_title(f"sf-bench {report['suite']}")
    fig.tight_layout()
    path = out / f"{report['suite']}.png"
    fig.savefig(path)
    return path


def machine() -> str:
    import platform
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, *args = sys.argv[2:]
        fn = WORKERS[kind]
        conv = [Path(a) if "/" in a else (int(a) if a.isdigit() else a) for a in args]
        print(json.dumps(fn(*conv)))
        return 0
    p = argparse.ArgumentParser(prog="sf-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=["llm", "e2e", "vision", "scale", "watch", "question-aware"])
    p.add_argument("--bundle", type=Path, help="bundle to measure (default: the cached default workload)")
    p.add_argument("--checkpoint", type=Path, help="the bundle's source checkpoint, for the reference")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--video", help="video for e2e/vision (default: bigbuckbunny.mp4) and scale (default: bikes.mp4)")
    p.add_argument("--minutes", type=int, default=10, help="watch: minutes of stream time (default 10)")
    p.add_argument("--out", type=Path, help="write JSON, a markdown table and a PNG plot here")
    a = p.parse_args()
    log = lambda m: print(f"[sf-bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    CACHE.mkdir(parents=True, exist_ok=True)
    if a.bundle and a.checkpoint:
        bundle, ckpt = a.bundle.resolve(), a.checkpoint.resolve()
    elif a.bundle or a.checkpoint:
        raise BadInput("give both --bundle and --checkpoint (the reference needs the checkpoint), or neither")
    elif a.suite == "question-aware":
        ckpt, bundle = question_aware_bundle(log)
    else:
        ckpt, bundle = default_bundle(log)
    fn = {"llm": bench_llm, "e2e": bench_e2e, "vision": bench_vision, "scale": bench_scale,
          "watch": bench_watch, "question-aware": bench_question_aware}[a.suite]
    kw = {"video": a.video} if a.suite not in ("llm", "watch") and a.video else {}
    if a.suite == "watch":
        kw["minutes"] = a.minutes
    data = fn(bundle, ckpt, a.repeats, log, **kw)
    report = {"suite": a.suite, "machine": machine(), "command": " ".join(["sf-bench", *sys.argv[1:]]),
              "data": data}
    md = markdown(report)
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.suite}.json").write_text(json.dumps(report, indent=2))
        (a.out / f"{a.suite}.md").write_text(md)
        plot(report, a.out)
    return 0


def main() -> None:
    sys.exit(run_cli("sf-bench", _main))


if __name__ == "__main__":
    main()
