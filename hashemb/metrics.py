"""Click-model metrics: ROC AUC (ties averaged) and log loss, in NumPy, or in
CuPy on the device for CuPy arrays (an evaluation's scores need not leave it)."""
import numpy as np

from ._backend import on_gpu, place


def _on(labels, values, name):
    """numpy and no context, or cupy and the arrays' device made current (a
    mix is a TypeError naming the host one, two devices a ValueError)."""
    return place(labels if on_gpu(labels=labels, **{name: values}) else None)


def _pairs(xp, labels, values, name):
    """(labels == 1, values as float64), flat, after the checks both metrics
    share: labels 0 or 1, one value a label (no broadcasting)."""
    lab = xp.asarray(labels).reshape(-1)
    y = lab == 1
    binary = y | (lab == 0)
    if not bool(binary.all()):
        raise ValueError(f"labels: expected 0 or 1, got {lab[~binary][0].item()!r}")
    v = xp.asarray(values, dtype=np.float64).reshape(-1)
    if y.shape != v.shape:
        raise ValueError(f"{name}: expected {y.shape[0]} values like labels, got {v.shape[0]}")
    return y, v


def auc(labels, scores):
    r"""Area under the ROC curve: the probability that a random positive scores
    above a random negative, ties counting one half (the Mann-Whitney U statistic):

    .. math:: \mathrm{AUC} = \frac{\sum_{i: y_i = 1} \mathrm{rank}(s_i) - n_+(n_+ + 1)/2}{n_+ n_-}

    with average ranks for ties. O(n log n). Labels are 0 or 1; a NaN score
    (a diverged model) makes the AUC NaN, as it does the log loss, rather
    than a number from wherever the sort put it.

    Parameters
    ----------
    labels : array_like of 0 and 1
        Both classes present (else ValueError).
    scores : array_like of float
        One score per label (flattened, no broadcasting); only their order
        matters (ties count one half). CuPy ``labels`` and ``scores`` are
        ranked on their device (only the result comes back).

    Returns
    -------
    float
        In [0, 1], or NaN when a score is NaN.

    Examples
    --------
    >>> from hashemb.metrics import auc
    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auc([0, 1], [0.3, float("nan")])
    nan
    """
    xp, on = _on(labels, scores, "scores")
    with on:
        return _auc(xp, *_pairs(xp, labels, scores, "scores"))


def _auc(xp, y, s):
    pos = int(y.sum())
    neg = y.shape[0] - pos
    if pos == 0 or neg == 0:
        raise ValueError("labels: expected both classes, got only one")
    if bool(xp.isnan(s).any()):
        return float("nan")
    order = xp.argsort(s)
    ss = s[order]
    # average rank of each run of equal scores: (first + last + 2) / 2, 1-based
    new = xp.ones(ss.shape[0], bool)
    new[1:] = ss[1:] != ss[:-1]
    starts = xp.flatnonzero(new)
    ends = xp.concatenate([starts[1:], xp.asarray([ss.shape[0]], starts.dtype)])
    avg = (starts + ends + 1) / 2.0
    ranks = xp.empty_like(s)
    ranks[order] = avg[xp.cumsum(new) - 1]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def logloss(labels, prob, eps=1e-7):
    r"""Mean binary cross-entropy :math:`-\overline{y \log p + (1-y)\log(1-p)}`,
    with p clipped to ``[eps, 1-eps]``; labels 0 or 1, one probability each.

    Parameters
    ----------
    labels : array_like of 0 and 1
        At least one.
    prob : array_like of float
        The predicted probability of label 1, one per label.
    eps : float
        The clipping margin, so a confident mistake costs :math:`-\log\epsilon`
        at most rather than infinity.

    Returns
    -------
    float

    Examples
    --------
    >>> from hashemb.metrics import logloss
    >>> round(logloss([1, 0], [0.5, 0.5]), 4)
    0.6931
    >>> round(logloss([1], [0.0]), 4)             # clipped: -log(1e-7)
    16.1181
    """
    xp, on = _on(labels, prob, "prob")
    with on:
        y, p = _pairs(xp, labels, prob, "prob")
        if not y.shape[0]:
            raise ValueError("labels: expected at least one, got none")
        y = y.astype(np.float64)
        p = xp.clip(p, eps, 1 - eps)
        return float(-xp.mean(y * xp.log(p) + (1 - y) * xp.log1p(-p)))
