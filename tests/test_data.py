"""Data: the synthetic generator's stated properties, the Criteo TSV reader,
the MovieLens loader, and the metrics against brute force."""
import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hashemb.data import CRITEO_KAGGLE, CriteoTSV, SyntheticCriteo, load_movielens
from hashemb.data.criteo import token_id
from hashemb.metrics import auc, logloss


# -- metrics -----------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=40))
def test_auc_is_the_pairwise_probability(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], float)
    if y.min() == y.max():
        with pytest.raises(ValueError, match="labels"):
            auc(y, s)
        return
    pos, neg = s[y == 1], s[y == 0]
    want = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auc(y, s) == pytest.approx(want, abs=1e-12)


def test_auc_of_a_diverged_model_is_nan_and_labels_are_binary():
    """A NaN score made a number out of the sort order (1.0 for these); it
    is NaN now, as the log loss is. Labels other than 0/1 are named."""
    y = np.array([0, 1, 1, 0])
    assert np.isnan(auc(y, [0.1, np.nan, 0.3, 0.2]))
    assert np.isnan(logloss(y, [0.1, np.nan, 0.3, 0.2]))
    assert auc(y.astype(np.float32), [0.1, 0.9, 0.3, 0.2]) == 1.0
    with pytest.raises(ValueError, match="labels: expected 0 or 1, got 2"):
        auc([0, 1, 2], [0.1, 0.5, 0.3])


def test_logloss():
    assert logloss([1, 0, 1], [0.9, 0.2, 0.6]) == pytest.approx(
        -(np.log(0.9) + np.log(0.8) + np.log(0.6)) / 3)
    # the checks auc makes (one probability broadcast over every label, and a
    # label of 2, gave numbers)
    with pytest.raises(ValueError, match="prob: expected 3 values like labels, got 1"):
        logloss([1, 0, 1], [0.9])
    with pytest.raises(ValueError, match="labels: expected 0 or 1, got 2"):
        logloss([1, 0, 2], [0.9, 0.2, 0.6])
    with pytest.raises(ValueError, match="labels: expected at least one"):
        logloss([], [])


# -- synthetic ---------------------------------------------------------------
GEN = SyntheticCriteo(scale=0.01, seed=0)
DATA = GEN.sample(0, 60_000)


def test_shape_and_cardinalities():
    assert GEN.cardinalities == [min(c, max(int(np.ceil(c * 0.01)), 10)) for c in CRITEO_KAGGLE]
    assert DATA.dense.shape == (60_000, 13) and DATA.dense.dtype == np.float32
    assert DATA.cats.shape == (60_000, 26) and DATA.cats.dtype == np.int64
    assert (DATA.cats >= 0).all() and (DATA.cats < GEN.cardinalities).all()
    assert set(np.unique(DATA.labels)) == {0.0, 1.0}
    assert (DATA.dense >= 0).all()


def test_deterministic_in_any_chunking_and_splits_differ():
    a = GEN.sample(1000, 500)
    np.testing.assert_array_equal(a.cats, DATA.cats[1000:1500])
    np.testing.assert_array_equal(a.labels, DATA.labels[1000:1500])
    np.testing.assert_array_equal(a.prob, DATA.prob[1000:1500])
    b = SyntheticCriteo(scale=0.01, seed=0).sample(1000, 500)
    np.testing.assert_array_equal(a.dense, b.dense)
    test = GEN.sample(1000, 500, "test")
    assert not np.array_equal(test.cats, a.cats)
    assert not np.array_equal(SyntheticCriteo(0.01, seed=1).sample(1000, 500).cats, a.cats)


def test_zipf_frequencies():
    """Popular (small) ids dominate with a power-law decay."""
    x = DATA.cats[:, 2]                     # 101,313 tokens
    f = np.bincount(x, minlength=GEN.cardinalities[2])
    assert f[0] > f[10] > f[1000]
    # the in-cluster draws make rank 0..K-1 the cluster heads: compare heads
    heads = f[:64]
    assert heads.max() < 0.05 * len(x)
    assert np.count_nonzero(f) < 0.8 * GEN.cardinalities[2]   # a long tail unseen


def test_tokens_of_one_cluster_co_occur():
    """Same-cluster pairs across two big fields occur far above the 1/K of
    independent fields."""
    a, b = DATA.cats[:, 2] % 64, DATA.cats[:, 11] % 64
    same = np.mean(a == b)
    assert same > 0.4        # in_cluster^2 = 0.49 plus chance


def test_click_model_and_oracle():
    assert 0.2 < DATA.labels.mean() < 0.3
    np.testing.assert_allclose(DATA.labels.mean(), DATA.prob.mean(), atol=0.01)
    assert 0.78 < auc(DATA.labels, DATA.prob) < 0.88
    # embeddings matter: the categorical part alone is predictive
    g2 = SyntheticCriteo(scale=0.01, seed=0, beta=0.0, gamma=0.0)
    d2 = g2.sample(0, 60_000)
    assert auc(d2.labels, d2.prob) < auc(DATA.labels, DATA.prob) - 0.05


