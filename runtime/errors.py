"""One exception hierarchy for the project. Each carries a message a user can act on; the CLIs print it on one
line and exit with the class's code instead of a traceback."""


class SFEdgeError(Exception):
    exit_code = 1


class BadInput(SFEdgeError):
    """A video, image, question or option the user gave us that we cannot use."""
    exit_code = 2


class BadCheckpoint(SFEdgeError):
    """A checkpoint folder we cannot export: missing files, broken config, unsupported architecture."""
    exit_code = 3


class BadBundle(SFEdgeError):
    """A bundle we cannot trust: missing or tampered artifacts, incompatible schema, paths leaving the folder."""
    exit_code = 4


class DoesNotFit(SFEdgeError):
    """The memory plan does not fit the budget."""
    exit_code = 5


class BackendUnavailable(SFEdgeError):
    """A backend or device (TensorRT, CUDA, bitsandbytes) that is not installed or not present."""
    exit_code = 6


class LowFidelity(SFEdgeError):
    """An exported graph misses its fidelity threshold."""
    exit_code = 7


class GraphFailed(SFEdgeError):
    """ONNX Runtime failed while running one of the bundle's graphs."""
    exit_code = 8


class ExportFailed(SFEdgeError):
    """The export could not finish (a full disk, say); nothing was written."""
    exit_code = 9


class SourceLost(SFEdgeError):
    """A camera or stream that stopped delivering frames and did not come back within the allowed outage."""
    exit_code = 10
