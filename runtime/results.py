"""The results file of `sf-run batch`: one JSON line per job id, appended and flushed as each answer arrives, so an
interrupted job leaves only whole lines and `--resume` knows what is done. A `.parquet` output collects its rows in
a JSON lines journal beside it (`OUT.parquet.partial.jsonl`) and is written, whole, when the job finishes."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import BackendUnavailable, BadInput


class Results:
    def __init__(self, out, job_ids: set, jobs_label: str, resume: bool):
        """Refuses, before any work: an existing output without --resume, and with --resume an output holding
        ids that are not this job's (another job's output)."""
        self.out = Path(out)
        self.parquet = self.out.suffix.lower() == ".parquet"
        if self.parquet:
            _pyarrow()
        self.journal = self.out.with_name(self.out.name + ".partial.jsonl") if self.parquet else self.out
        existing = [p for p in (self.out, self.journal) if p.exists() and p.stat().st_size]
        if existing and not resume:
            raise BadInput(f"{existing[0]}: already exists: --resume continues it, or choose another --out")
        self.done = set()
        if resume:
            if self.parquet and self.out.exists():
                self.done |= {r["id"] for r in _read_parquet(self.out)}
            if self.journal.exists():
                self.done |= {r["id"] for r in _read_journal(self.journal)}
            foreign = sorted(self.done - job_ids)
            if foreign:
                raise BadInput(f"{self.out}: holds {len(foreign)} id(s) that are not in {jobs_label}, e.g. "
                               f"{foreign[0]!r}: it is another job's output; give this job its own --out")
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.journal, "a", encoding="utf-8")
        except OSError as e:
            raise BadInput(f"{self.journal}: cannot open for appending ({e.strerror})") from None

    def write(self, row: dict) -> bool:
        """Append a row unless its id is already there (a redone video's answers come twice): exactly once."""
        if row["id"] in self.done:
            return False
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.done.add(row["id"])
        return True

    def close(self, finished: bool) -> None:
        """A finished Parquet job becomes the Parquet file; an unfinished one keeps its journal for --resume."""
        self._file.close()
        if not (self.parquet and finished):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = (_read_parquet(self.out) if self.out.exists() else []) + _read_journal(self.journal)
        tmp = self.out.with_name(self.out.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, self.out)
        self.journal.unlink()


def _read_journal(path: Path) -> list[dict]:
    """The rows so far. A last line cut short (the machine went down mid-write) is dropped from the file: its
    answer is redone."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            raise BadInput(f"{path}: line {n}: not a result line (a JSON object with an id): not a results file?")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own errors
        raise BadInput(f"{path}: not a readable Parquet file ({e})") from None
    if rows and "id" not in rows[0]:
        raise BadInput(f"{path}: has no id column: not a results file?")
    return rows


def _pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise BackendUnavailable("Parquet results need pyarrow: pip install pyarrow (or '.[ray]')") from None
