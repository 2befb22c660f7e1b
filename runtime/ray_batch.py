"""sf-run batch on Ray. Ray Data holds one row per video, its path and its questions as JSON (never frames), and
runs `map_batches` with VideoAnswerer, a callable class holding one Runtime per actor, on a fixed-size actor pool;
only the answers come back to the driver, which writes them. Ray Data restarts an actor that dies and retries the
videos it held (its default for actor pools, without limit); the driver drops answers that come back twice.

Ray is imported inside these functions only: the runtime imports without it (`pip install ".[ray]"`)."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

from .answering import answer_video
from .errors import BackendUnavailable
from .units import human

RAY_ACTOR_BYTES = 100_000_000  # Ray's own core worker inside each actor, on top of the runtime's plan (45 MB measured)


class VideoAnswerer:
    """map_batches' callable class: the Runtime is loaded once per actor, then each batch is a video to answer."""

    def __init__(self, bundle: str, settings, sampling: dict):
        from .pipeline import Runtime

        self.rt = Runtime.load(bundle, settings)
        self.sampling = sampling

    def __call__(self, batch: dict) -> dict:
        rows = [json.dumps(row) for path, jobs in zip(batch["path"], batch["jobs"])
                for row in answer_video(self.rt, str(path), json.loads(jobs), self.sampling)]
        return {"row": rows}


def run_on_ray(address: str, bundle: str, settings, sampling: dict, groups: list, workers: int | str,
               actor_bytes: int, on_row, stop, note) -> int:
    """Answer `groups` ([(path, [Job])]) on Ray actors; each result row goes to `on_row`. `address` "" starts a
    local cluster (unless this process already joined one); otherwise it is the cluster to join. Returns the
    number of actors."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BackendUnavailable('--ray needs Ray Data: pip install ".[ray]"') from None
    joined = ray.is_initialized()
    if not joined:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan and timing lines would break our bar
    try:
        n, resources = _actors(ray, workers, actor_bytes, settings.device, len(groups))
        note(f"Ray: {n} actor(s), each reserving {resources['num_cpus']:g} CPU, {resources['num_gpus']} GPU and "
             f"{human(resources['memory'])}")
        items = [{"path": path, "jobs": json.dumps([j.to_dict() for j in jobs])} for path, jobs in groups]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            VideoAnswerer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n),
            fn_constructor_kwargs={"bundle": bundle, "settings": replace(
                settings, threads=settings.threads or max(1, int(resources["num_cpus"]))), "sampling": sampling},
            **resources)
        ds.context.enable_progress_bars = False  # ours is on stderr already
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row in batch["row"]:
                on_row(json.loads(row))
            if stop.is_set():
                break
    finally:
        if not joined:
            ray.shutdown()
    return n


def _actors(ray, workers: int | str, actor_bytes: int, device: str, videos: int) -> tuple[int, dict]:
    """How many actors, and what each reserves: its planned memory, its share of the cluster's CPUs, and a GPU
    when the bundle runs on one. "auto": as many as the cluster's CPUs and memory hold, at most one per video."""
    total = ray.cluster_resources()
    cpus, memory = total.get("CPU", 1), total.get("memory", 0)
    node_cpus = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])  # an actor is on one
    if workers == "auto":
        fit = int(memory // (actor_bytes + RAY_ACTOR_BYTES)) if memory else videos
        n = max(1, min(int(cpus), fit, videos))
    else:
        n = max(1, min(int(workers), videos))
    gpu = device in ("cuda", "tensorrt") or (device == "auto" and total.get("GPU", 0) >= 1)
    return n, {"num_cpus": min(max(cpus // n, min(1.0, cpus / n)), node_cpus), "num_gpus": 1 if gpu else 0,
               "memory": actor_bytes + RAY_ACTOR_BYTES}
