"""The vision graph: uint8 RGB frames at the tower's size -> projected per-frame features [F, P, D].

Scaling and normalisation live inside the graph (so a GPU does them); the squash-resize to the tower's size is done
by the runtime's decoder (`sfedge.runtime.video.squash`). Feature selection follows transformers'
`get_image_features`: hidden states of the select layer (or several, concatenated), CLS dropped for strategy
"default", then the multimodal projector.
"""
from __future__ import annotations

import torch


def tower_parts(model):
    inner = model.model
    return inner.vision_tower, inner.multi_modal_projector


def select_features(hidden_states, layer, strategy: str) -> torch.Tensor:
    layers = [layer] if isinstance(layer, int) else list(layer)
    picked = [hidden_states[i][:, 1:] if strategy == "default" else hidden_states[i] for i in layers]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


class VisionGraph(torch.nn.Module):
    def __init__(self, model, vision: dict):
        super().__init__()
        self.tower, self.projector = tower_parts(model)
        self.layer, self.strategy = vision["select_layer"], vision["select_strategy"]
        self.register_buffer("mean", torch.tensor(vision["mean"]).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(vision["std"]).view(1, 3, 1, 1) * 255.0)

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [F, H, W, 3] RGB -> normalised float [F, 3, H, W]."""
        return (frames.permute(0, 3, 1, 2).float() - self.mean) / self.std

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out = self.tower(self.pixel_values(frames), output_hidden_states=True)
        return self.projector(select_features(out.hidden_states, self.layer, self.strategy))


def reference_features(model, vision: dict, frames: torch.Tensor) -> torch.Tensor:
    """The PyTorch original: transformers' own image-feature path on the same normalised pixels."""
    pixels = VisionGraph(model, vision).pixel_values(frames)
    get = getattr(model.model, "get_image_features", None)
    if type(model).__name__ == "LlavaForConditionalGeneration":
        out = get(pixel_values=pixels, vision_feature_layer=vision["select_layer"],
                  vision_feature_select_strategy=vision["select_strategy"])
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(feats))
    # The Next / OneVision classes tile images (AnyRes) inside get_image_features; SlowFast feeds whole squashed
    # frames, so their reference is the same tower -> select -> projector sequence those methods run per tile.
    tower, projector = tower_parts(model)
    hs = tower(pixels, output_hidden_states=True).hidden_states
    return projector(select_features(hs, vision["select_layer"], vision["select_strategy"]))
