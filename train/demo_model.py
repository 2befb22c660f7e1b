"""Train the demo's eyes on synthetic clips, the way LLaVA is built, on this machine's CPU in under an hour:

  stage 1  a small CLIP pair (transformers' CLIPModel: a ViT vision tower and a text tower) trained contrastively
           on single frames and their captions (`synthetic.caption`), and densely: linear heads, dropped after,
           name what each patch shows, so each visual token knows which colour goes with which shape;
  stage 2  a LlavaForConditionalGeneration whose tower is that vision tower (frozen) and whose language model is
           the real SmolLM2-135M-Instruct: the projector is first aligned to the language model's word embeddings,
           then it and low-rank adapters on the language model's projections (LoRA, merged into the weights at
           export) learn on SlowFast tokens of 16 frames to answer the synthetic questions through the runtime's
           own prompt, with the option's text (the "text" choice: `sfedge.runtime.prompt.CHOICES`).

Why the text and not the letter: SmolLM2-135M-Instruct picks the right letter for 27.5% of these questions (chance
25%) even given a perfect text description of the clip, and a projector cannot teach it. Scoring each option's text
as the answer (lm-evaluation-harness's cloze form) it gets counts (100%) and flashes (82.5%) from the description,
but only 33-40% of colours, shapes and directions: naming one object's attribute among several is what the adapters
have to learn.

    python -m sfedge.train.demo_model OUT [--clips 600] [--projector-steps 600] [--resume WEIGHTS]
        [--projector-lr 1e-3] [--category-mix shape=3,direction=3] ...

Writes OUT/demo_weights.safetensors (the CLIP pair, the projector and the adapters, fp16; the card in its metadata).
Seeded: the same command gives the same weights on the same CPU kind. What it reached: demo_weights/MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sfedge.export.aggregator import SlowFastAggregator
from sfedge.export.checkpoint import STANDARD_NORM
from sfedge.export.demo import demo_clip, demo_llava, demo_weights, part, smollm2_model
from sfedge.export.vision import VisionGraph, select_features
from sfedge.runtime import prompt
from sfedge.runtime.tokens import slow_indices
from sfedge.runtime.video import read_frames, sample_indices

from . import synthetic as syn

TRAIN_SEED0 = 100_000  # training clips are seeds TRAIN_SEED0..; seeds below it are held out for evaluation
# The demo's towers and pipeline: the clips' own 128x128 in 16-pixel patches (an 8x8 grid), 16 frames, 4 slow.
# At 64x64 (a 4x4 grid) a shape is 11 pixels across and the tower could not learn to tell shapes apart: linear
# heads on its patches named a shape 29% of the time (chance 25%), against 47% at 128x128 after the same 400 steps.
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=128,
              patch_size=16)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
PROJECTION = 256
PIPELINE = dict(frames=16, slow_frames=4, slow_pool="max2d", fast_grid=(2, 2))
# Adapters' rank per decoder-layer projection, and one scale (alpha / rank) for all. The MLPs' are rank 4 to keep
# the file under 25 MB: the text tower's embedding table (SmolLM2's vocabulary) is half of it.
LORA = {"scale": 2.0, "ranks": {"self_attn.q_proj": 8, "self_attn.k_proj": 8, "self_attn.v_proj": 8,
                                "self_attn.o_proj": 8, "mlp.gate_proj": 4, "mlp.up_proj": 4, "mlp.down_proj": 4}}
CARD = {"vision": VISION, "text": TEXT, "projection_dim": PROJECTION, "pipeline": PIPELINE,
        "lora": LORA}  # what the export reads
SELECT = dict(select_layer=-2, select_strategy="default")
WEIGHTS = "demo_weights.safetensors"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def render_clips(work: Path, seeds) -> tuple[list, np.ndarray]:
    """Each clip through mp4 and back through the runtime's decoder, as sf-run will see it: [N, 96, 64, 64, 3]."""
    clips, pixels = [], []
    for seed in seeds:
        clip = syn.make_clip(seed)
        path = syn.write_video(clip, work / f"clip-{seed}.mp4")
        pixels.append(read_frames(path, syn.FRAMES, (VISION["image_size"],) * 2).pixels)
        path.unlink()
        clips.append(clip)
    return clips, np.stack(pixels)


def vision_dict() -> dict:
    mean, std = STANDARD_NORM["clip_vision_model"]
    return {**SELECT, "mean": mean, "std": std}


