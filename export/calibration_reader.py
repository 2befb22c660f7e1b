"""Video frames in batches for the int8 calibrators: ONNX Runtime's static quantizer (`graphs.quantize_int8_static`)
and TensorRT's (`engines.FrameCalibrator`). Free of torch, so an engine build on a device without it can use it."""
from __future__ import annotations

import numpy as np

from sfedge.runtime.video import read_frames


class FrameReader:
    """onnxruntime.quantization CalibrationDataReader over video frames, a few frames per batch."""

    def __init__(self, videos, size, frames_per_video: int = 16, batch: int = 4):
        frames = np.concatenate([read_frames(v, frames_per_video, size).pixels for v in videos])
        self._batches = iter([{"frames": frames[i:i + batch]} for i in range(0, len(frames), batch)])

    def get_next(self):
        return next(self._batches, None)
