"""The jobs of `sf-run batch`: read from JSON lines, CSV or Parquet (or made from a folder of videos and a few
questions), checked whole before any work starts, and grouped by video so that each video is encoded once.

A job is `id`, `video`, `question`, and optionally `options` (a list; in CSV a JSON list), `style` and
`max_new_tokens`. A bad job is one line naming the file, the line and the field. Relative video paths are relative
to the jobs file; workers get absolute paths, so a Ray actor on another node opens the same file."""
from __future__ import annotations

import csv
import glob
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from . import prompt as prompts
from .errors import BackendUnavailable, BadInput

REQUIRED = ("id", "video", "question")
FIELDS = REQUIRED + ("options", "style", "max_new_tokens")
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}


@dataclass(frozen=True)
class Defaults:
    """What a job that leaves out an optional field gets: the command line's --style, --options, --max-new-tokens."""
    style: str = "plain"
    options: list | None = None
    max_new_tokens: int = 128


@dataclass(frozen=True)
class Job:
    id: str
    video: str  # as the job gave it: written back in the results
    path: str  # absolute (or "demo"): what a worker opens
    question: str
    options: list | None
    style: str
    max_new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_jobs(path, defaults: Defaults = Defaults()) -> list[Job]:
    """Every job of the file, checked; the first problem is a BadInput naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such jobs file")
    jobs, first_seen = [], {}
    for where, raw in _records(path):
        job = _job(path, where, raw, defaults)
        if job.id in first_seen:
            raise BadInput(f"{path}: {where}: field 'id': {job.id!r} is already the id of {first_seen[job.id]}")
        first_seen[job.id] = where
        jobs.append(job)
    if not jobs:
        raise BadInput(f"{path}: holds no jobs")
    return jobs


def jobs_from_videos(pattern: str, questions: list[str], defaults: Defaults = Defaults()) -> list[Job]:
    """Every video of a folder (or every file a glob matches) with each question; the id is `VIDEO::QUESTION`."""
    folder = Path(pattern)
    if folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
    else:
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
    if not files:
        raise BadInput(f"{pattern}: no videos there (give a folder of {', '.join(sorted(VIDEO_SUFFIXES))} files, "
                       f"or a glob)")
    for i, q in enumerate(questions):
        if q in questions[:i]:
            raise BadInput(f"--question {q!r} is given twice")
        _check_text(q, lambda cause: BadInput(f"--question {q!r}: {cause}"))
    return [Job(f"{f}::{q}", str(f), str(f.absolute()), q, defaults.options, defaults.style,
                defaults.max_new_tokens) for f in files for q in questions]


def by_video(jobs: list[Job]) -> list[tuple[str, list[Job]]]:
    """(path, its jobs) in the order videos first appear: one encode per video, whatever the file's order."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.path, []).append(job)
    return list(groups.items())


def _records(path: Path):
    """(where, dict) per job: "line N" of JSON lines or CSV, "row N" of Parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _json_lines(path)
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise BadInput(f"{path}: unknown jobs format {suffix!r}: use .jsonl, .csv or .parquet")


def _json_lines(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(raw, dict):
                raise BadInput(f"{path}: line {n}: expected a JSON object with {', '.join(REQUIRED)}")
            yield f"line {n}", raw


def _csv_rows(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        _check_columns(path, "line 1", reader.fieldnames or [])
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:  # more cells than the header names
                raise BadInput(f"{path}: {where}: {len(reader.fieldnames) + len(row[None])} fields where the header "
                               f"has {len(reader.fieldnames)}")
            # A CSV cell cannot be absent: an empty optional cell means "the default".
            yield where, {k: v for k, v in row.items() if v not in ("", None) or k in REQUIRED}


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BackendUnavailable("Parquet jobs need pyarrow: pip install pyarrow (or '.[ray]')") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's own errors: not a Parquet file, truncated
        raise BadInput(f"{path}: not a readable Parquet file ({e})") from None
    _check_columns(path, "schema", table.column_names)
    for n, row in enumerate(table.to_pylist(), 1):
        yield f"row {n}", {k: v for k, v in row.items() if v is not None or k in REQUIRED}


def _check_columns(path: Path, where: str, columns: list) -> None:
    for c in columns:
        if c not in FIELDS:
            raise BadInput(f"{path}: {where}: unknown column {c!r} (a job has {', '.join(FIELDS)})")
    for c in REQUIRED:
        if c not in columns:
            raise BadInput(f"{path}: {where}: missing column {c!r}")


def _job(path: Path, where: str, raw: dict, defaults: Defaults) -> Job:
    def bad(name, cause):
        return BadInput(f"{path}: {where}: field '{name}': {cause}")

    for name in raw:
        if name not in FIELDS:
            raise bad(name, f"unknown (a job has {', '.join(FIELDS)})")
    for name in REQUIRED:
        if raw.get(name) in (None, ""):
            raise bad(name, "missing")
    job_id = raw["id"]
    if isinstance(job_id, bool) or not isinstance(job_id, (str, int)):
        raise bad("id", "must be a string or an integer")
    if not isinstance(raw["video"], str):
        raise bad("video", "must be a path")
    _check_text(raw["question"], lambda cause: bad("question", cause))
    video = raw["video"]
    where_to = video if video == "demo" else str((path.parent / Path(video).expanduser()).absolute())
    return Job(str(job_id), video, where_to, raw["question"], _options(raw.get("options", defaults.options), bad),
               _style(raw.get("style", defaults.style), bad),
               _max_new_tokens(raw.get("max_new_tokens", defaults.max_new_tokens), bad))


def _check_text(text, bad) -> None:
    try:
        prompts.clean_question(text)
    except BadInput as e:
        raise bad(str(e)) from None


def _options(value, bad) -> list | None:
    if isinstance(value, str):  # a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad("options", 'must be a JSON list, e.g. ["a rabbit", "a bird"]') from None
    if value is None:
        return None
    if not isinstance(value, list) or len(value) < 2:
        raise bad("options", "must be a list of at least two answers")
    if not all(isinstance(o, str) and o.strip() for o in value):
        raise bad("options", "every answer must be non-empty text")
    return value


def _style(value, bad) -> str:
    if value not in prompts.STYLES:
        raise bad("style", f"{value!r}: choose one of {', '.join(prompts.STYLES)}")
    return value


def _max_new_tokens(value, bad) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # a CSV cell
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad("max_new_tokens", f"{value!r}: must be a whole number of at least 1")
    return value
