"""Seeded synthetic clips with labelled questions: the demo model's training data and its held-out test set.

A clip is 4 s at 24 fps, 128x128: one to four shapes, each its own shape and colour, moving in a straight line in
one of four directions over a dark, slightly noisy background. Each shape trails three fading copies of itself,
the way motion blur shows direction in a single camera frame. Once per clip a white symbol flashes for two frames
(2% of the clip, "the needle"): uniform sampling of 16 frames catches it about a third of the time.

Every clip gives five 4-option questions, one per category (colour, shape, direction, count, needle), written as
sf-eval JSON lines in the MVBench convention. Everything is a function of the seed: the same seed gives the same
clip, bytes aside from the video encoder, and the same questions.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SIZE, FRAMES, FPS = 128, 96, 24
NEEDLE_FRAMES = 2
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "purple": (170, 60, 220), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
NEEDLES = ("star", "cross", "ring", "heart")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = ("one", "two", "three", "four")
CATEGORIES = ("colour", "shape", "direction", "count", "needle")
RADIUS, NEEDLE_RADIUS, TRAVEL = 11, 18, 60  # pixels at SIZE
TRAIL = ((12, 0.2), (8, 0.35), (4, 0.55))  # (pixels behind, opacity) of the fading copies


@dataclass
class Mover:
    shape: str
    colour: str
    direction: str
    start: tuple  # centre at frame 0, pixels


@dataclass
class Clip:
    seed: int
    movers: list
    needle: str
    needle_at: tuple  # centre, pixels
    needle_start: int  # first frame of the flash

    def needle_frames(self) -> range:
        return range(self.needle_start, self.needle_start + NEEDLE_FRAMES)

    def position(self, m: Mover, frame: int, behind: float = 0.0) -> tuple:
        dx, dy = DIRECTIONS[m.direction]
        step = TRAVEL * frame / (FRAMES - 1) - behind
        return m.start[0] + dx * step, m.start[1] + dy * step


def make_clip(seed: int) -> Clip:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    shapes = rng.choice(SHAPES, n, replace=False)
    colours = rng.choice(list(COLOURS), n, replace=False)
    for _ in range(200):  # paths that never overlap, so every shape stays fully visible
        movers = [_mover(rng, str(shape), str(colour)) for shape, colour in zip(shapes, colours)]
        if _apart(movers):
            break
    needle = str(rng.choice(NEEDLES))
    at = tuple(float(v) for v in rng.uniform(NEEDLE_RADIUS + 2, SIZE - NEEDLE_RADIUS - 2, 2))
    start = int(rng.integers(8, FRAMES - 8 - NEEDLE_FRAMES))
    return Clip(seed, movers, needle, at, start)


def _mover(rng, shape: str, colour: str) -> Mover:
    direction = str(rng.choice(list(DIRECTIONS)))
    dx, dy = DIRECTIONS[direction]
    lo, hi = RADIUS + 2, SIZE - RADIUS - 2
    # a start from which the whole path stays in frame
    x = rng.uniform(lo - min(dx, 0) * TRAVEL, hi - max(dx, 0) * TRAVEL)
    y = rng.uniform(lo - min(dy, 0) * TRAVEL, hi - max(dy, 0) * TRAVEL)
    return Mover(shape, colour, direction, (float(x), float(y)))


def _apart(movers: list) -> bool:
    t = np.linspace(0, TRAVEL, 13)
    paths = [np.stack([m.start[0] + DIRECTIONS[m.direction][0] * t, m.start[1] + DIRECTIONS[m.direction][1] * t])
             for m in movers]
    return all(np.hypot(*(a - b)).min() > 2.6 * RADIUS for i, a in enumerate(paths) for b in paths[i + 1:])


def _polygon(kind: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r *= 0.85
    elif kind == "triangle":
        pts = [(0, -1.1), (1.05, 0.8), (-1.05, 0.8)]
    elif kind == "diamond":
        pts = [(0, -1.2), (1, 0), (0, 1.2), (-1, 0)]
    elif kind == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = list(zip(np.cos(a) * rad, -np.sin(a) * rad))
    else:
        return None
    return np.array([(cx + px * r, cy + py * r) for px, py in pts], np.int32)


def draw(img: np.ndarray, kind: str, centre: tuple, r: float, colour: tuple) -> None:
    cx, cy = centre
    c = (int(round(cx)), int(round(cy)))
    if kind == "circle":
        cv2.circle(img, c, int(r), colour, -1, cv2.LINE_AA)
    elif kind == "ring":
        cv2.circle(img, c, int(r * 0.8), colour, max(3, int(r / 3)), cv2.LINE_AA)
    elif kind == "cross":
        w = max(3, int(r / 3))
        for sx in (-1, 1):
            cv2.line(img, (int(cx - r * 0.8), int(cy - sx * r * 0.8)), (int(cx + r * 0.8), int(cy + sx * r * 0.8)),
                     colour, w, cv2.LINE_AA)
    elif kind == "heart":
        cv2.circle(img, (int(cx - r * 0.45), int(cy - r * 0.25)), int(r * 0.5), colour, -1, cv2.LINE_AA)
        cv2.circle(img, (int(cx + r * 0.45), int(cy - r * 0.25)), int(r * 0.5), colour, -1, cv2.LINE_AA)
        tri = np.array([(cx - r * 0.93, cy - r * 0.1), (cx + r * 0.93, cy - r * 0.1), (cx, cy + r)], np.int32)
        cv2.fillPoly(img, [tri], colour, cv2.LINE_AA)
    else:
        cv2.fillPoly(img, [_polygon(kind, cx, cy, r)], colour, cv2.LINE_AA)


def render(clip: Clip, frame: int) -> np.ndarray:
    """One RGB frame [SIZE, SIZE, 3] uint8."""
    rng = np.random.default_rng((clip.seed, frame))
    img = np.full((SIZE, SIZE, 3), 28, np.float32) + rng.normal(0, 4, (SIZE, SIZE, 1))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for m in clip.movers:
        for behind, alpha in TRAIL:
            ghost = img.copy()
            draw(ghost, m.shape, clip.position(m, frame, behind), RADIUS, COLOURS[m.colour])
            img = cv2.addWeighted(ghost, alpha, img, 1 - alpha, 0)
        draw(img, m.shape, clip.position(m, frame), RADIUS, COLOURS[m.colour])
    if frame in clip.needle_frames():
        draw(img, clip.needle, clip.needle_at, NEEDLE_RADIUS, (255, 255, 255))
    return img


def frames(clip: Clip) -> np.ndarray:
    return np.stack([render(clip, i) for i in range(FRAMES)])


def write_video(clip: Clip, path: Path) -> Path:
    """mp4 (MPEG-4 part 2: what OpenCV encodes everywhere), near-lossless quality."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    if not w.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write mp4v video here")
    w.set(cv2.VIDEOWRITER_PROP_QUALITY, 100)
    for f in frames(clip):
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    return path