def test_large_field_vectors_hashed_like_small():
    """Token vectors come from hashes: the table path and the on-the-fly path agree."""
    x = np.array([0, 5, 77, 9])
    np.testing.assert_allclose(GEN._vectors(2, x), GEN._vectors_of(2, x))
    np.testing.assert_allclose(GEN._vectors(0, x % 15), GEN._vectors_of(0, x % 15))


def test_synthetic_errors():
    with pytest.raises(ValueError, match="scale"):
        SyntheticCriteo(scale=0)
    with pytest.raises(ValueError, match="split"):
        GEN.sample(0, 1, "valid")
    with pytest.raises(ValueError, match="start"):
        GEN.sample(-1, 1)


# -- Criteo TSV --------------------------------------------------------------
def _row(label="1", dense=None, cats=None):
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label] + dense + cats) + "\n"


def test_tsv_reads_rows_with_missing_fields(tmp_path):
    rows = [_row(), _row("0", [""] * 13, [""] * 26), _row(dense=["-3"] + ["7"] * 12)]
    path = tmp_path / "day.tsv"
    path.write_text("".join(rows))
    r = CriteoTSV(path)
    batches = list(r.batches(batch_size=2))
    assert [len(b.labels) for b in batches] == [2, 1]
    b = CriteoTSV(str(path)).read()
    assert b.labels.tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(b.dense[0], np.log1p(np.arange(13)))
    assert (b.dense[1] == 0).all() and (b.cats[1] == 0).all()
    assert b.dense[2, 0] == 0                          # log1p(max(-3, 0))
    assert b.cats[0, 5] == token_id("00000005") != 0
    assert len(set(b.cats[0].tolist())) == 26          # distinct tokens, distinct ids
    # every pass reads the file from its start and counts its own rows
    # (the limit once compared the rows of all passes: a second read was empty)
    r = CriteoTSV(path)
    assert r.read(limit=2).labels.tolist() == [1.0, 0.0] == r.read(limit=2).labels.tolist()
    assert r.rows == 2 and len(r.read().labels) == 3 == r.rows
    assert len(r.read(limit=0).labels) == 0
    with pytest.raises(ValueError, match="limit"):
        r.read(limit=-1)
    with pytest.raises(ValueError, match="batch_size"):
        next(r.batches(batch_size=0))


def test_tsv_bad_rows_raise_with_line_number_or_are_skipped():
    good = _row()
    bad = [_row(label="2"), "1\t2\t3\n", _row(dense=["x"] + ["1"] * 12),
           _row(cats=["zz"] + ["1"] * 25), _row(cats=["1" * 17] + ["1"] * 25),
           _row(cats=["-1"] + ["1"] * 25)]
    for b in bad:
        with pytest.raises(ValueError, match="line 2"):
            CriteoTSV([good, b, good]).read()
    r = CriteoTSV([good] + bad + [good], on_bad="skip")
    assert len(r.read().labels) == 2 and r.skipped == len(bad)
    with pytest.raises(ValueError, match="on_bad"):
        CriteoTSV([], on_bad="ignore")
    assert CriteoTSV([]).read().cats.shape == (0, 26)


def test_tsv_open_files_and_iterators_go_on_where_a_pass_stopped(tmp_path):
    # a limited pass once closed the caller's file (yield from passed the
    # generator's close on) and pulled one line too many from an iterator
    path = tmp_path / "day.tsv"
    path.write_text("".join(_row(dense=[str(i)] * 13) for i in range(6)))
    first = lambda b: np.expm1(b.dense[:, 0]).round().tolist()
    it = iter(path.read_text().splitlines(keepends=True))
    r = CriteoTSV(it)
    assert first(r.read(limit=2)) == [0, 1] and first(r.read(limit=2)) == [2, 3]
    with open(path) as f:
        assert first(CriteoTSV(f).read(limit=3)) == [0, 1, 2] and not f.closed
        next(CriteoTSV(f).batches(batch_size=1))        # abandoned: the file stays open
        assert not f.closed and first(CriteoTSV(f).read()) == [4, 5]


def test_tsv_passes_over_blank_lines_and_refuses_dense_values_past_64_bits(tmp_path):
    path = tmp_path / "day.tsv"
    path.write_text(_row() + "\n" + _row() + "  \r\n\n")
    r = CriteoTSV(path)
    assert len(r.read().labels) == 2 and r.skipped == 0
    huge = _row(dense=["9" * 400] + ["1"] * 12)
    with pytest.raises(ValueError, match="line 2: I1: expected a 64-bit integer"):
        CriteoTSV([_row(), huge]).read()
    r = CriteoTSV([huge, _row(), _row(dense=[str(1 << 63)] + ["1"] * 12)], on_bad="skip")
    assert len(r.read().labels) == 1 and r.skipped == 2


