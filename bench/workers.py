"""One function per measured thing, each run in a process of its own (`spawn`): it warms up, times its work and
returns plain JSON figures with the process's peak resident memory (the batch workers: the peak total of the
process tree they start, `treemem`). Our side goes through the runtime's public API;
the reference side (PyTorch, bitsandbytes, llama.cpp) is imported only in its own workers, so that our workers'
memory holds no torch."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sfedge.runtime.errors import BackendUnavailable, BadInput, DoesNotFit
from sfedge.runtime.memory import peak_rss

from .treemem import TreeMemory
from .workloads import CACHE, QA_MODES, QA_QUESTIONS, WATCH_RULES, looped_footage

DECODE_STEPS = 64
FIRST, FOLLOW_UP = "Describe the video.", "What is the main character doing?"


def _random_ids(context: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 40000, context)


def _decode_rate(step, logits) -> float:
    """Tokens per second over DECODE_STEPS greedy steps; `step(token)` returns the next logits."""
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = step(int(np.argmax(logits)))
    return DECODE_STEPS / (time.perf_counter() - t0)


def llm_ours(bundle, context: int) -> dict:
    """Our decoder: prefill of `context` random token embeddings, then greedy decode steps."""
    from sfedge.runtime import manifest
    from sfedge.runtime.llm import LanguageModel, decode_one_token

    lm = LanguageModel(Path(bundle), manifest.load(Path(bundle)), max_len=context + DECODE_STEPS + 8)
    embeds = lm.embed(_random_ids(context))
    lm.decoder.forward(embeds[:8])  # warm-up
    lm.decoder.rewind(0)
    t0 = time.perf_counter()
    logits = lm.decoder.forward(embeds)
    prefill = time.perf_counter() - t0
    return {"prefill_s": prefill, "decode_tok_s": _decode_rate(lambda tok: decode_one_token(lm, tok), logits),
            "peak_rss": peak_rss()}


def kernels() -> dict:
    """GMAC/s of each weight-MatMul kernel variant (bench/kernels.py), alternated in this one process."""
    from .kernels import measure

    return {"gmacs": measure(), "peak_rss": peak_rss()}


def llm_torch(backend: str, checkpoint, context: int) -> dict:
    """The checkpoint's language model in transformers: "transformers-fp32", or "bnb-nf4" (bitsandbytes)."""
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.set_grad_enabled(False)
    model = _torch_lm(backend, Path(checkpoint))
    table = model.get_input_embeddings().weight.detach()
    embeds = table[torch.from_numpy(_random_ids(context))][None].float()
    model(inputs_embeds=embeds[:, :8])  # warm-up
    t0 = time.perf_counter()
    out = model(inputs_embeds=embeds, use_cache=True)
    logits = out.logits[0, -1].float().numpy()
    prefill = time.perf_counter() - t0
    cache = out.past_key_values

    def step(tok):
        nonlocal cache
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        return out.logits[0, -1].float().numpy()

    return {"prefill_s": prefill, "decode_tok_s": _decode_rate(step, logits), "peak_rss": peak_rss()}


def _torch_lm(backend: str, checkpoint: Path):
    import torch
    import transformers

    if backend not in ("transformers-fp32", "bnb-nf4"):
        raise BadInput(f"unknown backend {backend}")
    lm_dir = CACHE / "lm-hf"
    if not (lm_dir / "config.json").exists():
        from sfedge.export import checkpoint as ckpt_io
        from sfedge.export.streamed import LayerStream, causal_lm_folder

        ck = ckpt_io.load(checkpoint)
        causal_lm_folder(LayerStream(ck.shards, ck.model.config.text_config), lm_dir)
    if backend == "transformers-fp32":
        return transformers.AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    from sfedge.export.nf4 import bnb_config

    return transformers.AutoModelForCausalLM.from_pretrained(lm_dir, quantization_config=bnb_config(),
                                                             device_map="cpu").eval()


