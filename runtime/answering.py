"""The per-video loop of `sf-run batch`, shared by the local worker processes and the Ray actors: decode and encode a
video once, answer each of its questions on the reused KV prefix, and turn every failure into an error row so that
the job goes on."""
from __future__ import annotations

from .errors import SFEdgeError


def answer_video(rt, path: str, jobs: list[dict], sampling: dict, stop=lambda: False):
    """Result rows (dicts) for `jobs` (a video's questions, as jobs.Job dicts), one as each answer is done.
    `sampling`: temperature, top_p, top_k, seed. `stop()` true: return after the current answer."""
    try:
        video = rt.encode(path)
    except Exception as e:  # a missing, broken or undecodable video: its questions fail, the others go on
        for job in jobs:
            yield error_row(job, cause(e))
        return
    first = True
    for job in jobs:
        if stop():
            return
        try:
            ans = rt.ask(video, job["question"], max_new_tokens=job["max_new_tokens"], style=job["style"],
                         options=job["options"], **sampling)
        except Exception as e:  # one bad question (too long for the context, say) must not end the video
            yield error_row(job, cause(e))
            continue
        timings = dict(ans.timings)
        if first:  # the video's decode and encode are paid once, by its first answer
            timings.update(video.timings)
            first = False
        yield {**_row(job, "ok"), "answer": ans.text, "timings": timings, "frames_used": ans.frames_used,
               "visual_tokens": ans.visual_tokens, "generated_tokens": ans.generated_tokens,
               "reused_prefix": ans.reused_prefix}


def _row(job: dict, status: str) -> dict:
    return {"id": job["id"], "status": status, "video": job["video"], "question": job["question"], "answer": None,
            "error": None, "timings": None, "frames_used": None, "visual_tokens": None, "generated_tokens": None,
            "reused_prefix": None}


def error_row(job: dict, why: str) -> dict:
    return {**_row(job, "error"), "error": why}


def cause(e: BaseException) -> str:
    """One line: our errors say what went wrong already; anything else is named by its type."""
    text = str(e) if isinstance(e, SFEdgeError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())
