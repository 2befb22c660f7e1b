"""sf-eval's --reference: the PyTorch original (transformers, fp32) answering the same question from the same
source frames the bundle used, so that a difference between the two is the export's and not the sampling's."""
from __future__ import annotations

from pathlib import Path

import torch

from sfedge.export import checkpoint as ckpt_io
from sfedge.export import reference
from sfedge.runtime import prompt
from sfedge.runtime.video import read_indices


class Reference:
    def __init__(self, checkpoint, manifest: dict):
        self.model, self.tokenizer = ckpt_io.whole(Path(checkpoint))
        self.manifest = manifest
        self.eos = manifest["prompt"]["eos_token_ids"]

    def answer(self, video: Path, question: str, options: list, slow_frames: list, fast_frames: list,
               max_new_tokens: int, choice: str = "letter") -> tuple[str, list]:
        """(the answer text with its prefill, each option's log-probability as the answer: its letter's as the first
        token, or its text's summed over its tokens, as `runtime.llm.score_options`)."""
        if not fast_frames:
            raise NotImplementedError("the reference pools with SlowFast only (not prompt-guided pooling)")
        used = sorted(set(slow_frames) | set(fast_frames))
        pixels = read_indices(video, used, tuple(self.manifest["vision"]["image_size"]))
        at = {f: i for i, f in enumerate(used)}
        embeds = reference.prompt_embeds(self.model, self.tokenizer, self.manifest, pixels, question, options,
                                         [at[f] for f in slow_frames], [at[f] for f in fast_frames], choice)
        ids = prompt.token_ids(self.manifest["prompt"], prompt.transformers_tokenize(self.tokenizer), question,
                               options=options, choice=choice)
        with torch.no_grad():
            first = torch.log_softmax(self.model(inputs_embeds=embeds).logits[0, -1].float(), -1)
        logprobs = [float(first[o[0]]) if len(o) == 1 else self._logprob(embeds, o) for o in ids.option_ids]
        out = reference.generate(self.model, self.tokenizer, self.manifest, pixels, question, max_new_tokens,
                                 embeds=embeds)
        text = self.tokenizer.decode([t for t in out if t not in self.eos], skip_special_tokens=True)
        return ids.answer_start + text, logprobs

    def _logprob(self, embeds: torch.Tensor, option: list) -> float:
        """The option's tokens teacher-forced after the prompt: the sum of their log-probabilities."""
        table = self.model.get_input_embeddings().weight
        with torch.no_grad():
            seq = torch.cat([embeds, table[option[:-1]][None]], 1)
            logits = self.model(inputs_embeds=seq).logits[0, -len(option):].float()
        return float(torch.log_softmax(logits, -1)[torch.arange(len(option)), option].sum())