def llm_llamacpp(quant: str, context: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same SmolLM2 weights: the shipped Q4_1 GGUF requantized to `quant`.
    Token ids stand in for the embeddings (llama.cpp's Python API takes tokens); the cost per position is the same."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        raise BackendUnavailable("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    from sfedge.export.demo import GGUF, smollm2_dir

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
    ids = [int(i) for i in _random_ids(context)]
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):  # a fixed token: the cost of a step does not depend on which token it is
        llm.eval([100])
    return {"prefill_s": prefill, "decode_tok_s": DECODE_STEPS / (time.perf_counter() - t0), "peak_rss": peak_rss()}


def _warm_up(rt, video) -> None:
    """A session's first run pays for allocations and threads: pay it before the clock starts."""
    rt.ask(rt.encode(video, frames=2), "warm up", max_new_tokens=1)


def e2e_ours(bundle, video: str, frames: int) -> dict:
    """A question about a video given by path, then a follow-up: time to first token and total, 32 tokens each."""
    from sfedge.runtime import Runtime

    rt = Runtime.load(bundle, frames=frames, max_new_tokens=32)
    _warm_up(rt, video)
    res = {}
    for name, q in (("first", FIRST), ("follow_up", FOLLOW_UP)):
        t0 = time.perf_counter()
        s = rt.ask(video, q, max_new_tokens=32, min_new_tokens=32, stream=True)
        ttft = None
        for _ in s:
            ttft = ttft or time.perf_counter() - t0
        res[name] = {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "tokens": s.answer.generated_tokens}
    return {**res, "peak_rss": peak_rss()}


def e2e_reference(bundle, checkpoint, video: str, frames: int) -> dict:
    """The official SlowFast-LLaVA flow (`reference`): every question decodes, encodes and prefills again."""
    import torch

    from sfedge.export import checkpoint as ckpt_io
    from sfedge.export.vision import reference_features
    from sfedge.runtime import manifest
    from sfedge.runtime.video import read_frames

    from sfedge.export import reference

    torch.set_num_threads(os.cpu_count())
    (model, tokenizer), m = ckpt_io.whole(checkpoint), manifest.load(Path(bundle))
    v = m["vision"]

    def answer(q):
        t0 = time.perf_counter()
        first = _FirstToken(t0)
        px = read_frames(video, frames, tuple(v["image_size"])).pixels
        ids = reference.generate(model, tokenizer, m, px, q, 32, min_new_tokens=32, streamer=first)
        return {"ttft_s": first.seconds, "total_s": time.perf_counter() - t0, "tokens": len(ids)}

    with torch.no_grad():  # warm-up, as ours gets one
        reference_features(model, v, torch.zeros(2, *v["image_size"], 3, dtype=torch.uint8))
        model(inputs_embeds=model.get_input_embeddings().weight[:8][None])
    return {"first": answer(FIRST), "follow_up": answer(FOLLOW_UP), "peak_rss": peak_rss()}


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self, t0: float):
        self.t0, self.calls, self.seconds = t0, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.seconds = time.perf_counter() - self.t0

    def end(self):
        pass


def scale(bundle, video: str, frames: int) -> dict:
    """Our path's stages for one question about `frames` frames of the video."""
    from sfedge.runtime import Runtime

    try:
        rt = Runtime.load(bundle, frames=frames, max_new_tokens=16)
    except DoesNotFit as e:
        raise BackendUnavailable(str(e)) from None
    _warm_up(rt, video)
    ans = rt.ask(video, FIRST, max_new_tokens=16, min_new_tokens=16)
    return {**ans.timings, "visual_tokens": ans.visual_tokens, "frames": len(ans.frames_used),
            "per_token_s": ans.timings["generate"] / max(ans.generated_tokens, 1), "peak_rss": peak_rss()}