def patch_distance():
    """(distance, reach) on the tower's patch grid over a clip's pixels: distance(x, y) is each patch centre's
    Chebyshev distance to a point, [P] row-major; a thing of radius r covers the patches within reach(r)."""
    grid = VISION["image_size"] // VISION["patch_size"]
    cell = syn.SIZE / grid
    centres = (np.arange(grid) + 0.5) * cell
    cy, cx = (v.ravel() for v in np.meshgrid(centres, centres, indexing="ij"))
    return (lambda x, y: np.maximum(np.abs(cx - x), np.abs(cy - y))), (lambda r: r + cell / 2)


def patch_labels(clips) -> torch.Tensor:
    """What each patch of each frame shows, as class ids (0: nothing) of (colour, shape, direction, flash):
    [N, 96, P, 4]. A patch is labelled with the shape whose centre is nearest, if within the shape's radius of the
    patch; the flash likewise."""
    distance, reach = patch_distance()
    colours, directions = list(syn.COLOURS), list(syn.DIRECTIONS)
    out = np.zeros((len(clips), syn.FRAMES, len(distance(0, 0)), 4), np.int64)
    for n, clip in enumerate(clips):
        for f in range(syn.FRAMES):
            best = np.full(out.shape[2], np.inf)
            for m in clip.movers:
                d = distance(*clip.position(m, f))
                hit = (d < reach(syn.RADIUS)) & (d < best)
                best[hit] = d[hit]
                out[n, f, hit, :3] = (colours.index(m.colour) + 1, syn.SHAPES.index(m.shape) + 1,
                                      directions.index(m.direction) + 1)
            if f in clip.needle_frames():
                out[n, f, distance(*clip.needle_at) < reach(syn.NEEDLE_RADIUS), 3] = syn.NEEDLES.index(clip.needle) + 1
    return torch.from_numpy(out)


DENSE_CLASSES = (len(syn.COLOURS) + 1, len(syn.SHAPES) + 1, len(syn.DIRECTIONS) + 1, len(syn.NEEDLES) + 1)


