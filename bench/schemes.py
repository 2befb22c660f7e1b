"""Fidelity of each `--llm-quant` scheme on the real SmolLM2-135M-Instruct, the language model alone (calibrated on
the chat prompts, no visual tokens): perplexity ratio, next-token KL and its share of the reference's entropy, top-5
overlap and top-1 agreement, as the export's gate sees them. The table in README, "The language model at 4 bits".

    python -m sfedge.bench.schemes [rtn rtn-mixed imatrix accurate gptq gptq-mixed]
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    from sfedge.export.demo import smollm2_model, smollm2_tokenizer
    from sfedge.export.llm import QUANT_SCHEMES, write_llm
    from sfedge.export.llm_fidelity import verdict
    from sfedge.export.shards import Shards
    from sfedge.export.streamed import LayerStream
    from sfedge.runtime.prompt import eos_ids, spec_from_tokenizer

    from .probe import machine

    lm, tok = smollm2_model(), smollm2_tokenizer()
    prompt = spec_from_tokenizer(tok, eos_ids(lm, tok))
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_pretrained(Path(tmp) / "checkpoint")
        stream = LayerStream(Shards(Path(tmp) / "checkpoint"), lm.config, prefix="model.")
        print(json.dumps({"machine": machine()}))
        for scheme in sys.argv[1:] or list(QUANT_SCHEMES):
            (Path(tmp) / scheme).mkdir()
            _, figures = write_llm(stream, tok, Path(tmp) / scheme, prompt, scheme=scheme, log=lambda m: None)
            fig = verdict(figures, "int4")
            ppl, tf = fig["perplexity"], fig["teacher_forced"]
            print(json.dumps({"scheme": scheme, "perplexity_ratio": ppl["ratio"], "prose_kl": ppl["mean_kl"],
                              "prose_entropy": ppl["mean_entropy"], "prompts_kl": tf["mean_kl"],
                              "prompts_entropy": tf["mean_entropy"], "top5": tf["mean_top5_overlap"],
                              "top1": tf["top1_agreement"], "mean_cosine": tf["mean_cosine"],
                              "passed": fig["passed"]}), flush=True)


if __name__ == "__main__":
    main()
