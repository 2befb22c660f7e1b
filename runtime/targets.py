"""Devices a plan can be checked against: their memory, what of it the OS and others leave, and their memory
bandwidth, which bounds decode speed (each generated token reads every weight of the decoder and the KV cache)."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import cpu, tuning
from .errors import BadInput
from .memory import available_memory, total_memory
from .planner import Plan, decode_bytes_per_token, llm_file_bytes
from .tokens import kv_bytes_per_token
from .units import human

# The int4 decoder's decode speed over the ceiling (read bandwidth / bytes read per token): 0.57 is the median of
# the five `sf-bench llm` runs with an fp32 KV cache at 3,710 tokens of context on this project's 2-core CPU
# machine (docs/bench/llm*.json, `decode_vs_ceiling`: 0.47, 0.57, 0.57, 0.59, 0.68; at 30 tokens 0.48-0.89). It
# is measured against the probe below (numpy sums on all cores), for ONNX Runtime's CPU kernels; on a GPU it is
# unmeasured, and a datasheet bandwidth is a peak that a probe does not reach: there the prediction is an upper
# estimate.
DECODE_EFFICIENCY = 0.57
GB = 10**9


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    memory: int  # bytes
    reserved: int  # bytes the OS, firmware carve-outs and other programs keep
    bandwidth: float  # bytes/s read from the memory the model lives in
    bandwidth_source: str  # "datasheet peak" or "measured here"
    device: str = "cuda"  # where the vision graph runs there: the GPU, or the CPU (Raspberry Pi, this machine)

    @property
    def usable(self) -> int:
        return self.memory - self.reserved


# Memory and bandwidth from the vendors' specifications (URLs beside each). The reserves are our estimates, not
# vendor figures: on a Jetson, memory is shared with the GPU, firmware carve-outs and JetPack's services keep ~1.5 GB
# of an 8 GB module; a discrete GPU keeps ~1 GB for the CUDA context, ONNX Runtime's workspace and a display;
# Raspberry Pi OS Lite keeps ~0.5 GB. `--memory-budget` replaces them with a measured figure.
TARGETS = {
    # https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-orin/ (module specifications):
    # Orin Nano 8GB: 8 GB 128-bit LPDDR5, 68 GB/s
    "orin-nano-8gb": Target("orin-nano-8gb", "Jetson Orin Nano 8 GB", 8 * GB, 1_500_000_000, 68 * GB, "datasheet peak"),
    # https://developer.nvidia.com/blog/nvidia-jetson-orin-nano-developer-kit-gets-a-super-boost/ (JetPack 6.1+
    # "super" mode: memory bandwidth 68 -> 102 GB/s)
    "orin-nano-super-8gb": Target("orin-nano-super-8gb", "Jetson Orin Nano Super 8 GB", 8 * GB, 1_500_000_000, 102 * GB,
                                  "datasheet peak"),
    # https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-orin/: Orin NX 16GB: 16 GB 128-bit
    # LPDDR5, 102.4 GB/s
    "orin-nx-16gb": Target("orin-nx-16gb", "Jetson Orin NX 16 GB", 16 * GB, 2 * GB, 102.4 * GB, "datasheet peak"),
    # https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-orin/: AGX Orin 64GB: 64 GB 256-bit
    # LPDDR5, 204.8 GB/s
    "agx-orin-64gb": Target("agx-orin-64gb", "Jetson AGX Orin 64 GB", 64 * GB, 3 * GB, 204.8 * GB, "datasheet peak"),
    # https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/ (24 GB GDDR6X); bandwidth 1,008 GB/s:
    # https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (RTX 4090 table)
    "rtx-4090": Target("rtx-4090", "GeForce RTX 4090 (24 GB GDDR6X)", 24 * GB, 1 * GB, 1008 * GB, "datasheet peak"),
    # https://datasheets.raspberrypi.com/rpi5/raspberry-pi-5-product-brief.pdf (LPDDR4X-4267) and
    # https://www.raspberrypi.com/news/introducing-raspberry-pi-5/ (32-bit bus): 4,267 MT/s x 4 bytes = 17.1 GB/s
    "rpi5-8gb": Target("rpi5-8gb", "Raspberry Pi 5 8 GB", 8 * GB, 500_000_000, 17.07 * GB, "datasheet peak",
                       "cpu"),
}


def get(name: str) -> Target:
    if name == "this":
        return this_machine()
    if name not in TARGETS:
        raise BadInput(f"--target {name!r}: choose one of {', '.join([*TARGETS, 'this'])}")
    return TARGETS[name]


def this_machine() -> Target:
    """This machine: its total memory, what is available now, and its read bandwidth (probed once, cached)."""
    total = total_memory()
    available = available_memory()
    if total is None or available is None:
        raise BadInput("--target this reads /proc/meminfo, which this system lacks; pick a named target")
    return Target("this", f"this machine ({os.cpu_count()} cores)", total, total - available,
                  cached_bandwidth(total), "measured here", "cpu")


def cached_bandwidth(total: int) -> float:
    """The read probe's figure for this machine (CPU kind, cores and memory size: a disk that moves between VMs of
    one size but another CPU kind must not carry the figure along), measured once."""
    key = f"{cpu.describe()}, {total} bytes"
    known = tuning.lookup("read_bytes_per_s", key)
    if isinstance(known, (int, float)):
        return float(known)
    bandwidth = read_bandwidth()
    tuning.store("read_bytes_per_s", key, bandwidth)
    return bandwidth


def read_bandwidth(nbytes: int = 256 * 10**6, repeats: int = 3) -> float:
    """Bytes per second read from memory by all cores at once: numpy sums, which release the GIL, over parts of an
    array far larger than the caches (the probe DECODE_EFFICIENCY is measured against; sf-bench runs it too)."""
    n = os.cpu_count() or 1
    parts = np.array_split(np.ones(nbytes // 8), n)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(np.sum, parts))  # first touch
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_rate(manifest: dict, context: int, target: Target) -> float:
    """Predicted tokens/s of decoding at `context` tokens: usable bandwidth over the bytes each token reads."""
    return DECODE_EFFICIENCY * target.bandwidth / decode_bytes_per_token(manifest, context)


def report(manifest: dict, plan: Plan, target: Target, least: int, most: int) -> str:
    """Whether these settings fit `plan`'s budget on `target` and by how much (`least`: what they need at the least;
    `plan` takes the largest chunks that fit), the most frames that fit when they do not, and the predicted decode
    speed."""
    budget = plan.budget
    if least <= budget:
        verdict = (f"fits: needs at least {human(least)} (with 1-frame encode chunks), {human(budget - least)} to "
                   f"spare of the {human(budget)} budget; the plan above takes the largest chunks that fit")
    else:
        fitting = f"the most frames that fit: {most}" if most else "no frame count fits"
        verdict = (f"does NOT fit: needs at least {human(least)}, {human(least - budget)} over the {human(budget)} "
                   f"budget; {fitting}")
    llm = manifest["llm"]
    weights, kv = llm_file_bytes(manifest), plan.context * kv_bytes_per_token(llm)
    caveat = "" if target.bandwidth_source == "measured here" else (
        "; against a datasheet peak, and unmeasured on GPUs: an upper estimate")
    return (f"target {target.name} ({target.label}): memory {human(target.memory)}, {human(target.usable)} usable "
            f"({human(target.reserved)} left to the OS and others), bandwidth {target.bandwidth / GB:.1f} GB/s "
            f"({target.bandwidth_source})\n"
            f"{verdict}\n"
            f"predicted decode: {decode_rate(manifest, plan.context, target):.1f} tokens/s at {plan.context} tokens "
            f"of context = {DECODE_EFFICIENCY} x {target.bandwidth / GB:.1f} GB/s / {human(weights + kv)} read per "
            f"token ({llm['precision']} decoder + lm_head {human(weights)}, {llm['kv_dtype']} KV cache {human(kv)})\n"
            f"  {DECODE_EFFICIENCY} = the int4 decoder's measured share of the probed read bandwidth at video "
            f"context on a CPU (sf-bench llm, docs/benchmarks.md){caveat}")
