"""sf-run batch: a fixed set of questions over an archive of videos. Each video is decoded and encoded once for all
its questions (the KV prefix is reused across them), on a local pool of worker processes (`pool`) or on Ray actors
(`ray_batch`); results are appended as they arrive (`results`), each job id exactly once."""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from . import manifest as manifest_io
from .answering import error_row
from .errors import DoesNotFit
from .jobs import Job, by_video
from .memory import available_memory
from .pipeline import Settings, plan_for
from .pool import run_local
from .question_aware import check_modes
from .ray_batch import run_on_ray
from .results import Results
from .units import human

LOST = "no answer came back: its worker process died every time it worked on this video"


@dataclass
class Summary:
    jobs: int  # in the jobs file
    skipped: int  # already in the output (--resume)
    answered: int  # rows written by this run, errors included
    errors: int
    videos: int  # videos whose questions are all written
    seconds: float
    workers: int
    stopped: bool  # interrupted: the output is whole but unfinished

    def line(self) -> str:
        per_min = 60 / max(self.seconds, 1e-9)
        text = (f"{self.answered} answered ({self.errors} errors), {self.videos} videos, in {self.seconds:.1f} s: "
                f"{self.answered * per_min:.1f} questions/min, {self.videos * per_min:.2f} videos/min on "
                f"{self.workers} worker(s)")
        if self.skipped:
            text += f"; {self.skipped} were already done"
        if self.stopped:
            text += f"; stopped with {self.jobs - self.skipped - self.answered} left: --resume finishes the job"
        return text


def run_batch(bundle, jobs: list[Job], out, settings: Settings = Settings(), sampling: dict | None = None,
              workers: int | str = "auto", ray: str | None = None, resume: bool = False,
              jobs_label: str = "the jobs", progress: bool = True, stop: threading.Event | None = None) -> Summary:
    """Answer every job not already in `out`. `ray`: None runs the local pool; "" starts a local Ray cluster; an
    address joins one. `stop` set (the CLI's Ctrl-C): the current answers finish and the run returns."""
    stop = stop or threading.Event()
    bundle = str(Path(bundle).absolute())  # Ray actors on other nodes open the same path
    manifest = manifest_io.load(Path(bundle), hash_cache=manifest_io.HashCache())
    check_modes(Path(bundle), manifest, settings.frame_selection, settings.pooling, settings.candidates)
    results = Results(out, {j.id for j in jobs}, jobs_label, resume)  # refusals come before any work
    todo = [j for j in jobs if j.id not in results.done]
    groups = by_video(todo)
    settings = replace(settings, max_new_tokens=max([settings.max_new_tokens] + [j.max_new_tokens for j in todo]))
    sampling = sampling or {}
    finished, n = False, 0
    try:
        if ray is None and groups:  # planned before the progress bar shows: a share that does not fit is refused
            n, worker_settings = local_workers(manifest, settings, workers, len(groups))
        with _Tally(results, todo, progress) as tally:
            if ray is not None and groups:
                actor_bytes = plan_for(manifest, settings).total
                n = run_on_ray(ray, bundle, settings, sampling, groups, workers, actor_bytes, tally.on_row, stop,
                               tally.note)
            elif groups:
                run_local(bundle, worker_settings, sampling, groups, n, tally.on_row, stop, tally.note)
            if not stop.is_set():
                for job in todo:  # a video that took down its worker every time it was tried
                    if job.id not in results.done:
                        tally.on_row(error_row(job.to_dict(), LOST))
            finished = all(j.id in results.done for j in todo)  # a late Ctrl-C may find everything done
    finally:
        results.close(finished)
    return Summary(len(jobs), len(jobs) - len(todo), tally.answered, tally.errors, tally.videos, tally.seconds(), n,
                   not finished)


class _Tally:
    """Writes the rows, counts them, and shows the progress bar (questions/s and ETA; videos/s alongside) with any
    notes printed above it."""

    def __init__(self, results: Results, todo: list[Job], progress: bool):
        self.results = results
        self.path_of = {j.id: j.path for j in todo}
        self.left = Counter(self.path_of.values())  # unanswered questions per video
        self.answered = self.errors = self.videos = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=len(todo), file=sys.stderr, disable=not progress, dynamic_ncols=True, smoothing=0.1,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} questions [{elapsed}<{remaining}{postfix}]")

    def on_row(self, row: dict) -> None:
        if not self.results.write(row):
            return
        self.answered += 1
        self.errors += row["status"] == "error"
        path = self.path_of[row["id"]]
        self.left[path] -= 1
        self.videos += self.left[path] == 0
        t = self.seconds()
        self.bar.set_postfix_str(f"{self.answered / t:.2f} questions/s, {self.videos / t:.2f} videos/s, "
                                 f"{self.videos}/{len(self.left)} videos, {self.errors} errors", refresh=False)
        self.bar.update(1)

    def note(self, message: str) -> None:
        tqdm.write(f"[sf-run] {message}", file=sys.stderr)

    def __enter__(self) -> "_Tally":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def local_workers(manifest: dict, settings: Settings, requested: int | str, videos: int) -> tuple[int, Settings]:
    """How many worker processes, and each one's settings: an equal share of the memory budget (planned, so a
    share too small is refused before any work) and of the cores. "auto": the most workers, up to one per core
    and one per video, whose plans fit the budget, or without one the memory available now."""
    cores = len(os.sched_getaffinity(0))
    budget = settings.budget
    if requested == "auto":
        room = budget or available_memory()
        for n in range(max(min(cores, videos), 1), 0, -1):
            try:
                plan = plan_for(manifest, _share(settings, budget, n))
            except DoesNotFit:
                if n == 1:
                    raise
                continue
            if n == 1 or room is None or n * plan.total <= room:
                break
    else:
        n = max(min(int(requested), videos), 1)
        try:
            plan_for(manifest, _share(settings, budget, n))
        except DoesNotFit as e:
            if n == 1 or budget is None:
                raise
            raise DoesNotFit(f"{n} workers share the {human(budget)} memory budget, {human(budget // n)} "
                             f"each: {e}") from None
    return n, replace(_share(settings, budget, n), threads=settings.threads or max(1, cores // n))


def _share(settings: Settings, budget: int | None, n: int) -> Settings:
    """One of n workers' settings: an equal share of the memory budget."""
    return replace(settings, memory_budget=budget // n if budget else None)
