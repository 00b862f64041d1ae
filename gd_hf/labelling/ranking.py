"""The strategies that rank the unlabeled pool, and the two terms any of them can take on (class balance,
diversity). Each strategy is one signal of `ImageSignals`, larger first:

- `near_threshold`: the score mass of the teacher's object queries between half the pseudo-label threshold and
  the threshold: objects it half sees, which become neither pseudo labels nor confident background (the
  pseudo-label view of uncertainty sampling: Lewis & Gale 1994; for detectors, Roy et al., BMVC 2018).
- `entropy`: the largest normalised class entropy among the object queries it sees (score >= half the threshold)
  (Roy et al., BMVC 2018, "max entropy").
- `disagreement`: how much the teacher's pseudo labels of the image and of a photometrically perturbed copy
  differ (1 - matched mask IoU): consistency-based selection (Gao et al., ECCV 2020; Elezi et al., CVPR 2022).
- `random`: a seeded uniform draw, the baseline every other one must beat.

Class balance (`balance` > 0): a score is multiplied by (f_max / f_c) ** (balance / 2) for the rarest class c
the teacher sees in the image, f_c the share of labeled images holding c (floored at one image): the
1 / sqrt(frequency) weighting of detectron2's repeat factors (Gupta et al., LVIS, CVPR 2019).
Diversity (`duplicate_similarity` < 1): going down the ranking, an image whose 8 x 8 grey thumbnail is more
similar than that to one already picked (similarity = 1 - the RMS difference of the grey levels, in [0, 1]) is
passed over until the others are used (a greedy core-set guard: Sener & Savarese, ICLR 2018), so N
near-duplicates are never N picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gd_hf.labelling.signals import ImageSignals

STRATEGIES = ("near_threshold", "entropy", "disagreement", "random")


@dataclass
class Pick:
    """One image to label: its rank (1 = first), id, the strategy's score and the class-balance factor."""

    rank: int
    image_id: int
    score: float
    balance_factor: float


def class_balance_factors(
    signals: list[ImageSignals], labeled_class_images: dict[int, int], labeled_images: int, balance: float
) -> np.ndarray:
    """Per image, (f_max / f_c) ** (balance / 2) for its rarest seen class c (1 with no class or balance 0)."""
    factors = np.ones(len(signals))
    if balance <= 0 or labeled_images <= 0:
        return factors
    share = {c: max(n, 1) / labeled_images for c, n in labeled_class_images.items()}
    most = max(share.values(), default=1.0)
    for k, s in enumerate(signals):
        if s.classes:
            rarest = min(share.get(c, 1 / labeled_images) for c in s.classes)
            factors[k] = (most / rarest) ** (balance / 2)
    return factors


def strategy_scores(signals: list[ImageSignals], strategy: str, seed: int = 0) -> np.ndarray:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if strategy == "random":
        return np.random.default_rng(seed).random(len(signals))
    values = [getattr(s, strategy) for s in signals]
    if any(v is None for v in values):
        raise ValueError(f"the {strategy} signal was not computed for this pool: score it with that strategy")
    return np.asarray(values, dtype=np.float64)


def rank_images(
    signals: list[ImageSignals],
    strategy: str,
    count: int,
    labeled_class_images: dict[int, int] | None = None,
    labeled_images: int = 0,
    balance: float = 0.0,
    duplicate_similarity: float = 1.0,
    seed: int = 0,
) -> list[Pick]:
    """The `count` images to label next, best first. `random` takes no balance or diversity term: it is the
    baseline as drawn."""
    scores = strategy_scores(signals, strategy, seed)
    factors = np.ones(len(signals))
    if strategy != "random":
        factors = class_balance_factors(signals, labeled_class_images or {}, labeled_images, balance)
    adjusted = scores * factors
    ids = np.array([s.image_id for s in signals])
    # Score descending; ties (many images may share the top disagreement, 1) in a seeded random order, not by
    # id: ids often follow how a data set was collected.
    order = np.lexsort((np.random.default_rng(seed + 1).random(len(signals)), -adjusted))
    if strategy == "random" or duplicate_similarity >= 1.0:
        chosen = order[:count].tolist()
    else:
        thumbnails = np.array([s.thumbnail for s in signals], dtype=np.float64)
        chosen, passed_over = [], []
        for k in order:
            if len(chosen) == count:
                break
            rms = np.sqrt(((thumbnails[chosen] - thumbnails[k]) ** 2).mean(1)) if chosen else None
            if rms is not None and float(1 - rms.min()) > duplicate_similarity:
                passed_over.append(int(k))
            else:
                chosen.append(int(k))
        chosen += passed_over[: count - len(chosen)]
    return [Pick(r + 1, int(ids[k]), float(scores[k]), float(factors[k])) for r, k in enumerate(chosen)]