def _save_features(name: str, features: np.ndarray, frames: int, seconds: float) -> dict:
    """Frames per second; the features go to the cache, for the suite to compare with PyTorch's."""
    np.save(CACHE / f"vision-{name}.npy", features)
    return {"fps": frames / seconds, "peak_rss": peak_rss()}


def vision_ours(bundle, variant: str, video: str, frames: int) -> dict:
    """One of the bundle's vision graphs (fp32, fp16, int8) on ONNX Runtime's CPU provider, in the chunks the
    runtime encodes in on a CPU."""
    from sfedge.runtime import manifest
    from sfedge.runtime.planner import CPU_ENCODE_CHUNK
    from sfedge.runtime.sessions import Graph
    from sfedge.runtime.video import read_frames

    bundle = Path(bundle)
    v = manifest.load(bundle)["vision"]
    if variant not in v["graphs"]:
        raise BackendUnavailable(f"the bundle has no {variant} vision graph")
    px = read_frames(video, frames, tuple(v["image_size"])).pixels
    g = Graph(bundle / v["graphs"][variant])
    g.run({"frames": px[:2]})  # warm-up
    t0 = time.perf_counter()
    out = np.concatenate([g.run({"frames": px[i:i + CPU_ENCODE_CHUNK]})
                          for i in range(0, len(px), CPU_ENCODE_CHUNK)])
    return _save_features(variant, out, frames, time.perf_counter() - t0)


def vision_pytorch(bundle, checkpoint, video: str, frames: int) -> dict:
    """The checkpoint's vision tower and projector in PyTorch eager, fp32."""
    import torch

    from sfedge.export import checkpoint as ckpt_io
    from sfedge.export.vision import reference_features
    from sfedge.runtime import manifest
    from sfedge.runtime.video import read_frames

    torch.set_num_threads(os.cpu_count())
    v = manifest.load(Path(bundle))["vision"]
    px = read_frames(video, frames, tuple(v["image_size"])).pixels
    c = ckpt_io.load(checkpoint)
    with torch.no_grad():
        reference_features(c.model, c.vision, torch.from_numpy(px[:2]))  # warm-up
        t0 = time.perf_counter()
        out = reference_features(c.model, c.vision, torch.from_numpy(px)).numpy()
    return _save_features("pytorch", out, frames, time.perf_counter() - t0)


def question_aware(bundle, video: str, mode: str) -> dict:
    """One video, then several different questions, one generated token each: what each question costs on top of
    the encoded video. The first question is left out (it prefills the video under every mode)."""
    from sfedge.runtime import Runtime

    selection, pooling = QA_MODES[mode]
    rt = Runtime.load(bundle, max_new_tokens=8, frame_selection=selection, pooling=pooling, candidates=128)
    _warm_up(rt, video)
    video_tokens = rt.encode(video)
    answers = [rt.ask(video_tokens, q, max_new_tokens=1) for q in QA_QUESTIONS]
    per_q = [{k: a.timings.get(k, 0.0) for k in ("question", "aggregate", "prefill")} for a in answers[1:]]
    return {"decode_s": video_tokens.timings["decode"], "encode_s": video_tokens.timings["encode"],
            "frames_encoded": len(video_tokens.frame_indices), "visual_tokens": answers[-1].visual_tokens,
            **{f"{k}_s": statistics.median(x[k] for x in per_q) for k in per_q[0]},
            "per_question_s": statistics.median(sum(x.values()) for x in per_q), "peak_rss": peak_rss()}


