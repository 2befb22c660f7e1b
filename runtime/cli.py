"""sf-run: answer questions about videos from a bundle (ask), watch a camera or stream with standing questions
(watch), answer a jobs file over many videos (batch), or show the memory plan (plan)."""
from __future__ import annotations

import argparse
import json
import re
import sys

from . import prompt as prompts
from .clitools import run_cli, stop_if_interrupted
from .errors import BadInput, DoesNotFit
from .units import parse_size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sf-run", description="Run a SlowFast Edge bundle.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ask", help="answer a question about a video or image",
                       description="Answer a question about a video or image; the answer streams to stdout.")
    a.add_argument("bundle")
    a.add_argument("--video", required=True, help="video or image file, or 'demo' for the built-in footage")
    a.add_argument("--question", "-q", action="append", required=True,
                   help="the question; repeat for follow-ups about the same video (its KV cache is reused)")
    answer_options(a)
    a.add_argument("--choice", choices=list(prompts.CHOICES),
                   help="with --options: letter lists them and reads the answer's letter; text scores each option's "
                        "own text as the answer (for small models; default: the bundle's, usually letter)")
    runtime_options(a, "e.g. 2GB: plan chunk sizes to fit, or refuse with the reason")
    a.add_argument("--json", action="store_true", help="print one JSON object per question instead of text")
    question_aware_options(a)
    pooling_temperature_option(a)
    w = sub.add_parser("watch", help="standing questions over a camera, network stream or file; JSON lines out",
                       description="Ask standing questions about the last N seconds of a camera, network stream "
                                   "or file, or of many with one loaded model, at fixed intervals; one JSON line "
                                   "per answer (and per stream gap or lost source), each naming its source. "
                                   "SIGINT / SIGTERM stop after the current answer; nothing is lost.")
    w.add_argument("bundle")
    w.add_argument("--source", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="camera index (0) or /dev/videoN, a URL (rtsp://, http:// MJPEG, anything FFmpeg opens), "
                        "or a video file; repeat as NAME=SOURCE to watch many with one loaded model")
    w.add_argument("--sources", help="YAML file of sources: name, url, optional rules or questions, sample_fps, "
                                     "max_outage, rtsp_transport")
    w.add_argument("--rtsp-transport", default="tcp", choices=["tcp", "udp"],
                   help="how RTSP sources carry their packets (default tcp)")
    w.add_argument("--question", "-q", action="append", default=[], help="a standing question (repeatable)")
    w.add_argument("--every", action="append", help="interval per question, e.g. 10s (once for all, or per "
                                                    "question; default 10s)")
    w.add_argument("--window", action="append", help="how far back each question looks, e.g. 20s (default 20s)")
    w.add_argument("--trigger", action="append", help="regular expression on the answer that marks an event "
                                                      "(once for all, or per question)")
    w.add_argument("--rules", help="YAML file of rules: question, every, window, optional name and trigger")
    w.add_argument("--sample-fps", type=float, default=2.0, help="frames kept per second of stream (default 2)")
    w.add_argument("--realtime", action="store_true",
                   help="play a file at its native frame rate, dropping frames the encoder cannot keep up with "
                        "(default: as fast as possible, nothing dropped)")
    w.add_argument("--max-outage", default="10m",
                   help="give up on a source when it stays down this long (default 10m); the others go on")
    w.add_argument("--out", help="append JSON lines to this file (flushed per line) instead of stdout")
    w.add_argument("--max-new-tokens", type=int, default=64)
    w.add_argument("--frames", type=int, help="most frames per window (default: the bundle's, usually 50)")
    runtime_options(w, "e.g. 2GB: plan chunk sizes to fit, the feature ring buffer included")
    batch_parser(sub)
    plan_parser(sub)
    return p


