"""Standing questions for `sf-run watch`: what to ask, how often, about how much of the past, and what in the
answer marks an event; and, for a watch over many sources, what each source is. Rules come from the command line
or a YAML file:

    - name: door            # optional; defaults to rule-1, rule-2, ...
      question: Is anyone at the door?
      every: 10s            # how often to ask (stream time)
      window: 20s           # how far back the question looks
      trigger:              # optional: a regular expression, keywords, or both (either one fires)
        regex: "\\byes\\b"
        keywords: [person, people]

Sources come from `--source NAME=URL` (repeatable) or a YAML file (`--sources cameras.yaml`):

    - name: door
      url: rtsp://user:secret@10.0.0.7/stream
      rules: door-rules.yaml          # or a list of rules; or `questions: [...]` with every / window / trigger
      sample_fps: 2                   # optional, like max_outage and rtsp_transport (tcp or udp)

A bad rule or source is refused before anything runs, with the file, the rule or source and the field named.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text, what: str = "duration") -> float:
    """'10s', '500ms', '2m', '1h', or a bare number of seconds -> seconds (> 0)."""
    if isinstance(text, bool):
        raise BadInput(f"{what} {text!r}: expected a duration such as 10s, 500ms or 2m")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|min|m|h)?\s*", str(text))
        if not m:
            raise BadInput(f"{what} {text!r}: expected a duration such as 10s, 500ms or 2m")
        value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value <= 0:
        raise BadInput(f"{what} {text!r}: must be longer than zero")
    return value


@dataclass
class Rule:
    name: str
    question: str
    every: float  # seconds of stream time between questions
    window: float  # seconds of stream time the question covers
    regex: re.Pattern | None = None
    keywords: tuple = ()

    def triggered(self, answer: str) -> bool:
        if self.regex is not None and self.regex.search(answer):
            return True
        text = answer.lower()
        return any(re.search(rf"\b{re.escape(k.lower())}\b", text) for k in self.keywords)


def make_rule(spec, index: int, where: str) -> Rule:
    here = f"{where}: rule {index + 1}"
    if not isinstance(spec, dict):
        raise BadInput(f"{here}: must be a mapping with question, every and window (got {type(spec).__name__})")
    unknown = set(spec) - {"name", "question", "every", "window", "trigger"}
    if unknown:
        raise BadInput(f"{here}: unknown field(s) {', '.join(sorted(unknown))}; "
                       f"a rule has name, question, every, window, trigger")
    for key in ("question", "every", "window"):
        if key not in spec:
            raise BadInput(f"{here}: '{key}' is missing")
    question = spec["question"]
    if not isinstance(question, str) or not question.strip():
        raise BadInput(f"{here}: 'question' must be non-empty text")
    name = str(spec.get("name") or f"rule-{index + 1}")
    every = parse_duration(spec["every"], f"{here}: every")
    window = parse_duration(spec["window"], f"{here}: window")
    regex, keywords = None, ()
    trigger = spec.get("trigger")
    if isinstance(trigger, str):
        trigger = {"regex": trigger}
    if trigger is not None:
        if not isinstance(trigger, dict) or not trigger or set(trigger) - {"regex", "keywords"}:
            raise BadInput(f"{here}: 'trigger' must be a regular expression, or a mapping with regex and/or keywords")
        if "regex" in trigger:
            try:
                regex = re.compile(str(trigger["regex"]))
            except re.error as e:
                raise BadInput(f"{here}: trigger regex {trigger['regex']!r} is not a valid regular expression "
                               f"({e})") from None
        if "keywords" in trigger:
            kw = trigger["keywords"]
            kw = [kw] if isinstance(kw, str) else kw
            if not isinstance(kw, list) or not kw:
                raise BadInput(f"{here}: trigger keywords must be a non-empty list of words")
            for k in kw:
                if isinstance(k, bool):
                    raise BadInput(f"{here}: trigger keyword {k!r} is not text: YAML reads yes/no/on/off as true or "
                                   f"false, so quote it ('yes')")
                if not isinstance(k, str) or not k.strip():
                    raise BadInput(f"{here}: trigger keyword {k!r} must be a non-empty word")
            keywords = tuple(k.strip() for k in kw)
    return Rule(name, question.strip(), every, window, regex, keywords)


def _yaml_list(path: Path, what: str, fields: str) -> list:
    """A YAML file holding a non-empty list of `what` (or a mapping with it under the key `what`)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read the {what} file ({e})") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and what in data:
        data = data[what]
    if not isinstance(data, list) or not data:
        raise BadInput(f"{path}: expected a non-empty list of {what} ({fields})")
    return data


def load_rules(path) -> list[Rule]:
    path = Path(path)
    data = _yaml_list(path, "rules", "question, every, window, optional trigger")
    return check_names([make_rule(spec, i, str(path)) for i, spec in enumerate(data)], str(path))


def as_rules(rules) -> list[Rule]:
    """A YAML file, or a list of Rule objects or dicts (question, every, window, optional name and trigger)."""
    if isinstance(rules, (str, Path)):
        return load_rules(rules)
    return check_names([r if isinstance(r, Rule) else make_rule(r, i, "rules") for i, r in enumerate(rules)], "rules")


