"""The suites: each lists its jobs, `collect` runs them round-robin for every repeat (backends alternate within a
repeat), and the suite turns the runs into medians, ranges and ratios against the reference."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from sfedge.runtime.errors import BackendUnavailable

from . import spawn
from .stats import peak_mb, ratio, summarize
from .workloads import CACHE, QA_MODES, batch_footage, bikes_video

SHORT, VISUAL, QUESTION = 30, 3680, 30
LLM_BACKENDS = ("ours", "transformers-fp32", "bnb-nf4", "llama.cpp Q4_0", "llama.cpp Q4_K_M", "llama.cpp Q8_0")
VISION_BACKENDS = ("pytorch", "fp32", "fp16", "int8")
SCALE_FRAMES = (8, 16, 32, 50, 100, 200)
SCALE_STAGES = ("decode", "encode", "aggregate", "prefill", "generate")
QA_KEYS = ("decode_s", "encode_s", "question_s", "aggregate_s", "prefill_s", "per_question_s")


class Job(NamedTuple):
    name: str  # its runs are collected under this name
    worker: str  # a name in workers.WORKERS
    args: dict
    group: str | None = None  # a failure skips the group's other jobs too (default: the job alone)


def collect(suite: str, jobs: list[Job], repeats: int, log, required: bool = False) -> tuple[dict, dict]:
    """({job name: [result per repeat]}, {skipped group: reason}). A failed worker skips its group for the rest
    of the suite, or, when the suite cannot go on without it (`required`), ends it with the reason."""
    runs, skipped = {j.name: [] for j in jobs}, {}
    for r in range(repeats):
        for job in jobs:
            group = job.group or job.name
            if group in skipped:
                continue
            log(f"{suite} repeat {r + 1}/{repeats}: {job.name}")
            try:
                runs[job.name].append(spawn.run(job.worker, job.args))
            except spawn.WorkerFailed as e:
                if required:
                    raise BackendUnavailable(f"{suite} {job.name} failed: {e}") from None
                skipped[group] = str(e)
                log(f"  skipped {group}: {e}")
    return runs, skipped


def _llm_job(backend: str, bundle: Path, ckpt: Path, n: int) -> Job:
    name = f"{backend} @ {n}"
    if backend == "ours":
        return Job(name, "llm_ours", {"bundle": bundle, "context": n}, backend)
    if backend.startswith("llama.cpp"):
        return Job(name, "llm_llamacpp", {"quant": backend.split()[-1], "context": n}, backend)
    return Job(name, "llm_torch", {"backend": backend, "checkpoint": ckpt, "context": n}, backend)


def llm(bundle: Path, ckpt: Path, repeats: int, log) -> dict:
    """Prefill and decode at a short and a video-length context, with the memory-bandwidth ceiling of a step."""
    from sfedge.runtime import manifest
    from sfedge.runtime.planner import decode_bytes_per_token
    from sfedge.runtime.targets import read_bandwidth

    contexts = (SHORT, VISUAL + QUESTION)
    runs, skipped = collect("llm", [_llm_job(b, bundle, ckpt, n) for n in contexts for b in LLM_BACKENDS],
                            repeats, log)
    m = manifest.load(bundle)
    bw = read_bandwidth(500 * 10**6, repeats=5)
    table = {}
    for n in contexts:
        ref = runs[f"transformers-fp32 @ {n}"]
        ref_p, ref_d = summarize([x["prefill_s"] for x in ref]), summarize([x["decode_tok_s"] for x in ref])
        step_bytes = decode_bytes_per_token(m, n)
        ceiling = bw / step_bytes
        for b in LLM_BACKENDS:
            got = runs[f"{b} @ {n}"]
            if not got:
                continue
            p, d = summarize([x["prefill_s"] for x in got]), summarize([x["decode_tok_s"] for x in got])
            table[f"{b} @ {n}"] = {"prefill_s": p, "decode_tok_s": d, "peak_mb": peak_mb(got),
                                   "prefill_speedup": ratio(p, ref_p, False), "decode_speedup": ratio(d, ref_d, True),
                                   "decode_vs_ceiling": d["median"] / ceiling if b == "ours" else None}
        table[f"ceiling @ {n}"] = {"decode_tok_s": {"median": ceiling}, "bytes_per_token": step_bytes,
                                   "read_bandwidth_gb_s": bw / 1e9}
    return {"results": table, "skipped": skipped}


def kernels(bundle: Path, ckpt: Path, repeats: int, log) -> dict:
    """The language model's weight-MatMul kernels at a decode step and a prefill chunk, against the decoder's own:
    the CPU-kind comparison behind the int8 prefill twin (the bundle is not used)."""
    from .kernels import DECODER, ROWS

    runs, _ = collect("kernels", [Job("kernels", "kernels", {})], repeats, log, required=True)
    got = runs["kernels"]
    speed = {name: summarize([x["gmacs"][name] for x in got]) for name in got[0]["gmacs"]}
    out = {name: {"gmac_s": s, "vs_decoder": ratio(s, speed[f"{DECODER} @ {name.rsplit(' @ ', 1)[1]}"], True)}
           for name, s in speed.items()}
    return {"results": out, "rows": list(ROWS)}


def e2e(bundle: Path, ckpt: Path, repeats: int, log, video: str = "demo", frames: int = 50) -> dict:
    """A question about a real video, then a follow-up, against the reference pipeline."""
    args = {"bundle": bundle, "video": video, "frames": frames}
    runs, _ = collect("e2e", [Job("ours", "e2e_ours", args),
                              Job("reference", "e2e_reference", {**args, "checkpoint": ckpt})],
                      repeats, log, required=True)
    out = {}
    for b, got in runs.items():
        out[b] = {f"{q}_{k}": summarize([x[q][k] for x in got]) for q in ("first", "follow_up")
                  for k in ("ttft_s", "total_s", "tokens")}
        out[b]["peak_mb"] = peak_mb(got)
    o, ref = out["ours"], out["reference"]
    out["speedup"] = {k: ratio(o[k], ref[k], False) for k in o if k.endswith("_s")}
    out["memory_ratio"] = o["peak_mb"]["median"] / ref["peak_mb"]["median"]
    return out


def vision(bundle: Path, ckpt: Path, repeats: int, log, video: str = "demo", frames: int = 32) -> dict:
    """Frames per second of each vision graph against PyTorch eager, and the lowest per-frame cosine to it."""
    args = {"bundle": bundle, "video": video, "frames": frames}
    jobs = [Job("pytorch", "vision_pytorch", {**args, "checkpoint": ckpt}),
            *(Job(b, "vision_ours", {**args, "variant": b}) for b in VISION_BACKENDS[1:])]
    runs, skipped = collect("vision", jobs, repeats, log)
    want = np.load(CACHE / "vision-pytorch.npy").reshape(frames, -1)
    ref = summarize([x["fps"] for x in runs["pytorch"]])
    out = {}
    for b, got in runs.items():
        if not got:
            continue
        f = summarize([x["fps"] for x in got])
        have = np.load(CACHE / f"vision-{b}.npy").reshape(frames, -1).astype(np.float64)
        cos = (have * want).sum(1) / (np.linalg.norm(have, axis=1) * np.linalg.norm(want, axis=1))
        out[b] = {"fps": f, "speedup": ratio(f, ref, True), "min_cosine": float(cos.min()), "peak_mb": peak_mb(got)}
    return {"results": out, "skipped": skipped}


def scale(bundle: Path, ckpt: Path, repeats: int, log, video: str = "bikes") -> dict:
    """The cost of each stage of our path as the frame count (and so the context) grows."""
    source = bikes_video() if video == "bikes" else video
    jobs = [Job(f"{n} frames", "scale", {"bundle": bundle, "video": source, "frames": n}) for n in SCALE_FRAMES]
    runs, skipped = collect("scale", jobs, repeats, log)
    out = {name: {**{f"{k}_s": summarize([x[k] for x in got]) for k in SCALE_STAGES},
                  "visual_tokens": got[0]["visual_tokens"],
                  "per_token_s": summarize([x["per_token_s"] for x in got]), "peak_mb": peak_mb(got)}
           for name, got in runs.items() if got}
    return {"results": out, "skipped": skipped}


def watch(bundle: Path, ckpt: Path, repeats: int, log, minutes: float = 10, sources: tuple = ()) -> dict:
    """Standing questions over looped real footage, against answering each question from scratch; with `sources`,
    that many RTSP cameras in one process against as many processes (`watch_sources`)."""
    if sources:
        return watch_sources(bundle, repeats, log, minutes, sources)
    runs, _ = collect("watch", [Job("ours", "watch_ours", {"bundle": bundle, "minutes": minutes}),
                                Job("from scratch", "watch_from_scratch", {"bundle": bundle})],
                      repeats, log, required=True)
    out = {}
    for b, got in runs.items():
        out[b] = {k: summarize([x[k] for x in got]) for k in got[0] if k != "peak_rss"}
        out[b]["peak_mb"] = peak_mb(got)
    out["speedup"] = {k: ratio(out["ours"][k], out["from scratch"][k], False) for k in ("first_s", "second_s")}
    return out


def watch_sources(bundle: Path, repeats: int, log, minutes: float, sources: tuple) -> dict:
    """N cameras served over RTSP on the loopback address (looped real footage, ffmpeg-encoded H.264, GStreamer's
    RTSP server), watched by one `sf-run watch` process with N sources and by N processes with one each."""
    from . import rtsp_server

    missing = rtsp_server.available()
    if missing:
        raise BackendUnavailable(f"sf-bench watch --sources: {missing}")
    clip = _rtsp_footage(log, minutes * 60 + 60)
    port = _free_port()
    server = rtsp_server.start(port, {f"cam{i + 1}": clip for i in range(max(sources))})
    try:
        jobs = []
        for n in sources:
            args = {"bundle": bundle, "port": port, "sources": n, "minutes": minutes}
            jobs.append(Job(f"{n} cameras, 1 process", "watch_rtsp", {**args, "processes": 1}))
            if n > 1:
                jobs.append(Job(f"{n} cameras, {n} processes", "watch_rtsp", {**args, "processes": n}))
        runs, skipped = collect("watch", jobs, repeats, log)
    finally:
        server.kill()
    out = {name: {**{k: summarize([x[k] for x in got]) for k in got[0] if k != "peak_rss"}, "peak_mb": peak_mb(got)}
           for name, got in runs.items() if got}
    figures = {}
    for n in sources:
        one, many = out.get(f"{n} cameras, 1 process"), out.get(f"{n} cameras, {n} processes")
        if one and many:
            figures[f"memory, {n} cameras in 1 process / {n} processes"] = (one["peak_mb"]["median"]
                                                                           / many["peak_mb"]["median"])
    return {"results": out, "skipped": skipped, **figures}


def _rtsp_footage(log, seconds: float) -> Path:
    """bigbuckbunny.mp4 and bikes.mp4 looped in turns of a minute, at 640x360, as one H.264 MPEG-TS clip of
    `seconds` for the RTSP server (encoded once; cached)."""
    from sfedge.runtime.video import demo_video

    from .rtsp_server import clip

    out = CACHE / f"rtsp-footage-{int(seconds)}s.ts"
    if not out.exists():
        log(f"encoding {seconds / 60:.0f} minutes of footage with libx264 for the RTSP server (once; cached)")
    turns = [(str(demo_video().with_name(n)), 640, 360) for n in ("bigbuckbunny.mp4", "bikes.mp4")]
    return clip(out, [turns[i % 2] for i in range(max(1, round(seconds / 60)))], seconds)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def question_aware(bundle: Path, ckpt: Path, repeats: int, log, video: str = "demo") -> dict:
    """Per-question cost of CLIP frame selection and prompt-guided pooling against plain SlowFast."""
    jobs = [Job(mode, "question_aware", {"bundle": bundle, "video": video, "mode": mode}) for mode in QA_MODES]
    runs, _ = collect("question-aware", jobs, repeats, log, required=True)
    out = {mode: {**{k: summarize([x[k] for x in got]) for k in QA_KEYS},
                  "frames_encoded": got[0]["frames_encoded"], "visual_tokens": got[0]["visual_tokens"],
                  "peak_mb": peak_mb(got)}
           for mode, got in runs.items()}
    base = out["slowfast"]["per_question_s"]["median"]
    for mode in out:
        out[mode]["overhead_per_question_s"] = out[mode]["per_question_s"]["median"] - base
    return {"results": out}


NAIVE_VIDEOS = 6  # the naive loop is timed on these videos' questions: a quarter of the job, at its own rate
BATCH_RUNS = {"naive loop (sf-run ask per question)": ("batch_naive", {"videos": NAIVE_VIDEOS}),
              "sf-run batch, 1 worker": ("batch_cli", {"workers": 1}),
              "sf-run batch, 2 workers": ("batch_cli", {"workers": 2}),
              "sf-run batch --ray, 2 actors": ("batch_cli", {"workers": 2, "ray": True}),
              "Ray, 2 actors, cluster already up": ("batch_ray_joined", {"workers": 2})}


def batch(bundle: Path, ckpt: Path, repeats: int, log, videos: int = 24) -> dict:
    """Questions per minute over an archive of real clips (4 questions each): the naive loop, the local pool with
    1 and 2 workers, and Ray with 2 actors (the job starting its own cluster, and joining one already up)."""
    jobs = str(batch_footage(log, videos))
    runs, skipped = collect("batch", [Job(name, worker, {"bundle": bundle, "jobs": jobs, **args})
                                      for name, (worker, args) in BATCH_RUNS.items()], repeats, log)
    out = {name: {"questions_per_min": summarize([x["questions_per_min"] for x in got]),
                  "seconds": summarize([x["seconds"] for x in got]), "questions": got[0]["questions"],
                  "errors": got[0].get("errors", 0), "peak_mb": peak_mb(got)}
           for name, got in runs.items() if got}
    rate = {name: row["questions_per_min"] for name, row in out.items()}
    naive, local2 = rate.get(next(iter(BATCH_RUNS))), rate.get("sf-run batch, 2 workers")
    figures = {}
    if naive and "sf-run batch, 1 worker" in rate:
        figures["one_worker_vs_naive"] = ratio(rate["sf-run batch, 1 worker"], naive, True)
    for name in list(BATCH_RUNS)[3:]:
        if local2 and name in rate:  # how much slower than the local pool at the same worker count
            figures[f"ray_overhead ({name})"] = 1 - rate[name]["median"] / local2["median"]
    return {"results": out, "skipped": skipped, **figures}


SUITES = {"llm": llm, "kernels": kernels, "e2e": e2e, "vision": vision, "scale": scale, "watch": watch,
          "question-aware": question_aware, "batch": batch}