def test_tsv_reads_gzip_and_skips_undecodable_lines(tmp_path):
    import gzip
    rows = [_row(), _row("0", cats=[f"{i:04x}" for i in range(26)])]
    plain, packed = tmp_path / "day.tsv", tmp_path / "day.tsv.gz"
    plain.write_text("".join(rows))
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = CriteoTSV(plain).read(), CriteoTSV(packed).read()
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and len(a.labels) == 2
    # a byte that is not UTF-8: that line is bad like any other (it ended the read)
    mixed = tmp_path / "mixed.tsv"
    mixed.write_bytes(rows[0].encode() + b"1\t\xff\xfe" + rows[1][1:].encode() + rows[1].encode())
    with pytest.raises(ValueError, match="line 2"):
        CriteoTSV(mixed).read()
    r = CriteoTSV(mixed, on_bad="skip")
    assert r.read().labels.tolist() == [1.0, 0.0] and r.skipped == 1
    # a pipe is read once: sniffing gzip by reopening it read nothing
    import os
    import threading
    for data in (plain.read_bytes(), packed.read_bytes()):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda d=data: fifo.write_bytes(d))
        writer.start()
        assert len(CriteoTSV(fifo).read().labels) == 2
        writer.join()
        fifo.unlink()


@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=16))
@settings(max_examples=50)
def test_token_ids_are_a_bijection_of_the_hex_value(h):
    assert token_id(h) == token_id(h.upper())
    assert token_id(h) != 0 or int(h, 16) == (1 << 64) - 1
    if int(h, 16) + 1 < 1 << 64:
        assert token_id(h) != token_id(format(int(h, 16) + 1, "x"))


# -- MovieLens ---------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("recbole") is None,
                    reason="needs `pip install --no-deps recbole`")
def test_movielens():
    tr, te, card = load_movielens(seed=0)
    assert len(tr.labels) == 80_000 and len(te.labels) == 20_000
    assert card[:2] == [943, 1682]                      # users, items of ml-100k
    assert (tr.cats < card).all() and (te.cats < card).all()
    pos = (np.concatenate([tr.labels, te.labels]) == 1).mean()
    assert pos == pytest.approx(0.5536, abs=1e-3)       # ratings >= 4 in ml-100k
    tr2, _, _ = load_movielens(seed=0)
    np.testing.assert_array_equal(tr.cats, tr2.cats)
    with pytest.raises(ValueError, match="test_fraction"):
        load_movielens(test_fraction=1.0)


def test_logloss_clips_probabilities_of_zero_and_one():
    # p = 0 for a positive (and p = 1 for a negative) is clipped to eps, not log(0)
    import math
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([0], [1.0]) == pytest.approx(-math.log1p(-(1 - 1e-7)))


# -- from a mutation round: each kills a mutant the suite let through

def test_auc_refuses_minus_one_labels():
    with pytest.raises(ValueError, match="labels: expected 0 or 1, got -1"):
        auc([-1, 1, 1], [0.1, 0.5, 0.3])


def test_token_zero_frequency_is_the_documented_mixture():
    cats = GEN.sample(0, 60_000).cats[:, 2]
    a, n, K, pin = 1.1, GEN.cardinalities[2], 64, 0.7
    pz = lambda s: (1 - 2 ** (1 - a)) / (1 - (s + 1) ** (1 - a))   # P(rank 0), bounded power law
    want = pin / K * pz(-(-n // K)) + (1 - pin) * pz(n)
    got = np.mean(cats == 0)
    assert abs(got - want) < 5 * np.sqrt(want * (1 - want) / len(cats))


def test_in_cluster_must_be_a_probability():
    with pytest.raises(ValueError, match="in_cluster"):
        SyntheticCriteo(in_cluster=1.5)


def test_token_vectors_of_one_cluster_vary_by_one_minus_rho():
    v = GEN._vectors_of(2, np.arange(0, GEN.cardinalities[2], 64))    # all cluster 0
    assert abs(v.var(axis=0).mean() - (1 - GEN.rho)) < 0.05
    w = GEN._vectors_of(2, np.arange(20_000))                         # every cluster
    assert abs(w.var(axis=0).mean() - 1.0) < 0.1


def test_train_samples_cannot_run_into_the_test_split():
    with pytest.raises(ValueError, match="start"):
        GEN.sample(2 ** 40 - 5, 10)


def test_tsv_reads_crlf_rows():
    row = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(f"{i:x}" for i in range(26)) + "\n"
    a = CriteoTSV([row, row]).read()
    b = CriteoTSV([row.replace("\n", "\r\n")] * 2).read()
    assert len(b.labels) == 2 and np.array_equal(a.cats, b.cats)


def test_metrics_on_cupy_arrays():
    # the same ranks on the device: equal to the NumPy AUC (ties included) and
    # log loss; a host array beside a device one is a TypeError naming it
    import gpu_emu
    cp = gpu_emu.cupy_or_skip()
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.random(5000), 2)                 # many ties
    assert auc(cp.asarray(y), cp.asarray(s)) == pytest.approx(auc(y, s), abs=1e-12)
    p = np.clip(s, 0, 1)
    assert logloss(cp.asarray(y), cp.asarray(p)) == pytest.approx(logloss(y, p), rel=1e-12)
    with pytest.raises(TypeError, match="scores: expected a cupy.ndarray"):
        auc(cp.asarray(y), s)
    with pytest.raises(ValueError, match="labels: expected 0 or 1"):
        auc(cp.asarray([0, 1, 2]), cp.asarray([0.1, 0.5, 0.3]))
