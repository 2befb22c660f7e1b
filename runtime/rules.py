"""Standing questions for `sf-run watch`: what to ask, how often, about how much of the past, and what in the
answer marks an event. Rules come from the command line or a YAML file:

    - name: door            # optional; defaults to rule-1, rule-2, ...
      question: Is anyone at the door?
      every: 10s            # how often to ask (stream time)
      window: 20s           # how far back the question looks
      trigger:              # optional: a regular expression, keywords, or both (either one fires)
        regex: "\\byes\\b"
        keywords: [person, people]

A bad rule is refused before anything runs, with the file, the rule and the field named.
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


def load_rules(path) -> list[Rule]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no such rules file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read the rules file ({e})") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if not isinstance(data, list) or not data:
        raise BadInput(f"{path}: expected a non-empty list of rules (question, every, window, optional trigger)")
    return check_names([make_rule(spec, i, str(path)) for i, spec in enumerate(data)], str(path))


def as_rules(rules) -> list[Rule]:
    """A YAML file, or a list of Rule objects or dicts (question, every, window, optional name and trigger)."""
    if isinstance(rules, (str, Path)):
        return load_rules(rules)
    return check_names([r if isinstance(r, Rule) else make_rule(r, i, "rules") for i, r in enumerate(rules)], "rules")


def rules_from_args(questions: list[str], every: list[str], window: list[str], triggers: list[str] | None = None
                    ) -> list[Rule]:
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
    return [make_rule(s, i, "command line") for i, s in enumerate(specs)]


def check_names(rules: list[Rule], where: str) -> list[Rule]:
    seen = set()
    for r in rules:
        if r.name in seen:
            raise BadInput(f"{where}: two rules are named {r.name!r}; names label the output and must differ")
        seen.add(r.name)
    return rules