def plan_parser(sub) -> None:
    from .config_plan import EMBED_WIDTH, SLOW_POOLS
    from .targets import TARGETS

    pl = sub.add_parser("plan", help="print the memory plan of a bundle, or of a checkpoint before export",
                        description="Print what a question costs in memory, and the settings that fit a budget: "
                                    "from a bundle, or before export from a checkpoint's config.json (a folder, or "
                                    "a hub id owner/name: config.json alone is fetched), for the bundle sf-export "
                                    "would write with the same options. --target checks the plan against a device "
                                    "and predicts its decode speed.")
    pl.add_argument("bundle", metavar="BUNDLE|CHECKPOINT|HUB_ID")
    pl.add_argument("--target", help=f"a device to fit: {', '.join(TARGETS)}, or this (this machine: its memory "
                                     f"available now, its read bandwidth probed once)")
    pl.add_argument("--memory-budget", help="e.g. 6GB (with --target: instead of the target's usable memory)")
    pl.add_argument("--frames", type=int, help="frames per video (default: the bundle's; a checkpoint: 50)")
    pl.add_argument("--max-new-tokens", type=int, default=128)
    pl.add_argument("--vision", choices=["fp32", "fp16", "int8"])
    question_aware_options(pl)
    g = pl.add_argument_group("a checkpoint or hub id: sf-export's options (a bundle has them already)")
    g.add_argument("--revision", help="hub id: a branch, tag or commit (default main)")
    g.add_argument("--slow-frames", type=int, help="slow-pathway frames (default 10)")
    g.add_argument("--slow-pool", choices=SLOW_POOLS, help="default max1d")
    g.add_argument("--fast-grid", type=_grid, help="fast-pathway grid per frame, HxW (default 4x4)")
    g.add_argument("--llm-precision", choices=["int4", "int8"], help="the language model's weights (default int4)")
    g.add_argument("--block-size", type=int, choices=[32, 64, 128], help="4-bit block size (default 32)")
    g.add_argument("--embeddings", choices=list(EMBED_WIDTH), help="embedding table dtype (default float16)")
    g.add_argument("--kv-cache", choices=["float32", "int8"], help="KV-cache precision (default float32)")
    g.add_argument("--prefill", choices=["auto", "int8", "none"],
                   help="the int8 prefill twin (default auto: written when its weights stay under 1.5 GB)")


def _grid(value: str) -> tuple:
    try:
        h, w = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HxW such as 4x4") from None
    return h, w


def batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="questions over many videos, each encoded once; JSON lines or Parquet out",
                       description="Answer a jobs file (or every video of a folder with the same questions), each "
                                   "video decoded and encoded once for all its questions, on local worker processes "
                                   "or a Ray cluster. Results are appended as they arrive, one per job id; --resume "
                                   "skips the ids already in --out. Ctrl-C finishes the current answers and stops.")
    b.add_argument("bundle")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--jobs", help="JSON lines (.jsonl), CSV or Parquet rows of id, video, question and "
                                       "optionally options, style, max_new_tokens")
    source.add_argument("--videos", help="a folder of videos, or a glob ('clips/**/*.mp4'); with --question")
    b.add_argument("--question", "-q", action="append", default=[],
                   help="with --videos: a question for every video (repeatable); ids are VIDEO::QUESTION")
    b.add_argument("--out", required=True, help="results: .jsonl (appended and flushed per answer) or .parquet")
    b.add_argument("--resume", action="store_true", help="continue --out: skip the ids already in it")
    b.add_argument("--workers", default="auto", type=_workers,
                   help="worker processes (or Ray actors), each holding one runtime; auto (default): from the "
                        "memory plan and the cores")
    b.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help='run on Ray (pip install ".[ray]"): alone, a local cluster; with an address (e.g. '
                        "10.0.0.5:6379 or auto), join that cluster")
    answer_options(b)
    runtime_options(b, "e.g. 6GB: shared equally by the local workers (with --ray: each actor's)")
    question_aware_options(b)
    pooling_temperature_option(b)


def _workers(value: str):
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of workers of at least 1, or auto")
    return int(value)


