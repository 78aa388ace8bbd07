"""MovieLens-100k as a click data set (rating >= 4 is a click), read from the
files that the ``recbole`` wheel ships (``pip install --no-deps recbole``);
recbole itself is never imported."""
import importlib.util
import os

import numpy as np

from .synthetic import Batch

FIELDS = ("user_id", "item_id", "age", "gender", "occupation", "zip3", "release_year",
          "genre")
DENSE = ("age", "release_year", "num_genres", "timestamp")


def movielens_dir():
    """The ml-100k folder inside the installed recbole package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100k: expected the recbole wheel's files; "
                                "install them with `pip install --no-deps recbole`")
    return os.path.join(list(spec.submodule_search_locations)[0], "dataset_example", "ml-100k")


def _read(path):
    with open(path, encoding="latin-1") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return header, rows


def load_movielens(path=None, test_fraction=0.2, seed=0):
    """MovieLens-100k clicks with user and item side features.

    Each rating is a sample; label 1 when rating >= 4. Categorical fields
    :data:`FIELDS` (user, item, age, gender, occupation, first 3 zip digits,
    release year, first genre) are mapped to ``[0, n_t)`` by sorted vocabulary;
    dense fields :data:`DENSE` are scaled to about [0, 1]. The split is a
    random permutation by ``seed``: the last ``test_fraction`` is the test set.

    Parameters
    ----------
    path : str or path-like, optional
        A folder holding ``ml-100k.inter``, ``ml-100k.user`` and
        ``ml-100k.item`` (recbole's atomic files); default the installed
        recbole wheel's (:func:`movielens_dir`, FileNotFoundError without it).
    test_fraction : float
        Share of the ratings in the test set, in (0, 1).
    seed : int
        Seed of the split's permutation.

    Returns
    -------
    train, test : Batch
        ``cats`` int64 (n, 8), ``dense`` float32 (n, 4), ``labels`` float32.
    cardinalities : list of int

    Examples
    --------
    >>> from hashemb.data import load_movielens
    >>> train, test, card = load_movielens()            # doctest: +SKIP
    >>> len(train.labels), len(test.labels), len(card)  # doctest: +SKIP
    (80000, 20000, 8)
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    root = movielens_dir() if path is None else os.fspath(path)
    inter_h, inter = _read(os.path.join(root, "ml-100k.inter"))
    user_h, users = _read(os.path.join(root, "ml-100k.user"))
    item_h, items = _read(os.path.join(root, "ml-100k.item"))
    ui, ii, ri, ti = (inter_h.index(k) for k in ("user_id", "item_id", "rating", "timestamp"))
    user = {r[0]: dict(zip(user_h, r)) for r in users}
    item = {r[0]: dict(zip(item_h, r)) for r in items}
    cols = {k: [] for k in FIELDS}
    dense, labels = [], []
    for r in inter:
        u, it = user.get(r[ui], {}), item.get(r[ii], {})
        genres = it.get("class", "").split()
        year = it.get("release_year", "")
        vals = (r[ui], r[ii], u.get("age", ""), u.get("gender", ""), u.get("occupation", ""),
                u.get("zip_code", "")[:3], year, genres[0] if genres else "")
        for k, v in zip(FIELDS, vals):
            cols[k].append(v)
        age = float(u["age"]) if u.get("age", "").isdigit() else 0.0
        yr = float(year) if year.isdigit() else 1990.0
        dense.append((age / 100.0, (yr - 1900.0) / 100.0, len(genres) / 6.0, float(r[ti])))
        labels.append(1.0 if float(r[ri]) >= 4 else 0.0)
    cats, card = [], []
    for k in FIELDS:
        vocab, inv = np.unique(np.array(cols[k]), return_inverse=True)
        cats.append(inv)
        card.append(len(vocab))
    cats = np.stack(cats, axis=1).astype(np.int64)
    dense = np.array(dense, np.float64)
    ts = dense[:, 3]
    dense[:, 3] = (ts - ts.min()) / max(ts.max() - ts.min(), 1.0)
    dense = dense.astype(np.float32)
    labels = np.array(labels, np.float32)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(round(len(labels) * (1 - test_fraction)))
    tr, te = order[:cut], order[cut:]
    return (Batch(dense[tr], cats[tr], labels[tr], None),
            Batch(dense[te], cats[te], labels[te], None), card)
