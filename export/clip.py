"""The CLIP side of a bundle (`sf-export --clip CLIP_DIR`): what question-aware frame selection and PPLLaVA's
prompt-guided pooling need next to a LLaVA checkpoint, which carries only the vision tower.

- The CLIP (or SigLIP) checkpoint's vision tower must be the LLaVA tower: configs and a checksum over the trunk's
  weights (embeddings, pre-norm, encoder layers) are compared, and a mismatch is refused unless allowed.
- Its CLIP-space image head (CLIP: post-layernorm + visual projection; SigLIP: post-layernorm + attention-pooling
  head) runs inside the vision graph on the tower's last hidden state, so frames are encoded once. Two extra outputs:
  `clip_frame` [F, C] (the frame's image embedding, as transformers' get_image_features gives it) and
  `clip_patches` [F, G, C] (the head applied to each patch token alone, CLS dropped: per-token relevance for PPLLaVA).
- Its text tower becomes an ONNX graph (input_ids [1, L] -> text embedding [1, C], pooled as transformers pools it)
  with its tokenizer.json, and the tokenizer settings the runtime needs to reproduce transformers' token ids.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sfedge.runtime.errors import BadCheckpoint, BadInput, ExportFailed
from sfedge.runtime.sessions import Graph

from . import fidelity, graphs
from .prompt_pooling import PromptGuidedPooling, reference_pooling
from .vision import VisionGraph, select_features, tower_parts

KINDS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
CONFIG_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "num_channels")
TEXT_GRAPH, TEXT_TOKENIZER, POOLING_GRAPH = "clip_text.onnx", "clip_tokenizer.json", "prompt_pooling.onnx"
# Questions the text graph and the runtime's tokenization are checked on; the last is longer than any context.
CHECK_QUESTIONS = ["What happens in the video?", "Is there a red car?", "How many people are dancing, and where?",
                   "describe " * 80]


@dataclass
class ClipSide:
    path: Path
    kind: str  # "clip" or "siglip"
    model: object  # CLIPModel / SiglipModel, fp32, eval
    tokenizer: object
    matched: bool
    checksum: str  # sha256 over the vision trunk's weights
    difference: str | None  # the first difference from the LLaVA tower, if any


def load(clip_dir, llava, allow_mismatch: bool) -> ClipSide:
    """Load CLIP_DIR locally and compare its vision tower with the LLaVA checkpoint's (`llava`: export.Checkpoint)."""
    import transformers

    path = Path(clip_dir)
    cfg_file = path / "config.json"
    try:
        kind = json.loads(cfg_file.read_text()).get("model_type")
    except FileNotFoundError:
        raise BadCheckpoint(f"{cfg_file}: missing; --clip needs a local CLIP or SigLIP checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise BadCheckpoint(f"{cfg_file}: broken JSON ({e})") from None
    if kind not in KINDS:
        raise BadCheckpoint(f"{cfg_file}: model_type {kind!r} is not a CLIP or SigLIP model (need one of "
                            f"{', '.join(KINDS)})")
    try:
        model = getattr(transformers, KINDS[kind]).from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise BadCheckpoint(f"{path}: transformers could not load the CLIP checkpoint: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise BadCheckpoint(f"{path}: the runtime needs a fast tokenizer (tokenizer.json); this one has none")
    tower = tower_parts(llava.model)[0]
    llava_cfg, clip_cfg = tower.config, model.config.vision_config
    difference = next((f"vision config {k}: {getattr(llava_cfg, k, None)!r} in {llava.path}, "
                       f"{getattr(clip_cfg, k, None)!r} in {path}" for k in CONFIG_FIELDS
                       if getattr(llava_cfg, k, None) != getattr(clip_cfg, k, None)), None)
    ours, theirs = trunk(tower), trunk(model.vision_model)
    difference = difference or weight_difference(ours, theirs)
    if difference and not allow_mismatch:
        raise BadCheckpoint(f"{path}: its vision tower is not the one in {llava.path} ({difference}); CLIP-space "
                            f"scores would not describe the LLaVA features: give the CLIP checkpoint the LLaVA tower "
                            f"came from, or pass --allow-mismatched-clip")
    if llava_cfg.hidden_size != clip_cfg.hidden_size:
        raise BadCheckpoint(f"{path}: its image head takes width {clip_cfg.hidden_size}, the LLaVA tower in "
                            f"{llava.path} gives {llava_cfg.hidden_size}; no head can be applied, even mismatched")
    return ClipSide(path, kind, model, tokenizer, difference is None, checksum(theirs), difference)


def trunk(vision_model) -> dict:
    """The weights that compute the tower's hidden states (the post-norm and head belong to the CLIP side)."""
    return {k: v for k, v in vision_model.state_dict().items() if not k.startswith(("post_layernorm.", "head."))}


def checksum(weights: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def weight_difference(a: dict, b: dict) -> str | None:
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            return f"weight {k} only in {'the LLaVA tower' if k in a else 'the CLIP tower'}"
        if a[k].shape != b[k].shape:
            return f"weight {k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        if not torch.equal(a[k], b[k]):
            return f"weight {k}: values differ (max abs difference {float((a[k] - b[k]).abs().max()):.3g})"
    return None


class ImageHead(torch.nn.Module):
    """The CLIP-space image head, applied to a tower's last hidden state [F, N, W]."""

    def __init__(self, side: ClipSide):
        super().__init__()
        vm = side.model.vision_model
        self.kind, self.norm = side.kind, vm.post_layernorm
        self.skip = int(side.kind == "clip")  # CLIP towers put a CLS token first
        self.proj = side.model.visual_projection if side.kind == "clip" else vm.head

    def forward(self, last: torch.Tensor):
        x = self.norm(last)
        if self.kind == "clip":  # CLS and patches through one projection: its CLS row is the frame embedding
            y = self.proj(x)
            return y[:, 0], y[:, 1:]
        patches = x[:, self.skip:]
        f, g, w = patches.shape
        # SigLIP's head pools a sequence by attention; applied to one patch alone, it is that patch's embedding.
        return self.proj(x), self.proj(patches.reshape(f * g, 1, w)).reshape(f, g, -1)


class ClipVisionGraph(VisionGraph):
    """The vision graph plus the CLIP-space outputs, computed from the same tower pass."""

    def __init__(self, model, vision: dict, side: ClipSide):
        super().__init__(model, vision)
        self.head = ImageHead(side)

    def forward(self, frames: torch.Tensor):
        out = self.tower(self.pixel_values(frames), output_hidden_states=True)
        features = self.projector(select_features(out.hidden_states, self.layer, self.strategy))
        return (features, *self.head(out.hidden_states[-1]))


def export_vision(model, vision: dict, side: ClipSide, path: Path, sample_frames: torch.Tensor) -> Path:
    f = torch.export.Dim("frames", min=1, max=4096)
    return graphs.export_onnx(ClipVisionGraph(model, vision, side), (sample_frames,), path, ["frames"],
                              ["features", "clip_frame", "clip_patches"], {"frames": {0: f}})


def reference_outputs(side: ClipSide, model, vision: dict, frames: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """clip_frame and clip_patches the PyTorch way. A matched tower: transformers' own CLIP vision model and its
    get_image_features. A mismatched one (allowed): the LLaVA tower's hidden states through the CLIP head."""
    pixels = VisionGraph(model, vision).pixel_values(frames)
    head = ImageHead(side)
    with torch.no_grad():
        if side.matched:
            frame = side.model.get_image_features(pixel_values=pixels)
            frame = frame.pooler_output if hasattr(frame, "pooler_output") else frame
            last = side.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        else:
            last = tower_parts(model)[0](pixels, output_hidden_states=True).hidden_states[-1]
            frame = head(last)[0]
        return frame.numpy(), head(last)[1].numpy()


def vision_fidelity(path: Path, frames: np.ndarray, reference, precision: str) -> dict:
    out = Graph(path).outputs({"frames": frames})
    return {f"vision.{precision}.{name}": fidelity.verdict(fidelity.compare(ref, out[name]), precision)
            for name, ref in zip(("clip_frame", "clip_patches"), reference)}


class TextTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model.get_text_features(input_ids=input_ids)
        return out.pooler_output if hasattr(out, "pooler_output") else out


def tokenizer_spec(side: ClipSide) -> dict:
    tok, tcfg = side.tokenizer, side.model.config.text_config
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # SigLIP is trained on questions padded to the full context without a mask; CLIP sees one unpadded question.
    return {"context_length": int(tcfg.max_position_embeddings), "pad_token_id": int(pad),
            "eos_token_id": int(tok.eos_token_id), "pad_to_context": side.kind == "siglip"}


def reference_ids(side: ClipSide, question: str, spec: dict) -> torch.Tensor:
    """transformers' tokenization of one question, as CLIP / SigLIP pipelines call it."""
    enc = side.tokenizer(question, truncation=True, max_length=spec["context_length"], return_tensors="pt",
                         padding="max_length" if spec["pad_to_context"] else False)
    return enc["input_ids"]


def export_question_side(side: ClipSide, vision: dict, bundle: Path, work: Path, kernel, temperature: float,
                         log) -> tuple[dict, dict]:
    """Write the text graph, its tokenizer and the prompt-guided pooling graph and check each. Returns the manifest
    sections `clip` and `prompt_pooling`, and the checks' verdicts."""
    section, text_check = export_text_side(side, bundle, work, log)
    pooling, pooling_checks = export_prompt_pooling(vision, section, kernel, temperature, bundle, log)
    return {"clip": section, "prompt_pooling": pooling}, {**text_check, **pooling_checks}


def export_text_side(side: ClipSide, bundle: Path, work: Path, log) -> tuple[dict, dict]:
    """The text tower as ONNX and its tokenizer; the manifest's `clip` section and the text graph's verdict."""
    spec = tokenizer_spec(side)
    log(f"tracing the {side.kind.upper()} text tower to ONNX")
    ids = reference_ids(side, CHECK_QUESTIONS[0], spec)
    length = torch.export.Dim("tokens", min=1, max=spec["context_length"])
    graphs.export_onnx(TextTower(side.model), (ids,), bundle / TEXT_GRAPH, ["input_ids"], ["text_embedding"],
                       {"input_ids": {1: length}})
    side.tokenizer.save_pretrained(work / "clip-tokenizer")
    shutil.copy(work / "clip-tokenizer" / "tokenizer.json", bundle / TEXT_TOKENIZER)
    cfg = side.model.config
    bias = getattr(side.model, "logit_bias", None)  # SigLIP's; a constant shift, so selection and pooling ignore it
    section = {"source": str(side.path.resolve()), "model_type": side.kind, "text_graph": TEXT_GRAPH,
               "tokenizer": TEXT_TOKENIZER, **spec,
               "embed_dim": int(cfg.projection_dim if side.kind == "clip" else cfg.text_config.hidden_size),
               "logit_scale": float(side.model.logit_scale.detach().exp()),
               "logit_bias": 0.0 if bias is None else float(bias.detach().sum()),
               "tower_match": side.matched, "tower_checksum": side.checksum}
    if side.difference:
        section["tower_difference"] = side.difference
    return section, {"clip_text": check_text_side(side, bundle, section, spec)}


def check_text_side(side: ClipSide, bundle: Path, section: dict, spec: dict) -> dict:
    """The runtime's tokenization must equal transformers' (else the export fails) and its text embeddings
    PyTorch's."""
    from sfedge.runtime.clip_text import ClipText

    runtime_text = ClipText(bundle, section, ["CPUExecutionProvider"])
    refs, outs = [], []
    for q in CHECK_QUESTIONS:
        want = reference_ids(side, q, spec)
        got = runtime_text.tokenize(q)
        if got.tolist() != want.tolist():
            raise ExportFailed(f"{side.path}: the runtime's tokenization of {q[:40]!r} differs from transformers' "
                               f"({got.tolist()[0][:12]}... vs {want.tolist()[0][:12]}...); cannot ship this "
                               f"tokenizer")
        with torch.no_grad():
            refs.append(TextTower(side.model)(want)[0].numpy())
        outs.append(runtime_text.embed(q))
    return fidelity.verdict(fidelity.compare(np.stack(refs), np.stack(outs)), "fp32")


def export_prompt_pooling(vision: dict, section: dict, kernel, temperature: float, bundle: Path,
                          log) -> tuple[dict, dict]:
    """PPLLaVA's pooling as ONNX, checked against its plain statement at uneven T as well as whole windows;
    the manifest's `prompt_pooling` section and the verdicts."""
    log("tracing PPLLaVA's prompt-guided pooling to ONNX")
    skip, grid, scale = int(vision["has_cls_token"]), vision["patch_grid"], section["logit_scale"]
    pooling = {"graph": POOLING_GRAPH, "kernel": list(kernel), "temperature": float(temperature)}
    export_pooling(vision, section["embed_dim"], scale, kernel, bundle / POOLING_GRAPH)
    rng = np.random.default_rng(0)
    g, c = grid[0] * grid[1], section["embed_dim"]
    checks = {}
    for t in sorted({kernel[0] * 2 + 1, 1, 4}):
        feats = rng.standard_normal((t, vision["tokens_per_frame"], vision["hidden_size"])).astype(np.float32)
        patches = rng.standard_normal((t, g, c)).astype(np.float32)
        text = rng.standard_normal(c).astype(np.float32)
        want = reference_pooling(*map(torch.from_numpy, (feats, patches, text)), scale, grid, skip, kernel,
                                 temperature).numpy()
        got = graphs.run_graph(bundle / POOLING_GRAPH, {"features": feats, "clip_patches": patches, "text": text,
                                                        "temperature": np.array(temperature, np.float32)})
        checks[f"prompt_pooling.T{t}"] = fidelity.verdict(fidelity.compare(want, got), "fp32")
    return pooling, checks


def export_pooling(vision: dict, embed_dim: int, logit_scale: float, kernel, path: Path) -> Path:
    grid = vision["patch_grid"]
    module = PromptGuidedPooling(grid, int(vision["has_cls_token"]), logit_scale, kernel)
    t = 3
    args = (torch.randn(t, vision["tokens_per_frame"], vision["hidden_size"]),
            torch.randn(t, grid[0] * grid[1], embed_dim), torch.randn(embed_dim), torch.tensor(0.01))
    frames = torch.export.Dim("frames", min=1, max=4096)
    return graphs.export_onnx(module, args, path, ["features", "clip_patches", "text", "temperature"], ["tokens"],
                              {"features": {0: frames}, "clip_patches": {0: frames}, "text": None,
                               "temperature": None})


def parse_kernel(text: str) -> tuple:
    try:
        k = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        k = ()
    if len(k) != 3 or min(k) < 1:
        raise BadInput(f"--pooling-kernel {text!r}: expected TxHxW such as 2x3x3")
    return k