def answer_options(p) -> None:
    """How each question is answered: the same flags for ask and batch (a batch job's own fields win)."""
    p.add_argument("--options", nargs="+", help="multiple-choice options, listed as (A) ... (B) ...")
    p.add_argument("--style", default="plain", choices=list(prompts.STYLES),
                   help="answer prefill: open-ended starts 'In the video,', multiple-choice 'Best option:('")
    p.add_argument("--frames", type=int, help="frames to sample (default: the bundle's, usually 50)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)


def pooling_temperature_option(p) -> None:
    p.add_argument("--pooling-temperature", type=float,
                   help="prompt-guided pooling: softmax temperature inside each window (default: the bundle's, 0.01)")


def runtime_options(p, budget_help: str) -> None:
    """How a Runtime is loaded: the same flags for ask, watch and batch."""
    p.add_argument("--memory-budget", help=budget_help)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt", "auto"])
    p.add_argument("--vision", choices=["fp32", "fp16", "int8"], help="vision graph variant (default int8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")


def question_aware_options(p) -> None:
    p.add_argument("--frame-selection", default="uniform", choices=["uniform", "clip"],
                   help="clip: score --candidates frames against each question and keep the slow pathway's frames "
                        "by greedy NMS (needs a bundle exported with --clip; default uniform)")
    p.add_argument("--pooling", default="slowfast", choices=["slowfast", "prompt-guided"],
                   help="prompt-guided: PPLLaVA's question-weighted 3-D pooling (needs --clip at export)")
    p.add_argument("--candidates", type=int, default=128, help="frames scored by --frame-selection clip (default 128)")


def _err(msg):
    print(msg, file=sys.stderr, flush=True)


def _ask(a) -> int:
    from .pipeline import Runtime

    _err(f"[sf-run] loading {a.bundle}")
    rt = Runtime.load(a.bundle, device=a.device, memory_budget=a.memory_budget, frames=a.frames,
                      max_new_tokens=a.max_new_tokens, vision_variant=a.vision, threads=a.threads,
                      frame_selection=a.frame_selection, pooling=a.pooling, candidates=a.candidates,
                      pooling_temperature=a.pooling_temperature)
    _err(f"[sf-run] device {a.device}: {rt.provider}; plan: {rt.plan.frames} frames, {rt.plan.visual_tokens} visual "
         f"tokens ({a.frame_selection} frames, {a.pooling} pooling), context {rt.plan.context} "
         f"tokens, encode chunk {rt.plan.encode_chunk}")
    for note in rt.notes:
        _err(f"[sf-run] {note}")
    if rt.source_note:
        _err(f"[sf-run] note: {rt.source_note}")
    _err(f"[sf-run] decoding and encoding {a.video}")
    video = rt.encode(a.video, progress=lambda m: _err(f"[sf-run] {m}"))
    for note in video.notes:
        _err(f"[sf-run] {note}")
    _err(f"[sf-run] {video.count} visual tokens from {len(video.frame_indices)} frames ({video.decode_method})")
    for i, q in enumerate(a.question):
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                  seed=a.seed, style=a.style, options=a.options, choice=a.choice)
        s = rt.ask(video, q, stream=True, **kw)
        if a.json:
            for _ in s:
                stop_if_interrupted()
            ans = s.answer
            timings = dict(ans.timings)
            if i == 0:
                timings.update({k: video.timings[k] for k in video.timings})
            out = {**ans.to_dict(), "timings": timings}
            print(json.dumps(out), flush=True)
        else:
            if len(a.question) > 1:
                print(f"Q: {q}\nA: ", end="", flush=True)
            for piece in s:
                print(piece, end="", flush=True)
                stop_if_interrupted()
            print(flush=True)
            ans = s.answer
            t = dict(ans.timings, **(video.timings if i == 0 else {}))
            if rt.qa:
                _err(f"[sf-run] frames selected for this question: {ans.selected_frames}")
            if ans.option_logprobs:
                best = max(range(len(a.options)), key=ans.option_logprobs.__getitem__)
                _err(f"[sf-run] likeliest option: ({prompts.letters(len(a.options))[best]}) {a.options[best]}, "
                     f"log-probability {ans.option_logprobs[best]:.2f}")
            _err("[sf-run] " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()) +
                 f"; {ans.prompt_tokens} prompt tokens{' (video prefix reused)' if ans.reused_prefix else ''}, "
                 f"{ans.generated_tokens} generated; peak memory {ans.peak_memory_bytes / 1e6:.0f} MB")
            if not ans.generated_tokens:  # an empty answer is the model's, not a failure: say so
                _err("[sf-run] note: the model ended its answer at once (its first token was end-of-sequence)"
                     + ("" if a.style == "open-ended" else
                        f'; --style open-ended starts the answer with "{prompts.STYLES["open-ended"]}"'))
    return 0


def _watch_sources(a) -> list:
    """--source [NAME=]SOURCE ... or --sources FILE, as rules.SourceSpec."""
    from pathlib import Path

    from .rules import SourceSpec, load_sources

    if bool(a.source) == bool(a.sources):
        raise BadInput("give --source (repeatable, NAME=SOURCE for many) or --sources FILE")
    if a.sources:
        return load_sources(a.sources)
    specs = []
    for text in a.source:
        name, _, target = text.partition("=")
        # NAME=SOURCE only when NAME is a plain word: a URL's query (?a=b) or a file named a=b.mp4 is a source
        if not target or not re.fullmatch(r"[A-Za-z][\w.-]*", name) or Path(text).exists():
            name, target = None, text
        specs.append(SourceSpec(name, target))
    return specs


