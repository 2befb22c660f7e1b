"""Device selection where no GPU is present: CPU works, GPU devices fail with a clear message, auto falls back."""
import onnxruntime as ort
import pytest

from sfedge.runtime.errors import BackendUnavailable
from sfedge.runtime.sessions import providers


def test_cpu_and_auto():
    assert providers("cpu") == ["CPUExecutionProvider"]
    auto = providers("auto")
    assert auto[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert auto == ["CPUExecutionProvider"]


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_missing_gpu_provider_is_a_clear_error(device, tmp_path):
    need = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[device]
    if need in ort.get_available_providers():
        pytest.skip(f"{need} is present on this host")
    with pytest.raises(BackendUnavailable, match="install onnxruntime-gpu instead of onnxruntime"):
        providers(device, tmp_path)


def test_unknown_device():
    with pytest.raises(BackendUnavailable, match="choose one of cpu, cuda, tensorrt, auto"):
        providers("tpu")