def train_clip(clips, pixels, steps: int, batch: int, seed: int):
    """Stage 1: in-batch contrastive loss over (frame, caption); a quarter of the frames show the flash, so the
    rare event is a concept the towers learn, which frame selection then finds. Plus a dense loss: linear heads on
    the select layer's patch features name each patch's colour, shape, direction and flash (`patch_labels`).
    Contrastive training alone binds poorly: a probe on its SlowFast tokens names the shape of "the red object"
    for 40% of held-out clips. The heads are dropped after training."""
    torch.manual_seed(seed)
    model, tok = demo_clip(CARD)
    heads = torch.nn.Linear(VISION["hidden_size"], sum(DENSE_CLASSES))
    labels = patch_labels(clips)
    v = vision_dict()
    mean, std = (torch.tensor(v[k]).view(1, 3, 1, 1) * 255.0 for k in ("mean", "std"))
    to_pixels = lambda px: (torch.from_numpy(px).permute(0, 3, 1, 2).float() - mean) / std  # as the vision graph
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=5e-4, weight_decay=0.1)
    sched = _cosine(opt, steps, warmup=50)
    rng = np.random.default_rng(seed)
    model.train()
    losses, dense_losses = [], []
    for step in range(steps):
        pick = rng.choice(len(clips), batch, replace=False)  # one frame per clip: no duplicate captions
        frames = [int(rng.choice(list(clips[c].needle_frames()))) if rng.random() < 0.25
                  else int(rng.integers(syn.FRAMES)) for c in pick]
        texts = [syn.caption(clips[c], f, rng) for c, f in zip(pick, frames)]
        enc = tok(texts, padding=True, return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=to_pixels(pixels[pick, frames]), return_loss=True, output_hidden_states=True)
        feats = select_features(out.vision_model_output.hidden_states, SELECT["select_layer"],
                                SELECT["select_strategy"])
        logits = heads(feats).split(DENSE_CLASSES, -1)
        target = labels[pick, frames]
        dense = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target[..., k].reshape(-1))
                    for k, lg in enumerate(logits))
        (out.loss + dense).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        dense_losses.append(dense.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {np.mean(losses[-50:]):.3f} dense {np.mean(dense_losses[-50:]):.3f}")
    return model.eval(), tok, losses, dense_losses


def _cosine(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def tower_features(model, pixels: np.ndarray) -> torch.Tensor:
    """Select-layer features before the projector, [N, 96, P, C] (the frozen tower runs once per frame)."""
    graph = VisionGraph(model, vision_dict())
    out = []
    with torch.no_grad():
        for clip_px in pixels:
            hs = graph.tower(graph.pixel_values(torch.from_numpy(clip_px)), output_hidden_states=True).hidden_states
            out.append(select_features(hs, SELECT["select_layer"], SELECT["select_strategy"]))
    return torch.stack(out)


class Prompts:
    """The runtime's own prompt around the visual tokens (`sfedge.runtime.prompt`), the question asked as is and
    answered with the option's text: the "text" choice that sf-eval scores the demo with."""

    def __init__(self, tok, model):
        self.spec = prompt.spec_from_tokenizer(tok, prompt.eos_ids(model, tok))
        self.tokenize = prompt.transformers_tokenize(tok)
        self.table = model.get_input_embeddings().weight
        self.end = tok.convert_tokens_to_ids("<|im_end|>")  # the answer ends its turn, so generation stops there

    def sample(self, question: str, options: list, answer: int, visual: torch.Tensor):
        """(input embeddings, the answer's token ids and end of turn, each option's first token): the answer is
        teacher-forced, so its tokens but the last are in the input."""
        ids = prompt.token_ids(self.spec, self.tokenize, question, options=options, choice="text")
        target = ids.option_ids[answer] + [self.end]
        seq = torch.cat([self.table[ids.prefix], visual, self.table[ids.question + target[:-1]]])
        return seq, target, [o[0] for o in ids.option_ids]


def frame_choice(clip, rng, category: str):
    """(slow frames, fast frames) over the clip's 96: 16 uniform frames, 4 of them slow; half the time the slow
    ones are what question-aware selection gives, the flash among them."""
    fast = sample_indices(syn.FRAMES, PIPELINE["frames"])
    slow = fast[slow_indices(len(fast), PIPELINE["slow_frames"])]
    if rng.random() < 0.5:
        hit = int(rng.choice(list(clip.needle_frames())))
        others = rng.choice([f for f in range(syn.FRAMES) if abs(f - hit) > 6], PIPELINE["slow_frames"] - 1,
                            replace=False)
        slow = np.sort(np.concatenate([[hit], others]))
    elif category == "needle" and not set(clip.needle_frames()) & set(fast.tolist()):
        return None  # the flash is in no frame: nothing to learn from this draw
    return slow, fast


def word_targets(clips, table: torch.Tensor, tok) -> torch.Tensor:
    """What each patch of each frame shows, as the mean of the language model's embeddings of its words (the
    shape's colour, kind and direction, or the flash; " nothing" for background) and the clip's shape count:
    [N, 96, P, D]. Aligning the projector to these first (a cheap regression, no language model in the loop) gives
    the LLaVA stage a start where visual tokens already resemble the words the questions' options use."""
    word = lambda w: table[tok(" " + w, add_special_tokens=False)["input_ids"][0]]
    distance, reach = patch_distance()
    patches = len(distance(0, 0))
    out = torch.empty(len(clips), syn.FRAMES, patches, table.shape[1], dtype=torch.float16)  # GBs at 8x8
    with torch.no_grad():
        for n, clip in enumerate(clips):
            count = word(syn.COUNTS[len(clip.movers) - 1])
            for f in range(syn.FRAMES):
                acc, hits = torch.zeros(patches, table.shape[1]), torch.zeros(patches, 1)
                things = [((clip.position(m, f)), syn.RADIUS, [m.colour, m.shape, m.direction]) for m in clip.movers]
                if f in clip.needle_frames():
                    things.append((clip.needle_at, syn.NEEDLE_RADIUS, ["white", clip.needle, "flash"]))
                for (x, y), r, words in things:
                    near = torch.from_numpy(distance(x, y) < reach(r))
                    acc[near] += torch.stack([word(w) for w in words]).mean(0)
                    hits[near] += 1
                empty = hits[:, 0] == 0
                acc[empty], hits[empty] = word("nothing"), 1
                out[n, f] = (acc / hits + count) / 2
    return out


def align_projector(proj, feats: torch.Tensor, targets: torch.Tensor, steps: int, seed: int) -> list:
    """Regress each patch's projected feature on its words' embedding (mean squared error)."""
    opt = torch.optim.AdamW(proj.parameters(), lr=2e-3)
    sched = _cosine(opt, steps, warmup=20)
    gen = torch.Generator().manual_seed(seed)
    n, frames = feats.shape[:2]
    scale = targets[:, ::8].float().var()  # a sample of the frames: the full tensor in fp32 would double its size
    losses = []
    for step in range(steps):
        c, f = torch.randint(n, (256,), generator=gen), torch.randint(frames, (256,), generator=gen)
        loss = F.mse_loss(proj(feats[c, f]), targets[c, f].float()) / scale
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"align step {step}/{steps} relative error {np.mean(losses[-200:]):.3f}")
    return losses


class LoRA(torch.nn.Module):
    """A frozen Linear plus a trainable low-rank update, scale * B @ A (B starts at zero: the model starts as is)."""

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


def add_lora(model) -> dict:
    """Adapters on every decoder layer's projections (`LORA`); returns them by name (as demo.merge_lora reads)."""
    adapters = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for name, rank in LORA["ranks"].items():
            parent, _, leaf = name.rpartition(".")
            lora = LoRA(layer.get_submodule(name), rank, LORA["scale"])
            setattr(layer.get_submodule(parent), leaf, lora)
            adapters[f"layers.{i}.{name}"] = lora
    return adapters


def compute_dtype() -> torch.dtype:
    """What SmolLM2 runs in during the LLaVA stage: bf16 where the CPU computes it natively (AVX512-BF16, AMX), else
    fp32. Measured on a Linear of the stage's size, not read from flags: on an AVX2-only AMD EPYC bf16 took 156 ms
    where fp32 took 18 (PyTorch emulates it), and a training step took over 20 s where fp32 takes 7-8."""
    x, w = torch.randn(1536, 576), torch.randn(1536, 576)

    def seconds(dtype) -> float:
        a, b = x.to(dtype), w.to(dtype)
        F.linear(a, b)  # warm-up
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            F.linear(a, b)
            runs.append(time.perf_counter() - t)
        return min(runs)

    return torch.bfloat16 if seconds(torch.bfloat16) < seconds(torch.float32) else torch.float32


def train_projector(model, tok, clips, feats, adapters: dict, steps: int, batch: int, seed: int, dtype, lr: float,
                    mix: dict):
    """Stage 2: the projector and the adapters learn; the tower's features are precomputed, SmolLM2 runs in
    `dtype` (`compute_dtype`). Each sample's question category is drawn in the proportions `mix` (category: weight)."""
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    trained = list(proj.parameters()) + [p for a in adapters.values() for p in (a.a, a.b)]
    for p in trained:
        p.requires_grad_(True)
    agg = SlowFastAggregator((VISION["image_size"] // VISION["patch_size"],) * 2, 0, PIPELINE["slow_pool"],
                             PIPELINE["fast_grid"])
    prompts = Prompts(tok, model)
    lm, head = model.model.language_model, model.lm_head
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    sched = _cosine(opt, steps, warmup=30)
    rng = np.random.default_rng(seed)
    weights = np.array([mix[c] for c in syn.CATEGORIES], float)
    weights /= weights.sum()
    losses, right = [], []
    for step in range(steps):
        seqs, targets, firsts = [], [], []
        while len(seqs) < batch:
            c = int(rng.integers(len(clips)))
            category = str(rng.choice(syn.CATEGORIES, p=weights))
            frames = frame_choice(clips[c], rng, category)
            if frames is None:
                continue
            slow, fast = frames
            q, cands, answer = syn.questions(clips[c], category, rng)
            x = proj(feats[c, np.concatenate([slow, fast])])
            visual = agg(x, torch.arange(len(slow)), torch.arange(len(slow), len(slow) + len(fast)))
            seq, target, first = prompts.sample(q, cands, cands.index(answer), visual)
            seqs.append(seq)
            targets.append(target)
            firsts.append((first, cands.index(answer)))
        lengths = torch.tensor([len(s) for s in seqs])
        embeds = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = (torch.arange(embeds.shape[1])[None] < lengths[:, None]).long()
        # the positions whose next token is an answer token: the last len(target) of each sequence
        rows = torch.cat([torch.full((len(t),), i) for i, t in enumerate(targets)])
        cols = torch.cat([torch.arange(n - len(t), n) for n, t in zip(lengths.tolist(), targets)])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            logits = head(hidden[rows, cols]).float()
        loss = F.cross_entropy(logits, torch.tensor([t for ts in targets for t in ts]))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        starts = torch.tensor([0] + [len(t) for t in targets[:-1]]).cumsum(0)
        right += [int(logits[s, f].argmax()) == a for s, (f, a) in zip(starts.tolist(), firsts)]
        if step % 20 == 0 or step == steps - 1:
            log(f"projector step {step}/{steps} loss {np.mean(losses[-20:]):.3f} "
                f"train acc {np.mean(right[-20 * batch:]):.2f}")
    return losses, right


def category_mix(text: str) -> dict:
    """"shape=3,direction=3" -> every category's weight (1 where not named)."""
    mix = dict.fromkeys(syn.CATEGORIES, 1.0)
    for item in filter(None, text.split(",")):
        name, _, weight = item.partition("=")
        if name not in mix:
            raise argparse.ArgumentTypeError(f"{name!r}: not a category ({', '.join(syn.CATEGORIES)})")
        mix[name] = float(weight)
    if min(mix.values()) < 0 or not sum(mix.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: weights must be >= 0 and not all 0")
    return mix


def save(out: Path, clip, model, adapters: dict, card: dict) -> Path:
    """The CLIP pair (its vision tower is the LLaVA tower), the projector and the adapters, fp16, in one file."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    tensors |= {f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    tensors |= {f"lora.{name}.{k}": getattr(a, k) for name, a in adapters.items() for k in ("a", "b")}
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    path = out / WEIGHTS
    save_file(tensors, path, metadata={"card": json.dumps(card)})
    return path


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sfedge.train.demo_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for demo_weights.safetensors")
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--align-steps", type=int, default=300)
    p.add_argument("--projector-steps", type=int, default=600)
    p.add_argument("--projector-batch", type=int, default=8)
    p.add_argument("--projector-lr", type=float, default=1e-3)
    p.add_argument("--category-mix", type=category_mix, default=category_mix(""),
                   help="how often the LLaVA stage asks each category, e.g. shape=3,direction=3 (others 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="a demo_weights.safetensors to go on from: its CLIP pair, projector "
                                               "and adapters are loaded, stage 1 and the alignment skipped, and the "
                                               "LLaVA stage runs --projector-steps more (its schedule restarts)")
    a = p.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sfedge-train-") as work:
        clips, pixels = render_clips(Path(work), range(TRAIN_SEED0, TRAIN_SEED0 + a.clips))
    log(f"rendered {a.clips} clips in {time.time() - t0:.0f} s")
    tensors, before = demo_weights(a.resume) if a.resume else ({}, {})
    if a.resume:
        clip = demo_clip(before)[0]
        clip.load_state_dict(part(tensors, "clip."))
    else:
        clip, _, clip_losses, dense_losses = train_clip(clips, pixels, a.clip_steps, a.clip_batch, a.seed)
        before = {"clip_steps": a.clip_steps, "clip_batch": a.clip_batch, "projector_steps": 0,
                  "clip_final_loss": float(np.mean(clip_losses[-50:])),
                  "dense_final_loss": float(np.mean(dense_losses[-50:]))}
    t1 = time.time()
    model, tok = demo_llava(clip, smollm2_model(), a.seed)
    feats = tower_features(model, pixels)
    del pixels
    proj = model.model.multi_modal_projector
    adapters = add_lora(model)
    if a.resume:
        proj.load_state_dict(part(tensors, "projector."))
        for name, adapter in adapters.items():
            adapter.load_state_dict(part(tensors, f"lora.{name}."), strict=False)  # a and b; base is SmolLM2's
    else:
        align = align_projector(proj, feats, word_targets(clips, model.get_input_embeddings().weight, tok),
                                a.align_steps, a.seed)
        before |= {"align_steps": a.align_steps, "align_final_relative_error": float(np.mean(align[-100:]))}
    dtype = compute_dtype()
    log(f"LLaVA stage in {dtype}")
    losses, right = train_projector(model, tok, clips, feats, adapters, a.projector_steps, a.projector_batch,
                                    a.seed + before["projector_steps"],  # a resumed run draws new samples
                                    dtype, a.projector_lr, a.category_mix)
    t2 = time.time()
    card = {**before, "clips": a.clips, "train_seeds": [TRAIN_SEED0, TRAIN_SEED0 + a.clips - 1], "seed": a.seed,
            "projector_steps": before["projector_steps"] + a.projector_steps, "projector_batch": a.projector_batch,
            "projector_final_loss": float(np.mean(losses[-50:])), "projector_dtype": str(dtype).split(".")[1],
            "projector_lr": a.projector_lr, "category_mix": a.category_mix,
            "projector_final_train_accuracy": float(np.mean(right[-50 * a.projector_batch:])),
            "minutes": {"clip": round((t1 - t0) / 60, 1), "projector": round((t2 - t1) / 60, 1)}, **CARD}
    if a.resume:
        # the first run's clips and minutes stay; this run's are its own. The file's digest, not only its path:
        # resuming from the committed weights overwrites them (below, at save)
        card["resumed_from"] = {"file": str(a.resume), "sha256": hashlib.sha256(a.resume.read_bytes()).hexdigest(),
                                "projector_steps": before["projector_steps"],
                                "clips": before["clips"], "minutes": before["minutes"],
                                **{k: before[k] for k in ("resumed_from",) if k in before}}  # the chain of runs
    path = save(Path(a.out), clip, model, adapters, card)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {json.dumps(card)}")


if __name__ == "__main__":
    main()