def _watch(a) -> int:
    import signal

    from .pipeline import Runtime
    from .rules import check_names, load_rules, parse_duration, rules_from_args

    sources = _watch_sources(a)
    rules = load_rules(a.rules) if a.rules else []
    if a.question:
        rules += rules_from_args(a.question, a.every, a.window, a.trigger)
    elif a.every or a.window or a.trigger:
        raise BadInput("--every, --window and --trigger go with --question")
    if not rules and any(s.rules is None for s in sources):
        raise BadInput("give at least one --question (with --every and --window) or --rules FILE")
    check_names(rules, "rules")
    max_outage = parse_duration(a.max_outage, "--max-outage")
    try:  # opened first: a bad path fails before the bundle loads
        out = open(a.out, "a", encoding="utf-8") if a.out else sys.stdout
    except OSError as e:
        raise BadInput(f"{a.out}: cannot open for appending ({e.strerror})") from None
    try:
        _err(f"[sf-run] loading {a.bundle}")
        rt = Runtime.load(a.bundle, device=a.device, memory_budget=a.memory_budget, frames=a.frames,
                          max_new_tokens=a.max_new_tokens, vision_variant=a.vision, threads=a.threads)
        watcher = rt.watch(sources, rules, sample_fps=a.sample_fps, realtime=a.realtime, max_outage=max_outage,
                           max_new_tokens=a.max_new_tokens, rtsp_transport=a.rtsp_transport)
        for note in rt.notes:
            _err(f"[sf-run] {note}")
        if rt.source_note:
            _err(f"[sf-run] note: {rt.source_note}")
        for s in watcher.streams:
            label = "" if s.name == s.source.label else f" ({s.source.label})"
            _err(f"[sf-run] watching {s.name}{label}: {len(s.rules)} rule(s), {1 / s.feed.period:g} frames/s")
        _err(f"[sf-run] one model for {len(watcher.streams)} source(s); plan:\n{watcher.rt.plan.table()}")
        stops = []

        def _stop(signum, frame):
            if stops:  # a second signal: stop now
                raise KeyboardInterrupt
            stops.append(signum)
            _err(f"[sf-run] {signal.Signals(signum).name}: finishing the current answer, then stopping")
            watcher.stop()

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        count = 0
        for record in watcher:
            out.write(json.dumps(record) + "\n")
            out.flush()
            count += record["kind"] == "answer"
            if record["kind"] == "lost":
                _err(f"[sf-run] {record['source']} lost: {record['reason']}")
        _err(f"[sf-run] {record['reason']}: {count} answers written")
        return 0
    finally:
        if out is not sys.stdout:
            out.close()


def _batch(a) -> int:
    import signal
    import threading

    from .batch import run_batch
    from .jobs import Defaults, jobs_from_videos, read_jobs
    from .pipeline import Settings

    defaults = Defaults(a.style, a.options, a.max_new_tokens)
    if a.jobs:
        if a.question:
            raise BadInput("--question goes with --videos: a jobs file gives each job its question")
        jobs, label = read_jobs(a.jobs, defaults), a.jobs
    elif a.question:
        jobs, label = jobs_from_videos(a.videos, a.question, defaults), f"{a.videos} with these questions"
    else:
        raise BadInput("--videos needs at least one --question")
    settings = Settings(device=a.device, memory_budget=a.memory_budget, frames=a.frames,
                        max_new_tokens=a.max_new_tokens, vision_variant=a.vision, threads=a.threads,
                        frame_selection=a.frame_selection, pooling=a.pooling, candidates=a.candidates,
                        pooling_temperature=a.pooling_temperature)
    sampling = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    stop = threading.Event()

    def _stop(signum, frame):
        if stop.is_set():  # a second signal: stop now
            raise KeyboardInterrupt
        stop.set()
        _err(f"[sf-run] {signal.Signals(signum).name}: finishing the current answers, then stopping")

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    _err(f"[sf-run] {len(jobs)} jobs from {label}; results to {a.out}")
    summary = run_batch(a.bundle, jobs, a.out, settings, sampling, a.workers, a.ray, a.resume, label, stop=stop)
    _err(f"[sf-run] {summary.line()}")
    return 130 if summary.stopped else 0