def rules_from_args(questions: list[str], every: list[str], window: list[str], triggers: list[str] | None = None,
                    where: str = "command line") -> list[Rule]:
    """--question may repeat; --every / --window / --trigger are given once for all or once per question."""
    def per_question(values, flag, default=None):
        values = values or [default]
        if len(values) == 1:
            return values * len(questions)
        if len(values) != len(questions):
            raise BadInput(f"{flag} is given {len(values)} times for {len(questions)} questions: give it once for "
                           f"all, or once per question")
        return values

    specs = []
    for q, e, w, t in zip(questions, per_question(every, "--every", "10s"), per_question(window, "--window", "20s"),
                          per_question(triggers, "--trigger")):
        specs.append({"question": q, "every": e, "window": w, **({"trigger": t} if t else {})})
    return [make_rule(s, i, where) for i, s in enumerate(specs)]


def check_names(rules: list[Rule], where: str) -> list[Rule]:
    seen = set()
    for r in rules:
        if r.name in seen:
            raise BadInput(f"{where}: two rules are named {r.name!r}; names label the output and must differ")
        seen.add(r.name)
    return rules


TRANSPORTS = ("tcp", "udp")
SOURCE_FIELDS = ("name", "url", "rules", "questions", "every", "window", "trigger", "sample_fps", "max_outage",
                 "rtsp_transport")


@dataclass
class SourceSpec:
    """One watched source: its name (which labels its records; None: the source's own label), what to open (a URL,
    file, camera or (t, frame) iterable), and its own settings (None: the watch's)."""
    name: str | None
    target: object
    rules: list[Rule] | None = None
    sample_fps: float | None = None
    max_outage: float | None = None
    rtsp_transport: str | None = None


def check_transport(value, what: str) -> str:
    if value not in TRANSPORTS:
        raise BadInput(f"{what} {value!r}: expected tcp or udp")
    return value


def make_source(spec, name, where: str, folder: Path | None = None) -> SourceSpec:
    """A source from a mapping (url and optional settings, as in a sources file) or anything a watch opens."""
    if not isinstance(spec, dict):
        return SourceSpec(name, spec)
    here = f"{where}: source {name!r}" if name else f"{where}: a source"
    unknown = set(spec) - set(SOURCE_FIELDS)
    if unknown:
        raise BadInput(f"{here}: unknown field(s) {', '.join(sorted(unknown))}; "
                       f"a source has {', '.join(SOURCE_FIELDS)}")
    if "url" not in spec:
        raise BadInput(f"{here}: 'url' is missing (a URL, a video file or a camera index)")
    if "rules" in spec and "questions" in spec:
        raise BadInput(f"{here}: give rules or questions, not both")
    if ("every" in spec or "window" in spec or "trigger" in spec) and "questions" not in spec:
        raise BadInput(f"{here}: every, window and trigger go with questions")
    rules = None
    if "rules" in spec:
        r = spec["rules"]
        if isinstance(r, str):
            rules = load_rules(folder / r if folder else r)
        elif isinstance(r, list) and r:
            rules = check_names([make_rule(x, i, here) for i, x in enumerate(r)], here)
        else:
            raise BadInput(f"{here}: 'rules' must be a rules file or a non-empty list of rules")
    elif "questions" in spec:
        qs = spec["questions"]
        qs = [qs] if isinstance(qs, str) else qs
        if not isinstance(qs, list) or not qs:
            raise BadInput(f"{here}: 'questions' must be a non-empty list of questions")
        opt = lambda k: [str(spec[k])] if k in spec else None  # noqa: E731
        rules = rules_from_args([str(q) for q in qs], opt("every"), opt("window"), opt("trigger"), where=here)
    fps = spec.get("sample_fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise BadInput(f"{here}: sample_fps {fps!r} must be a positive number of frames per second")
    outage = parse_duration(spec["max_outage"], f"{here}: max_outage") if "max_outage" in spec else None
    transport = check_transport(spec["rtsp_transport"], f"{here}: rtsp_transport") if "rtsp_transport" in spec \
        else None
    return SourceSpec(name, spec["url"], rules, fps, outage, transport)


def load_sources(path) -> list[SourceSpec]:
    """A YAML list of sources, each with name and url (and optional rules or questions, sample_fps, max_outage,
    rtsp_transport); a rules file named in it is found beside it."""
    path = Path(path)
    data = _yaml_list(path, "sources", "name, url, optional rules or questions")
    specs = []
    for i, spec in enumerate(data):
        if not isinstance(spec, dict) or not spec.get("name"):
            raise BadInput(f"{path}: source {i + 1}: must be a mapping with a name and a url")
        specs.append(make_source(spec, str(spec["name"]), str(path), path.parent))
    return specs


def as_sources(sources) -> list[SourceSpec]:
    """{name: URL, file, camera, iterable or mapping}, a list of SourceSpec (load_sources), or a single source."""
    if isinstance(sources, dict):
        return [make_source(spec, str(name), "sources") for name, spec in sources.items()]
    if isinstance(sources, list) and sources and all(isinstance(s, SourceSpec) for s in sources):
        return sources
    return [sources if isinstance(sources, SourceSpec) else SourceSpec(None, sources)]