def watch_ours(bundle, minutes: int) -> dict:
    """rt.watch over `minutes` of looped footage: per-answer latency, throughput and memory growth."""
    from sfedge.runtime import Runtime

    rt = Runtime.load(bundle, max_new_tokens=16)
    t0 = time.perf_counter()
    recs = [r for r in rt.watch(looped_footage(tuple(rt.manifest["vision"]["image_size"]), minutes * 60),
                                WATCH_RULES, sample_fps=2) if r["kind"] == "answer"]
    wall = time.perf_counter() - t0
    lat = [r["latency_s"] for r in recs]
    warm = recs[4]["rss_mb"]
    return {"first_s": statistics.median(x["answer"] for x in lat[0::2]),
            "second_s": statistics.median(x["answer"] for x in lat[1::2]),
            "encode_per_frame_s": lat[-1]["encode_per_frame"], "stream_s_per_wall_s": minutes * 60 / wall,
            "answers": len(recs), "rss_warm_mb": warm,
            "rss_growth": (max(r["rss_mb"] for r in recs[4:]) - warm) / warm, "peak_rss": peak_rss()}


def watch_from_scratch(bundle) -> dict:
    """What a loop of rt.ask over clips would cost: each question decodes nothing (the frames are in memory) but
    encodes its 40-frame window again and prefills the whole prompt."""
    from sfedge.runtime import Runtime, VisualTokens

    rt = Runtime.load(bundle, max_new_tokens=16)
    size = tuple(rt.manifest["vision"]["image_size"])
    window = [f for _, f in looped_footage(size, 20)][6::12][:40]  # 20 s at 2 frames/s, as the watcher keeps
    pixels = np.ascontiguousarray(np.stack(window)[..., ::-1])  # BGR -> RGB
    times = []
    for rule in WATCH_RULES * 3:
        t0 = time.perf_counter()
        tokens = rt.aggregate(rt.encode_pixels(pixels))
        vt = VisualTokens(tokens, frame_indices=[], total_frames=0, decode_method="memory", timings={})
        rt.ask(vt, rule["question"], max_new_tokens=16)
        times.append(time.perf_counter() - t0)
    return {"first_s": statistics.median(times), "second_s": statistics.median(times), "peak_rss": peak_rss()}


