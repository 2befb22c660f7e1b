"""The lean runtime: numpy, ONNX Runtime, OpenCV and tokenizers only. Importing it never loads torch."""
from .errors import BadBundle, BadInput, BackendUnavailable, DoesNotFit, GraphFailed, SFEdgeError


def __getattr__(name):
    # Imported on first use, so `import sfedge.runtime` stays cheap for tools that only read manifests.
    if name in ("Runtime", "Settings"):
        from . import pipeline
        return getattr(pipeline, name)
    if name in ("Answer", "AnswerStream", "VisualTokens"):
        from . import answer
        return getattr(answer, name)
    raise AttributeError(name)


__all__ = ["Runtime", "Settings", "Answer", "AnswerStream", "VisualTokens", "SFEdgeError", "BadInput", "BadBundle", "DoesNotFit",
           "BackendUnavailable", "GraphFailed"]
