"""The lean runtime: numpy, ONNX Runtime, OpenCV and tokenizers only. Importing it never loads torch."""
from .errors import BadBundle, BadInput, BackendUnavailable, DoesNotFit, GraphFailed, SFEdgeError


def __getattr__(name):
    # Runtime is imported on first use, so `import sfedge.runtime` stays cheap for tools that only read manifests.
    if name in ("Runtime", "Answer", "VisualTokens"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Runtime", "Answer", "VisualTokens", "SFEdgeError", "BadInput", "BadBundle", "DoesNotFit",
           "BackendUnavailable", "GraphFailed"]