def watch_rtsp(bundle, port: int, sources: int, processes: int, minutes: float) -> dict:
    """`sources` RTSP cameras (cam1, cam2, ... on the loopback server at `port`) watched for `minutes` of wall time
    by `sf-run watch`: all in one process, or one process per camera (processes == sources). Answers per minute,
    per-question latency, frames dropped, and the peak memory of the processes together (PSS, so shared library
    pages count once)."""
    import signal

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(yaml.safe_dump(WATCH_RULES))
        cams = [f"cam{i + 1}=rtsp://127.0.0.1:{port}/cam{i + 1}" for i in range(sources)]
        groups = [cams] if processes == 1 else [[c] for c in cams]
        outs = [Path(tmp) / f"run{i}.jsonl" for i in range(len(groups))]
        with TreeMemory(interval=1.0) as mem:
            procs = [subprocess.Popen(_sf_run("watch", str(bundle), *(a for c in g for a in ("--source", c)),
                                              "--rules", str(rules), "--sample-fps", "2", "--max-new-tokens", "16",
                                              "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
                     for g, out in zip(groups, outs)]
            time.sleep(minutes * 60)
            for p in procs:
                p.send_signal(signal.SIGTERM)
            errors = [p.communicate(timeout=120)[1] for p in procs]
        failed = [e.strip().splitlines()[-1] for p, e in zip(procs, errors) if p.returncode]
        if failed:
            raise BackendUnavailable(f"sf-run watch failed: {failed[0]}")
        runs = [[json.loads(line) for line in out.read_text().splitlines()] for out in outs]
    answers = [r for recs in runs for r in recs if r["kind"] == "answer" and r["answer"] is not None]
    ends = [e for recs in runs for e in ([recs[-1]] if "sources" not in recs[-1] else recs[-1]["sources"].values())]
    first = [r["latency_s"]["answer"] for r in answers if not r["reused_prefix"]]
    reused = [r["latency_s"]["answer"] for r in answers if r["reused_prefix"]]
    stale = sorted(r["latency_s"]["since_last_frame"] for r in answers)
    return {"answers_per_min": len(answers) / minutes, "first_s": statistics.median(first),
            "second_s": statistics.median(reused) if reused else None,
            "since_last_frame_s": statistics.median(stale), "since_last_frame_p90_s": stale[int(0.9 * len(stale))],
            "skipped_due": sum(r["skipped_due"] for recs in runs for r in recs if r["kind"] == "answer"),
            "sampled": sum(e["frames"]["sampled"] for e in ends), "dropped": sum(e["frames"]["dropped"] for e in ends),
            "gaps": sum(r["kind"] == "gap" for recs in runs for r in recs),
            "rss_growth": max(_growth([r for r in recs if r["kind"] == "answer"]) for recs in runs),
            "peak_rss": mem.peak}


def _growth(answers: list) -> float:
    """Resident memory growth after warm-up (the first quarter of the answers) to the most it reached after."""
    warm = answers[len(answers) // 4]["rss_mb"]
    return (max(r["rss_mb"] for r in answers[len(answers) // 4:]) - warm) / warm


def _sf_run(*args: str) -> list[str]:
    """The `sf-run` command line, run with this interpreter (what the sf-run script does)."""
    return [sys.executable, "-m", "sfedge.runtime.cli", *args]


def _rate(questions: int, seconds: float, peak: int, **more) -> dict:
    return {"questions": questions, "seconds": seconds, "questions_per_min": questions * 60 / seconds,
            "peak_rss": peak, **more}


def batch_naive(bundle, jobs: str, videos: int) -> dict:
    """The shell loop `sf-run batch` replaces: one `sf-run ask` process per question (the bundle loaded and the
    video encoded every time), over the jobs of the first `videos` videos."""
    rows = [json.loads(line) for line in Path(jobs).read_text().splitlines()]
    kept = list(dict.fromkeys(r["video"] for r in rows))[:videos]
    rows = [r for r in rows if r["video"] in kept]
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        for r in rows:
            subprocess.run(_sf_run("ask", str(bundle), "--video", str(Path(jobs).parent / r["video"]), "--question",
                                   r["question"], "--style", r["style"], "--max-new-tokens", str(r["max_new_tokens"]),
                                   "--json"), check=True, capture_output=True)
        seconds = time.perf_counter() - t0
    return _rate(len(rows), seconds, mem.peak)


def batch_cli(bundle, jobs: str, workers: int, ray: bool = False) -> dict:
    """`sf-run batch` on the jobs file, start to finish (worker start-up, and with --ray the local cluster's)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        cmd = _sf_run("batch", str(bundle), "--jobs", jobs, "--out", str(out), "--workers", str(workers),
                      "--max-new-tokens", "32", *(["--ray"] if ray else []))
        with TreeMemory() as mem:
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return _rate(len(rows), seconds, mem.peak, errors=sum(r["status"] != "ok" for r in rows))


def batch_ray_joined(bundle, jobs: str, workers: int) -> dict:
    """The same job through the Python API on a Ray cluster that is already up (started here, untimed): Ray's
    cost per job without the cluster's start-up, as on a long-lived multi-node cluster."""
    import ray

    from sfedge.runtime.batch import run_batch
    from sfedge.runtime.jobs import read_jobs
    from sfedge.runtime.pipeline import Settings

    with TreeMemory(include_self=True) as mem, tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        t0 = time.perf_counter()
        summary = run_batch(bundle, read_jobs(jobs), Path(tmp) / "results.jsonl", Settings(max_new_tokens=32),
                            workers=workers, ray="", progress=False)
        seconds = time.perf_counter() - t0
        ray.shutdown()
    return _rate(summary.answered, seconds, mem.peak, errors=summary.errors)


WORKERS = {f.__name__: f for f in (llm_ours, llm_torch, llm_llamacpp, kernels, e2e_ours, e2e_reference, scale,
                                   vision_ours, vision_pytorch, question_aware, watch_ours, watch_from_scratch,
                                   watch_rtsp, batch_naive, batch_cli, batch_ray_joined)}
