"""The questions file: JSON lines in MVBench's convention (candidate texts, the answer as one of them) or Video-MME's
(lettered options, the answer as a letter), read into one shape and checked whole before anything loads."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sfedge.runtime.errors import BadInput
from sfedge.runtime.prompt import letters


@dataclass
class Question:
    id: str
    video: Path  # absolute: the file's video paths are relative to its folder
    question: str
    options: list  # option texts, without letters
    answer: int  # index into options
    category: str
    line: int


def load_questions(path, limit: int | None = None) -> list[Question]:
    """The first `limit` questions of a JSON-lines file (all without a limit); a bad one is refused naming
    FILE:LINE, before any model loads."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BadInput(f"{path}: no such questions file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read it ({e})") from None
    questions, seen = [], {}
    for n, text in enumerate(lines, 1):
        if limit is not None and len(questions) == limit:
            break
        if not text.strip():
            continue
        q = _question(text, path, n)
        if q.id in seen:
            raise BadInput(f"{path}:{n}: id {q.id!r} is already the id of line {seen[q.id]}")
        seen[q.id] = n
        questions.append(q)
    if not questions:
        raise BadInput(f"{path}: holds no questions")
    return questions


def by_video(questions: list[Question]) -> list[tuple[Path, list[Question]]]:
    """Questions grouped by video, in order of first appearance: each video is decoded and encoded once."""
    groups: dict[Path, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.video, []).append(q)
    return list(groups.items())


def _question(text: str, path: Path, n: int) -> Question:
    where = f"{path}:{n}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadInput(f"{where}: expected a JSON object")

    def field(*names, kind=str, what="non-empty text"):
        name = next((k for k in names if k in record), None)
        if name is None:
            raise BadInput(f"{where}: missing field {' or '.join(repr(k) for k in names)}")
        if not isinstance(record[name], kind) or record[name] in ("", []):
            raise BadInput(f"{where}: field {name!r}: expected {what}")
        return record[name]

    qid = str(field("id", "question_id", kind=(str, int), what="non-empty text or a number"))
    video = path.parent / field("video")  # an absolute path stays as it is
    if not video.is_file():
        raise BadInput(f"{where}: video {video} does not exist")
    question = field("question")
    if "candidates" in record:  # MVBench
        options = _texts(field("candidates", kind=list, what="a non-empty list"), where)
        answer = field("answer")
        if answer not in options:
            raise BadInput(f"{where}: answer {answer!r} is not one of the candidates")
        index = options.index(answer)
    elif "options" in record:  # Video-MME
        lettered = _texts(field("options", kind=list, what="a non-empty list"), where)
        options = [_unlettered(o, letter, where) for o, letter in zip(lettered, letters(len(lettered)))]
        index = _letter_index(field("answer"), len(options), where)
    else:
        raise BadInput(f"{where}: missing field 'candidates' (MVBench) or 'options' (Video-MME)")
    category = record.get("category") or record.get("task_type") or "uncategorized"
    return Question(qid, video.absolute(), question, options, index, str(category), n)


def _texts(options: list, where: str) -> list[str]:
    if len(options) < 2:
        raise BadInput(f"{where}: {len(options)} option(s): a multiple-choice question needs at least 2")
    if len(options) > 26:
        raise BadInput(f"{where}: {len(options)} options: at most 26 (A-Z) are supported")
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise BadInput(f"{where}: every option must be non-empty text")
    return options


def _unlettered(option: str, letter: str, where: str) -> str:
    """Video-MME's "B. text" as "text"; a prefix with another letter than the option's place is refused."""
    m = re.match(r"\s*\(?([A-Z])\s*[.:)]\s*", option)
    if not m:
        return option.strip()
    if m.group(1) != letter:
        raise BadInput(f"{where}: option {letter} is lettered {m.group(1)!r}: {option!r}")
    if not option[m.end():].strip():
        raise BadInput(f"{where}: option {letter} is a letter without text: {option!r}")
    return option[m.end():].strip()


def _letter_index(answer: str, count: int, where: str) -> int:
    letter = answer.strip().strip("().").upper()
    if letter not in letters(count):
        raise BadInput(f"{where}: answer {answer!r} is not a letter of the {count} options "
                       f"(A-{letters(count)[-1]})")
    return letters(count).index(letter)
