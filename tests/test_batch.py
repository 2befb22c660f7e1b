"""sf-run batch: job files checked whole before any work, each video encoded once for all its questions, results
exactly once per id (resume, a killed worker or actor, Ctrl-C), the local pool and Ray (one local cluster for the
session), on the tiny bundle and clips cut from the real footage."""
import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import pytest

from sfedge.runtime import Runtime
from sfedge.runtime.batch import local_workers, plan_for, run_batch
from sfedge.runtime.errors import BadInput, DoesNotFit
from sfedge.runtime.jobs import Defaults, jobs_from_videos, read_jobs
from sfedge.runtime.manifest import load as load_manifest
from sfedge.runtime.pipeline import Settings
from sfedge.runtime.video import demo_video

SETTINGS = Settings(vision_variant="fp32", max_new_tokens=6)
QUESTIONS = ("What happens?", "Is it day or night?")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six distinct clips cut from the real footage (bikes.mp4, carphone_pristine.mp4) and re-encoded with OpenCV,
    16 frames each at 96x64, plus a file that is not a video."""
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for i in range(6):
        source = ("bikes.mp4", "carphone_pristine.mp4")[i % 2]
        cap = cv2.VideoCapture(str(demo_video().with_name(source)))
        cap.set(cv2.CAP_PROP_POS_FRAMES, 12 * i)
        path = folder / f"clip{i}.mp4"
        out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (96, 64))
        for _ in range(16):
            ok, frame = cap.read()
            assert ok
            out.write(cv2.resize(frame, (96, 64)))
        out.release()
        cap.release()
        paths.append(path)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return paths


def write_jobs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def clip_jobs(clips, questions=QUESTIONS, **extra):
    return [{"id": f"{c.stem}-{k}", "video": str(c), "question": q, **extra}
            for c in clips for k, q in enumerate(questions)]


def rows_of(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def batch(tiny_bundle, jobs_file, out, **kw):
    kw = {"settings": SETTINGS, "workers": 1, "progress": False, **kw}
    return run_batch(tiny_bundle[0], read_jobs(jobs_file, Defaults(max_new_tokens=6)), out, jobs_label=str(jobs_file),
                     **kw)


# ---- jobs --------------------------------------------------------------------------------------------------------

def test_jsonl_csv_and_parquet_jobs_read_the_same(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"id": "a", "video": "clips/one.mp4", "question": "What happens?"},
            {"id": 7, "video": "/abs/two.mp4", "question": "Which?", "options": ["a cat", "a dog"],
             "style": "multiple-choice", "max_new_tokens": 4}]
    write_jobs(tmp_path / "jobs.jsonl", rows)
    with open(tmp_path / "jobs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "video", "question", "options", "style", "max_new_tokens"])
        w.writeheader()
        w.writerow(rows[0])
        w.writerow({**rows[1], "options": json.dumps(rows[1]["options"])})
    blank = dict.fromkeys(["options", "style", "max_new_tokens"])  # Parquet cells left empty: null
    pq.write_table(pa.Table.from_pylist([{**blank, **r, "id": str(r["id"])} for r in rows]), tmp_path / "jobs.parquet")
    defaults = Defaults(style="open-ended", max_new_tokens=9)
    got = [read_jobs(tmp_path / f"jobs.{ext}", defaults) for ext in ("jsonl", "csv", "parquet")]
    assert got[0] == got[1] == got[2]
    a, b = got[0]
    assert (a.id, a.style, a.max_new_tokens, a.options) == ("a", "open-ended", 9, None)
    assert a.video == "clips/one.mp4" and a.path == str(tmp_path / "clips" / "one.mp4")  # relative to the file
    assert (b.id, b.path, b.options, b.style, b.max_new_tokens) == ("7", "/abs/two.mp4", ["a cat", "a dog"],
                                                                    "multiple-choice", 4)


GOOD = '{"id": 1, "video": "a.mp4", "question": "q"}\n'


@pytest.mark.parametrize("name, text, says", [
    ("jobs.jsonl", GOOD + '{"id": 2, "video": \n', "jobs.jsonl: line 2: not valid JSON"),
    ("jobs.jsonl", GOOD + "\n" + GOOD, "jobs.jsonl: line 3: field 'id': '1' is already the id of line 1"),
    ("jobs.jsonl", '{"id": 1, "video": "a.mp4"}\n', "jobs.jsonl: line 1: field 'question': missing"),
    ("jobs.jsonl", '{"id": 1, "video": "a.mp4", "question": "q", "temprature": 0}\n',
     "jobs.jsonl: line 1: field 'temprature': unknown"),
    ("jobs.jsonl", '{"id": 1, "video": "a.mp4", "question": "q", "style": "fancy"}\n',
     "jobs.jsonl: line 1: field 'style': 'fancy': choose one of plain, open-ended, multiple-choice"),
    ("jobs.jsonl", '{"id": 1, "video": "a.mp4", "question": "q", "max_new_tokens": 0}\n',
     "jobs.jsonl: line 1: field 'max_new_tokens'"),
    ("jobs.jsonl", '{"id": 1, "video": "a.mp4", "question": "q", "options": "a cat"}\n',
     "jobs.jsonl: line 1: field 'options'"),
    ("jobs.jsonl", '{"id": true, "video": "a.mp4", "question": "q"}\n', "jobs.jsonl: line 1: field 'id'"),
    ("jobs.jsonl", '["a.mp4", "q"]\n', "jobs.jsonl: line 1: expected a JSON object"),
    ("jobs.jsonl", "\n", "jobs.jsonl: holds no jobs"),
    ("jobs.csv", "id,video\n1,a.mp4\n", "jobs.csv: line 1: missing column 'question'"),
    ("jobs.csv", "id,video,question,colour\n1,a.mp4,q,red\n", "jobs.csv: line 1: unknown column 'colour'"),
    ("jobs.csv", "id,video,question\n1,a.mp4,q,extra\n", "jobs.csv: line 2: 4 fields where the header has 3"),
    ("jobs.csv", "id,video,question\n1,a.mp4,q\n1,b.mp4,r\n", "jobs.csv: line 3: field 'id'"),
    ("jobs.csv", "id,video,question\n1,a.mp4\n", "jobs.csv: line 2: field 'question': missing"),
    ("jobs.txt", GOOD, "jobs.txt: unknown jobs format '.txt'"),
])
def test_a_bad_job_is_one_line_naming_file_line_and_field(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    with pytest.raises(BadInput) as e:
        read_jobs(tmp_path / name)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_bad_input_before_any_work(tiny_bundle, tmp_path):
    bad = tmp_path / "jobs.jsonl"
    bad.write_text(GOOD + GOOD)
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "sfedge.runtime.cli", "batch", str(tiny_bundle[0]), "--jobs",
                          str(bad), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 2 and not out.exists()
    assert run.stderr.strip().splitlines()[-1] == (f"sf-run: error: {bad}: line 2: field 'id': '1' is already the "
                                                   f"id of line 1")


def test_jobs_from_a_folder_or_a_glob(clips):
    folder = clips[0].parent
    jobs = jobs_from_videos(str(folder), list(QUESTIONS))
    assert len(jobs) == 2 * (len(clips) + 1)  # broken.mp4 too: what is in a file is found out when it is opened
    assert [j.id for j in jobs[2:4]] == [f"{clips[0]}::{q}" for q in QUESTIONS]
    assert jobs[2].path == str(clips[0]) and jobs[2].question == QUESTIONS[0]
    assert len(jobs_from_videos(str(folder / "clip[01].mp4"), ["q"])) == 2
    with pytest.raises(BadInput, match="no videos there"):
        jobs_from_videos(str(folder / "*.mkv"), ["q"])
    with pytest.raises(BadInput, match="--question 'q' is given twice"):
        jobs_from_videos(str(folder), ["q", "q"])


# ---- answering ---------------------------------------------------------------------------------------------------

def test_each_video_is_encoded_once_and_its_answers_equal_ask(tiny_bundle, clips, tmp_path):
    missing = clips[0].parent / "missing.mp4"
    broken = clips[0].parent / "broken.mp4"
    rows = clip_jobs(clips[:3] + [missing, broken])
    rows[1].update(options=["a bike", "a phone"])
    rows[2].update(style="open-ended", max_new_tokens=9)
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    summary = batch(tiny_bundle, jobs, tmp_path / "out.jsonl")
    got = {r["id"]: r for r in rows_of(tmp_path / "out.jsonl")}
    assert len(got) == len(rows) == summary.answered and summary.errors == 4 and summary.videos == 5
    for bad in (missing, broken):
        for k in range(2):
            r = got[f"{bad.stem}-{k}"]
            assert r["status"] == "error" and r["answer"] is None and str(bad) in r["error"]
    rt = Runtime.load(tiny_bundle[0], SETTINGS)
    for job in rows[:6]:
        r = got[job["id"]]
        first = job["id"].endswith("-0")
        # Encoded once: the first question pays for the decode, the second reuses the video's KV prefix.
        assert r["status"] == "ok" and r["reused_prefix"] is not first and (r["timings"]["decode"] > 0) is first
        fresh = rt.ask(rt.encode(job["video"]), job["question"], max_new_tokens=job.get("max_new_tokens", 6),
                       style=job.get("style", "plain"), options=job.get("options"))
        assert (r["answer"], r["frames_used"], r["generated_tokens"]) == (fresh.text, fresh.frames_used,
                                                                         fresh.generated_tokens)


def test_resume_finishes_the_job_and_refuses_another_jobs_output(tiny_bundle, clips, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", clip_jobs(clips[:3]))
    batch(tiny_bundle, jobs, tmp_path / "whole.jsonl")
    whole = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(whole[:3]) + whole[3][:20])  # three whole lines and one cut short by a crash
    with pytest.raises(BadInput, match="already exists: --resume continues it"):
        batch(tiny_bundle, jobs, out)
    summary = batch(tiny_bundle, jobs, out, resume=True)
    assert (summary.skipped, summary.answered) == (3, 3)
    text = out.read_text()
    assert text.startswith("".join(whole[:3]))  # what was done is kept as it was
    assert sorted(r["id"] for r in rows_of(out)) == sorted(json.loads(line)["id"] for line in whole)
    assert batch(tiny_bundle, jobs, out, resume=True).answered == 0 and out.read_text() == text

    other = write_jobs(tmp_path / "other.jsonl", [{"id": "other", "video": str(clips[0]), "question": "Why?"}])
    with pytest.raises(BadInput, match=f"{out}: holds 6 id.* not in {other}.*another job's output"):
        batch(tiny_bundle, other, out, resume=True)


def test_parquet_jobs_and_results_resume_through_their_journal(tiny_bundle, clips, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = clip_jobs(clips[:2])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "jobs.parquet")
    batch(tiny_bundle, write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "whole.jsonl")
    out = tmp_path / "out.parquet"
    journal = tmp_path / "out.parquet.partial.jsonl"
    journal.write_text("".join((tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)[:2]))
    summary = batch(tiny_bundle, tmp_path / "jobs.parquet", out, resume=True)
    assert (summary.skipped, summary.answered) == (2, 2) and not journal.exists()
    got = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)
    assert got[:2] == rows_of(tmp_path / "whole.jsonl")[:2]


def test_worker_count_follows_the_plan_and_splits_the_budget(tiny_bundle):
    m = load_manifest(tiny_bundle[0])
    one = plan_for(m, SETTINGS).total
    cores = len(os.sched_getaffinity(0))
    n, each = local_workers(m, Settings(memory_budget=one * 3 // 2), "auto", videos=5)
    assert (n, each.memory_budget, each.threads) == (1, one * 3 // 2, cores)  # room for one runtime only
    with pytest.raises(DoesNotFit, match="2 workers share the .* memory budget"):
        local_workers(m, Settings(memory_budget=one * 3 // 2), 2, videos=5)
    n, each = local_workers(m, Settings(memory_budget=one * 8), "auto", videos=5)
    assert 1 <= n <= min(cores, 5) and each.memory_budget == one * 8 // n and each.threads == max(1, cores // n)
    assert local_workers(m, Settings(), 4, videos=2)[0] == 2  # never more workers than videos


# ---- faults ------------------------------------------------------------------------------------------------------

def kill_after_first_row(out, pids, killed):
    """In a thread: once `out` has a row, SIGKILL the first process `pids()` names; `killed` gets (pid, rows)."""
    def run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = len(out.read_text().splitlines()) if out.exists() else 0
            found = pids() if rows else []
            if found:
                os.kill(found[0], signal.SIGKILL)
                killed.append((found[0], rows))
                return
            time.sleep(0.01)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_killed_worker_is_replaced_and_its_video_redone(tiny_bundle, clips, tmp_path, capsys):
    rows = clip_jobs(clips, questions=QUESTIONS + ("What colour is it?",), max_new_tokens=24)
    jobs, out, killed = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out.jsonl", []
    killer = kill_after_first_row(out, lambda: [p.pid for p in multiprocessing.active_children()], killed)
    summary = batch(tiny_bundle, jobs, out, workers=2)
    killer.join()
    assert killed and killed[0][1] < len(rows)  # killed mid-job
    got = rows_of(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # every id exactly once
    assert all(r["status"] == "ok" for r in got) and not summary.stopped
    assert "a worker process was killed by SIGKILL" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_finishes_the_current_answers_and_resume_completes(tiny_bundle, clips, tmp_path):
    rows = clip_jobs(clips, questions=QUESTIONS + ("What colour is it?",), max_new_tokens=32)
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "sfedge.runtime.cli", "batch", str(tiny_bundle[0]), "--jobs", str(jobs), "--out",
           str(out), "--workers", "2", "--vision", "fp32"]
    # Its own process group, as a terminal's job: Ctrl-C reaches the driver and its workers alike.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not (out.exists() and out.read_text().count("\n")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "SIGINT: finishing the current answers" in err and "--resume finishes the job" in err
    done = rows_of(out)  # whole lines only
    assert 0 < len(done) < len(rows) and all(r["status"] == "ok" for r in done)
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(r["id"] for r in rows_of(out)) == sorted(r["id"] for r in rows)


def test_the_runtime_imports_without_ray_torch_or_pyarrow():
    code = ("import sys\nimport sfedge.runtime.cli, sfedge.runtime.batch, sfedge.runtime.ray_batch\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'pyarrow', 'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- Ray ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_cluster():
    """One local two-CPU Ray cluster for every Ray test (a start costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_answers_as_the_local_pool_does(ray_cluster, tiny_bundle, clips, tmp_path):
    rows = clip_jobs(clips[:4] + [clips[0].parent / "broken.mp4"])
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    batch(tiny_bundle, jobs, tmp_path / "local.jsonl", workers=2)
    summary = batch(tiny_bundle, jobs, tmp_path / "ray.jsonl", workers=2, ray="")
    assert (summary.workers, summary.answered, summary.errors) == (2, len(rows), 2)

    def comparable(out):
        return {r["id"]: {k: v for k, v in r.items() if k != "timings"} for r in rows_of(out)}

    assert comparable(tmp_path / "ray.jsonl") == comparable(tmp_path / "local.jsonl")


def ray_actor_pids():
    """Ray Data's actors name their processes after the map: 'ray::MapWorker(MapBatches(VideoAnswerer))...'."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"MapWorker(MapBatches(VideoAnswerer))" in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_a_killed_ray_actor_is_restarted_and_its_videos_redone(ray_cluster, tiny_bundle, clips, tmp_path):
    rows = clip_jobs(clips, questions=QUESTIONS + ("What colour is it?",), max_new_tokens=24)
    jobs, out, killed = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "out.jsonl", []
    killer = kill_after_first_row(out, ray_actor_pids, killed)
    summary = batch(tiny_bundle, jobs, out, workers=2, ray="")
    killer.join()
    assert killed and killed[0][1] < len(rows)  # killed mid-job
    got = rows_of(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # every id exactly once
    assert all(r["status"] == "ok" for r in got) and not summary.stopped


# ---- sf-bench batch ----------------------------------------------------------------------------------------------

def test_the_bench_cuts_distinct_clips_and_reports_against_the_targets(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import hashlib

    from sfedge.bench import report, spawn, suites, workloads

    monkeypatch.setattr(workloads, "CACHE", tmp_path)
    jobs = workloads.batch_footage(lambda m: None, videos=5)
    rows = rows_of(jobs)
    clips = sorted({jobs.parent / r["video"] for r in rows})
    assert len(rows) == 5 * len(workloads.BATCH_QUESTIONS) and len(clips) == 5
    assert len({hashlib.sha256(c.read_bytes()).hexdigest() for c in clips}) == 5  # distinct files
    assert all(cv2.VideoCapture(str(c)).get(cv2.CAP_PROP_FRAME_COUNT) == workloads.BATCH_CLIP_FRAMES for c in clips)
    assert workloads.batch_footage(lambda m: None, videos=5) == jobs  # made once

    rates = {("batch_naive", None, False): 10.0, ("batch_cli", 1, False): 35.0, ("batch_cli", 2, False): 40.0,
             ("batch_cli", 2, True): 30.0, ("batch_ray_joined", 2, False): 38.0}

    def run(worker, args):
        rate = rates[(worker, args.get("workers"), args.get("ray", False))]
        return {"questions": 20, "seconds": 1200 / rate, "questions_per_min": rate, "peak_rss": 1e9}

    monkeypatch.setattr(spawn, "run", run)
    data = suites.batch(tmp_path / "bundle", tmp_path / "ckpt", 2, lambda m: None, videos=5)
    assert data["one_worker_vs_naive"] == 3.5
    assert data["ray_overhead (sf-run batch --ray, 2 actors)"] == pytest.approx(0.25)
    assert data["ray_overhead (Ray, 2 actors, cluster already up)"] == pytest.approx(0.05)
    assert data["results"]["sf-run batch, 2 workers"]["questions_per_min"]["n"] == 2
    rep = {"suite": "batch", "machine": "here", "command": "sf-bench batch", "data": data}
    assert "one_worker_vs_naive: 3.5" in report.markdown(rep)
    assert report.plot(rep, tmp_path).read_bytes().startswith(b"\x89PNG")