def caption(clip: Clip, frame: int, rng: np.random.Generator) -> str:
    """What one frame shows, for the contrastive stage: the shapes in random order, and the flash if it is on."""
    parts = [f"a {m.colour} {m.shape} moving {m.direction}" for m in clip.movers]
    rng.shuffle(parts)
    text = f"{COUNTS[len(parts) - 1]} shape{'s' if len(parts) > 1 else ''}: " + ", ".join(parts)
    if frame in clip.needle_frames():
        text += f"; a brief flash of a white {clip.needle}"
    return text


def _options(rng, truth: str, pool) -> tuple[list, str]:
    others = [p for p in pool if p != truth]
    opts = [truth] + list(rng.choice(others, 3, replace=False))
    rng.shuffle(opts)
    return [str(o) for o in opts], truth


def questions(clip: Clip, category: str, rng: np.random.Generator) -> tuple[str, list, str]:
    """(question, 4 candidates, answer) for one category."""
    m = clip.movers[int(rng.integers(len(clip.movers)))]
    if category == "colour":
        return (f"What colour is the {m.shape}?", *_options(rng, m.colour, list(COLOURS)))
    if category == "shape":
        return (f"What shape is the {m.colour} object?", *_options(rng, m.shape, SHAPES))
    if category == "direction":
        return (f"Which way does the {m.colour} {m.shape} move?", *_options(rng, m.direction, list(DIRECTIONS)))
    if category == "count":
        return ("How many shapes move in the video?", *_options(rng, COUNTS[len(clip.movers) - 1], COUNTS))
    if category == "needle":
        return ("What appears briefly in a flash?", *_options(rng, clip.needle, NEEDLES))
    raise ValueError(category)


def question_rows(clip: Clip, video: str) -> list[dict]:
    rng = np.random.default_rng((clip.seed, 1))
    rows = []
    for category in CATEGORIES:
        q, cands, answer = questions(clip, category, rng)
        rows.append({"id": f"{clip.seed}-{category}", "video": video, "question": q, "candidates": cands,
                     "answer": answer, "category": category})
    return rows


def write_dataset(out: Path, seeds) -> Path:
    """Clips and their questions under `out`; returns the questions file (sf-eval's --data)."""
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        clip = make_clip(seed)
        name = f"clips/clip-{seed:05d}.mp4"
        write_video(clip, out / name)
        rows += question_rows(clip, name)
    data = out / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def seeds(text: str) -> range:
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sfedge.train.synthetic",
                                description="Write seeded synthetic clips and their sf-eval questions.")
    p.add_argument("out")
    p.add_argument("--seeds", default="0-49", help="inclusive range, e.g. 0-49 (the demo model trained on "
                                                    "seeds from 100000 up: 0-99999 are held out)")
    a = p.parse_args()
    print(write_dataset(Path(a.out), seeds(a.seeds)))


if __name__ == "__main__":
    main()
