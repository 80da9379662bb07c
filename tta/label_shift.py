"""SAR's online imbalanced label shift (Niu et al., ICLR 2023, Sec. 4.3; mr-eggplant/SAR
``dataset/generate_shifted_sample_indices.py``, after Wu et al., NeurIPS 2021): the test stream walks
through the classes in a shuffled order, ``total / C`` samples per class; at each step the label is
drawn with probability ir / (ir + C - 1) for that step's class and 1 / (ir + C - 1) for every other,
and an image of the drawn label is picked uniformly, with replacement (images may repeat or be
missing, as in the reference's 100,000-sample stream over ImageNet-C's 50,000). ir = 1 is a uniform
label stream; the reference's default, 500,000, is almost pure class order."""

from __future__ import annotations

import numpy as np

from selfsup.errors import UsageError


def label_shift_order(
    labels: np.ndarray, imbalance_ratio: float, total: int, rng: np.random.Generator
) -> np.ndarray:
    """The stream's ``total`` image indices into ``labels``, seeded by ``rng``."""
    classes = np.unique(labels)
    n_classes = len(classes)
    per_step = total // n_classes
    if per_step == 0:
        raise UsageError(
            f"label_shift needs at least one image per class step: {total} samples for {n_classes} classes"
        )
    minor = 1.0 / (imbalance_ratio + n_classes - 1)
    drawn = []
    for major in rng.permutation(n_classes):  # the shuffled class order
        probs = np.full(n_classes, minor)
        probs[major] = minor * imbalance_ratio
        drawn.append(rng.choice(n_classes, per_step, p=probs / probs.sum()))
    ys = np.concatenate(drawn)
    order = np.empty(len(ys), dtype=np.int64)
    for k, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        picked = ys == k
        order[picked] = members[rng.integers(0, len(members), picked.sum())]
    return order