def _plan(a) -> int:
    from . import targets
    from .planner import fit_plan, least_plan, make_plan, most_frames

    m = _plan_manifest(a)
    budget = parse_size(a.memory_budget) if a.memory_budget else None
    settings = dict(max_new_tokens=a.max_new_tokens, vision_variant=a.vision, pooling=a.pooling,
                    candidates=a.candidates if a.frame_selection == "clip" else 0)
    if not a.target:
        print(make_plan(m, budget, a.frames, **settings).table())
        return 0
    target = targets.get(a.target)
    settings["device"] = target.device
    plan = fit_plan(m, budget or target.usable, a.frames, **settings)
    least = least_plan(m, a.frames, **settings).total
    fits = least <= plan.budget
    print(plan.table())
    print(targets.report(m, plan, target, least, 0 if fits else most_frames(m, plan.budget, plan.frames - 1,
                                                                             **settings)))
    return 0 if fits else DoesNotFit.exit_code


def _plan_manifest(a) -> dict:
    """The bundle's manifest, or the one sf-export would write from a checkpoint's config.json (a folder or a hub
    id), announced as such."""
    from . import hub
    from . import manifest as manifest_io
    from .config_plan import manifest_from_config, read_config
    from .question_aware import check_modes

    export_options = {"frames": a.frames, "slow_frames": a.slow_frames, "slow_pool": a.slow_pool,
                      "fast_grid": a.fast_grid, "llm_precision": a.llm_precision, "block_size": a.block_size,
                      "embeddings": a.embeddings, "kv_cache": a.kv_cache, "prefill": a.prefill}
    folder, record = hub.resolve(a.bundle, a.revision, file="config.json")
    if (folder / manifest_io.MANIFEST).is_file():
        fixed = [f"--{k.replace('_', '-')}" for k, v in export_options.items() if v is not None and k != "frames"]
        if fixed:
            raise BadInput(f"{', '.join(fixed)}: fixed when {folder} was exported; they go with a checkpoint or hub id")
        m = manifest_io.load(folder, hash_cache=manifest_io.HashCache())
        check_modes(folder, m, a.frame_selection, a.pooling, a.candidates)
        return m
    if not folder.is_dir():
        raise BadInput(f"{a.bundle}: no such bundle or checkpoint folder, and not a hub id (owner/name)")
    if not (folder / "config.json").is_file():
        raise BadInput(f"{folder}: neither a bundle (manifest.json) nor a checkpoint (config.json)")
    if (a.frame_selection, a.pooling) != ("uniform", "slowfast"):
        raise BadInput("question-aware modes are planned from a bundle exported with --clip: a checkpoint's "
                       "config.json has no CLIP side")
    where = f"{record['repo_id']}@{record['revision']}" if record else str(folder / "config.json")
    tokenizer = folder / "tokenizer.json"
    m = manifest_from_config(read_config(folder), where=where,
                             tokenizer_bytes=tokenizer.stat().st_size if tokenizer.is_file() else None,
                             **{k: v for k, v in export_options.items() if v is not None})
    agg, llm = m["aggregator"], m["llm"]
    print(f"plan of the bundle sf-export would write from {where} ({m['source']['architecture']}, "
          f"{m['source']['language_model']}): sizes predicted from config.json; {agg['num_frames']} frames, slow "
          f"{agg['slow_frames']} ({agg['slow_pool']}), fast {agg['fast_grid'][0]}x{agg['fast_grid'][1]}, int4 blocks "
          f"of {llm['quantization']['block_size']}, embeddings {llm['embeddings']['dtype']}")
    return m


def _main() -> int:
    a = parser().parse_args()
    if a.cmd == "ask":
        if a.max_new_tokens < 1:
            raise BadInput("--max-new-tokens must be at least 1")
        return _ask(a)
    if a.cmd == "watch":
        if a.max_new_tokens < 1:
            raise BadInput("--max-new-tokens must be at least 1")
        return _watch(a)
    if a.cmd == "batch":
        if a.max_new_tokens < 1:
            raise BadInput("--max-new-tokens must be at least 1")
        return _batch(a)
    return _plan(a)


def main() -> None:
    sys.exit(run_cli("sf-run", _main))


if __name__ == "__main__":
    main()
