"""The figures behind the report, in numpy and the standard library only: accuracy with an interval that respects
that questions about one video are not independent, the paired test and the flips between bundle and reference,
and how far the export moved the distribution over the options."""
from __future__ import annotations

import math
from typing import Hashable, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0


def bootstrap_accuracy(correct: Sequence[bool], clusters: Sequence[Hashable], level: float = 0.95,
                       resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """Accuracy and its percentile interval from a cluster bootstrap: the videos (`clusters`) are resampled with
    replacement, each bringing all its questions, as questions about one video succeed or fail together."""
    if not correct:
        raise ValueError("no questions to score")
    ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    which = np.array([ids[c] for c in clusters])
    right = np.bincount(which, weights=np.asarray(correct, dtype=np.float64), minlength=len(ids))
    asked = np.bincount(which, minlength=len(ids)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    accuracies = right[draws].sum(1) / asked[draws].sum(1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(accuracies, [tail, 100 - tail])
    return float(right.sum() / asked.sum()), float(low), float(high)


def mcnemar(bundle_correct: Sequence[bool], reference_correct: Sequence[bool]) -> tuple[int, int, float]:
    """The discordant pairs (b: only the bundle right, c: only the reference right) and the exact McNemar p."""
    b = sum(1 for x, y in zip(bundle_correct, reference_correct) if x and not y)
    c = sum(1 for x, y in zip(bundle_correct, reference_correct) if y and not x)
    return b, c, mcnemar_p(b, c)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact p: under no difference each discordant pair goes either way with probability 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def flip_rate(bundle_choices: Sequence, reference_choices: Sequence) -> tuple[int, float]:
    """How many questions, and which fraction, got a different option from the two sides (no option at all, None,
    is a choice of its own)."""
    if not bundle_choices:
        raise ValueError("no questions to compare")
    flips = sum(1 for x, y in zip(bundle_choices, reference_choices) if x != y)
    return flips, flips / len(bundle_choices)


def sure_flips(reference: Sequence[Sequence[float]], bundle_choices: Sequence, reference_choices: Sequence,
               sure: float) -> tuple[int, int]:
    """(questions whose likeliest option the reference gives at least `sure` of the options' probability, how many
    of them the bundle answered otherwise): flips on questions the original is sure of are fidelity lost; on
    near-uniform ones even an 8-bit model's rounding decides."""
    picked = [(x, y) for r, x, y in zip(reference, bundle_choices, reference_choices)
              if np.exp(_log_normalised(r)).max() >= sure]
    return len(picked), sum(1 for x, y in picked if x != y)


def option_kl(reference_logprobs: Sequence[float], bundle_logprobs: Sequence[float]) -> float:
    """KL(reference || bundle) in nats between the two distributions over the options alone: each side's option
    log-probabilities (over the whole vocabulary) renormalised over the options."""
    p, q = _log_normalised(reference_logprobs), _log_normalised(bundle_logprobs)
    ref = np.exp(p)
    return float(np.sum(np.where(ref > 0, ref * (p - q), 0.0)))


def option_agreement(reference: Sequence[Sequence[float]], bundle: Sequence[Sequence[float]]
                     ) -> tuple[float, float, float]:
    """Mean and largest option KL, and the fraction of questions whose most likely option is the same."""
    if not reference:
        raise ValueError("no option log-probabilities to compare")
    kls = [option_kl(r, b) for r, b in zip(reference, bundle)]
    top1 = [int(np.argmax(r)) == int(np.argmax(b)) for r, b in zip(reference, bundle)]
    return float(np.mean(kls)), float(np.max(kls)), float(np.mean(top1))


def _log_normalised(logprobs: Sequence[float]) -> np.ndarray:
    x = np.asarray(logprobs, dtype=np.float64)
    top = x.max()
    return x - top - np.log(np.exp(x - top).sum())
