"""SCMA (he.LSHTable) and LMA (he.LMA): signatures against a set-based minhash
reference, slots against the formulas in plain Python, collision rates against
Jaccard theory with binomial tolerances, bags through the shared kernels, and
the error paths."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hashemb as he
from reference import (bag_backward, bag_forward, lsh_combine, lsh_row_key, lsh_signature,
                       slots_signs)

SCHEMES = [he.LSHTable, he.LMA]


def pair_data(specs, fields=2):
    """Rows of a 2-field matrix where pair i = (token i of field 0, token i of
    field 1) occurs together in c rows, token i of field 0 alone (with a unique
    filler) in a rows and token i of field 1 alone in b rows: Jaccard c/(a+b+c)."""
    rows, filler = [], 10 ** 12
    for i, (a, b, c) in enumerate(specs):
        rows += [[i, i]] * c
        for _ in range(a):
            rows.append([i, filler])
            filler += 1
        for _ in range(b):
            rows.append([filler, i])
            filler += 1
    return np.array(rows, np.int64)


def collision_fraction(scheme, n):
    u = scheme.slots(np.arange(n), table=0)
    v = scheme.slots(np.arange(n), table=1)
    return (u == v).mean(axis=1)                      # per pair


# ------------------------------------------------------------ signatures, slots

@pytest.mark.parametrize("cls", SCHEMES)
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), T=st.integers(1, 4), vocab=st.integers(1, 12),
       nh=st.integers(1, 3), dim=st.sampled_from([1, 2, 3, 4, 6, 8]),
       seed=st.integers(0, 2 ** 32), data=st.data())
def test_fit_matches_set_minhash(cls, rows, T, vocab, nh, dim, seed, data):
    X = np.array(data.draw(st.lists(st.lists(st.integers(-vocab, vocab), min_size=T,
                                             max_size=T), min_size=rows, max_size=rows)))
    block = data.draw(st.sampled_from([z for z in range(1, dim + 1) if dim % z == 0]))
    s = cls.fit(X, size=997, dim=dim, num_hashes=nh, num_points=rows, seed=seed, block=block)
    sets = {}
    for r in range(rows):
        for t in range(T):
            sets.setdefault((t, int(X[r, t]) % 2 ** 64), set()).add(r)
    assert s.num_sampled == len(sets) and s.clashes == 0
    ids = {key: int(s.lookup_ids(np.array([key[1]], np.uint64), table=key[0])[0])
           for key in sets}
    assert sorted(ids.values()) == list(range(len(sets)))     # a bijection onto data rows
    unseen = [x for x in range(-vocab - 5, vocab + 5) if (0, x % 2 ** 64) not in sets]
    assert (s.lookup_ids(np.array(unseen, np.int64), table=0) == -1).all()
    salt = int(s._lsh["salt"])
    for (f, tok), n in ids.items():
        sig = lsh_signature(s, [lsh_row_key(salt, r) for r in sets[(f, tok)]])
        if cls is he.LMA:
            assert s.data[n].tolist() == sig
        else:
            assert s.data[n].tolist() == [lsh_combine(s, sig, k) for k in range(dim // block)]


@pytest.mark.parametrize("cls", SCHEMES)
@pytest.mark.parametrize("block,size", [(1, 5000), (3, 5000), (6, 5000), (6, 7), (2, 3)])
def test_slots_match_reference_sampled_and_absent(cls, block, size):
    """Runs of Z elements start at the combined signature, wrap circularly."""
    X = np.random.default_rng(0).integers(0, 30, (200, 3))
    s = cls.fit(X, size=size, dim=6, num_hashes=2, num_points=150, seed=4, block=block)
    tokens = np.array([0, 5, 29, 30, 31, -7, 2 ** 62])       # last four never seen
    for table in range(3):
        S, G = slots_signs(s, tokens, [table] * len(tokens))
        assert (s.slots(tokens, table=table) == S).all()
        assert (G == 1).all() and (s.signs(tokens, table=table) == 1).all()
    assert (s.slots(tokens) < s.size).all()


def test_sample_is_seeded_choice_of_rows():
    X = np.arange(100 * 2).reshape(100, 2)                    # every token unique
    s = he.LMA.fit(X, size=100, dim=4, num_points=10, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(100, 10, replace=False))
    found = np.stack([s.lookup_ids(X[:, t], table=t) for t in range(2)], 1) >= 0
    assert (found.all(axis=1) == np.isin(np.arange(100), rows)).all()
    assert not found.any(axis=1)[~np.isin(np.arange(100), rows)].any()
    assert s.num_points == 10


@pytest.mark.parametrize("cls", SCHEMES)
def test_default_sample_is_every_row_of_a_small_x(cls):
    """num_points defaults to 125,000 rows, or every row of a smaller X
    (MovieLens-100k has 100,000): the same scheme as asking for them all."""
    X = np.random.default_rng(0).integers(0, 30, size=(40, 3))
    a, b = cls.fit(X, size=500, dim=8, seed=1), cls.fit(X, size=500, dim=8, num_points=40, seed=1)
    assert a.num_points == 40
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("cls", SCHEMES)
def test_identical_sets_share_every_element(cls):
    X = pair_data([(0, 0, 5), (0, 0, 1), (0, 0, 17)])
    for seed in range(5):
        s = cls.fit(X, size=10 ** 6, dim=32, num_points=len(X), seed=seed)
        assert (collision_fraction(s, 3) == 1).all()


@pytest.mark.parametrize("cls", SCHEMES)
def test_slots_ignore_the_field(cls):
    """A token's slots depend on its occurrence set only: the same raw token in
    two fields with different sets differs, different tokens with one set agree."""
    X = np.array([[1, 2], [1, 2], [3, 1]])
    s = cls.fit(X, size=10 ** 6, dim=16, num_points=3)
    assert (s.slots([1], table=0) == s.slots([2], table=1)).all()
    assert (s.slots([1], table=0) != s.slots([1], table=1)).mean() > 0.5


@pytest.mark.parametrize("cls", SCHEMES)
def test_deterministic_by_seed(cls):
    X = np.random.default_rng(1).integers(0, 50, (300, 4))
    a = cls.fit(X, size=1000, dim=8, num_points=200, seed=7)
    b = cls.fit(X, size=1000, dim=8, num_points=200, seed=7)
    c = cls.fit(X, size=1000, dim=8, num_points=200, seed=8)
    assert a == b and (a.data == b.data).all()
    assert a != c
    q = np.arange(-5, 60)
    assert (a.slots(q, table=2) == b.slots(q, table=2)).all()
    assert (a.slots(q, table=2) != c.slots(q, table=2)).any()


# ------------------------------------------------------------ collision theory

@pytest.mark.parametrize("cls", SCHEMES)
@settings(max_examples=12, deadline=None)
@given(a=st.integers(0, 12), b=st.integers(0, 12), c=st.integers(1, 12),
       nh=st.integers(1, 3), seed=st.integers(0, 2 ** 32))
def test_collision_rate_follows_jaccard(cls, a, b, c, nh, seed):
    """Element k of two tokens shares a slot with probability J^H (J Jaccard,
    H num_hashes; m = 2^31 so chance collisions are negligible). LSHTable's
    elements use independent minhashes: binomial. LMA's elements reuse K = 8
    signature values, so the per-pair fractions are tested by their own spread."""
    pairs, dim = 300, 16
    s = cls.fit(pair_data([(a, b, c)] * pairs), size=2 ** 31, dim=dim, num_hashes=nh,
                num_points=pairs * (a + b + c), seed=seed, block=1)
    p = (c / (a + b + c)) ** nh
    frac = collision_fraction(s, pairs)
    if cls is he.LSHTable:
        n = pairs * dim
        sd = np.sqrt(n * p * (1 - p)) + 0.5
        assert abs(frac.sum() * dim - n * p) <= 4.5 * sd
    else:
        sd = frac.std() / np.sqrt(pairs) + 1e-3
        assert abs(frac.mean() - p) <= 5 * sd


@pytest.mark.parametrize("cls", SCHEMES)
def test_blocks_collide_whole(cls):
    """With Z = 4 the four elements of a run share one start: they collide
    together, and runs follow J^H as elements do."""
    pairs, dim, Z = 400, 16, 4
    s = cls.fit(pair_data([(3, 3, 4)] * pairs), size=2 ** 31, dim=dim, block=Z,
                num_points=pairs * 10, seed=11)
    u, v = s.slots(np.arange(pairs), table=0), s.slots(np.arange(pairs), table=1)
    same = (u == v).reshape(pairs, dim // Z, Z)
    assert (same.all(axis=2) == same.any(axis=2)).all()
    assert ((u.reshape(pairs, -1, Z) - u.reshape(pairs, -1, Z)[..., :1]) % s.size
            == np.arange(Z)).all()
    frac, p = same[..., 0].mean(axis=1), 0.4 ** 2
    assert abs(frac.mean() - p) <= 5 * (frac.std() / np.sqrt(pairs) + 1e-3)


@pytest.mark.parametrize("cls", SCHEMES)
def test_disjoint_sets_collide_at_random_rate(cls):
    """No common row: minhashes differ, slots collide at about 1/m."""
    m, pairs, dim = 64, 2000, 16
    s = cls.fit(pair_data([(2, 3, 0)] * pairs), size=m, dim=dim, num_points=pairs * 5,
                block=1)
    hits = collision_fraction(s, pairs).sum() * dim
    n, p = pairs * dim, 1 / m
    assert abs(hits - n * p) <= 4.5 * np.sqrt(n * p * (1 - p))


def test_absent_tokens_fill_the_array_uniformly():
    s = he.LMA.fit(np.zeros((4, 2), np.int64), size=50, dim=4, num_points=4, block=1)
    S = s.slots(np.arange(1, 20001), table=0).ravel()
    counts = np.bincount(S, minlength=50)
    n, p = S.size, 1 / 50
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 49 + 5 * np.sqrt(2 * 49)


# ------------------------------------------------------------ bags and training

@pytest.mark.parametrize("cls", SCHEMES)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("block", [1, 5])
def test_bags_forward_backward_against_reference(cls, mode, block):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 20, (100, 3))
    s = cls.fit(X, size=301, dim=5, num_points=80, seed=1, block=block)
    T, B = 3, 6
    lengths = rng.integers(0, 4, T * B)
    off = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    idx = rng.integers(0, 25, off[-1])                      # some never sampled
    psw = rng.random(off[-1]).astype(np.float32) if mode == "sum" else None
    M = s.init_weight(seed=3)
    out = he.embedding_bags(idx, M, off, scheme=s, num_tables=T, mode=mode,
                            per_sample_weights=psw)
    np.testing.assert_allclose(out, bag_forward(s, idx, off, M, T, 0, mode, psw),
                               rtol=1e-5, atol=1e-6)
    G = rng.standard_normal(out.shape).astype(np.float32)
    grad = he.embedding_bags_backward(G, idx, off, scheme=s, num_tables=T, mode=mode,
                                      per_sample_weights=psw, weight=M)
    want = bag_backward(s, idx, off, G.astype(np.float64), T, M, 0, mode, psw)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)
    W = M.copy()
    he.embedding_bags_backward(G, idx, off, scheme=s, num_tables=T, mode=mode,
                               per_sample_weights=psw, weight=W, optimizer=he.SGD(0.5))
    np.testing.assert_allclose(W, M - 0.5 * want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ persistence

@pytest.mark.parametrize("cls", SCHEMES)
def test_save_load_and_config_roundtrip(cls, tmp_path):
    X = np.random.default_rng(5).integers(0, 40, (120, 2)).astype(np.uint64) * np.uint64(2 ** 40)
    s = cls.fit(X, size=777, dim=7, num_hashes=3, num_points=100, seed=9)
    path = tmp_path / "table.npz"
    s.save(path)
    for loaded in (cls.load(path), he.Scheme.from_config(s.config())):
        assert loaded == s and type(loaded) is cls
        q = np.r_[X[:, 0].view(np.int64), -1, 3]
        assert (loaded.slots(q, table=0) == s.slots(q, table=0)).all()
    other = he.LMA if cls is he.LSHTable else he.LSHTable
    with pytest.raises(ValueError, match="path"):
        other.load(path)


def test_memory_is_the_sampled_tokens_only():
    X = np.random.default_rng(0).integers(0, 1000, (50, 2))
    t = he.LSHTable.fit(X, size=100, dim=16, num_points=50, block=1)
    lma = he.LMA.fit(X, size=100, dim=16, num_points=50, signature_size=4)
    assert t.data.shape == (t.num_sampled, 16) and lma.data.shape == (lma.num_sampled, 4)
    assert he.LSHTable.fit(X, size=100, dim=16, num_points=50).data.shape == (t.num_sampled, 1)
    assert he.LMA.fit(X, size=100, dim=16, num_points=50).data.shape == (t.num_sampled, 2)
    assert he.LMA.fit(X, size=100, dim=16, num_points=50, block=1).data.shape[1] == 8
    assert lma.extra_bytes() < t.extra_bytes()
    assert t.keys.nbytes <= 4 * 8 * t.num_sampled                 # 8-byte entries, load >= 1/4


# ------------------------------------------------------------ errors

@pytest.mark.parametrize("cls", SCHEMES)
def test_errors(cls):
    X = np.arange(20).reshape(10, 2)
    with pytest.raises(ValueError, match="X"):
        cls.fit(np.zeros((0, 3), np.int64), size=10, dim=4)
    with pytest.raises(ValueError, match="X"):
        cls.fit(np.arange(5), size=10, dim=4, num_points=5)
    with pytest.raises(TypeError, match="X"):
        cls.fit(X.astype(np.float32), size=10, dim=4, num_points=5)
    with pytest.raises(ValueError, match="num_points"):
        cls.fit(X, size=10, dim=4, num_points=11)
    with pytest.raises(ValueError, match="num_points"):
        cls.fit(X, size=10, dim=4, num_points=0)
    with pytest.raises(ValueError, match="size"):
        cls.fit(X, size=2 ** 32 + 1, dim=4, num_points=5)
    with pytest.raises(ValueError, match="dim"):
        cls.fit(X, size=10, dim=0, num_points=5)
    with pytest.raises(ValueError, match="num_hashes"):
        cls.fit(X, size=10, dim=4, num_hashes=0, num_points=5)
    with pytest.raises(ValueError, match="block"):
        cls.fit(X, size=10, dim=4, num_points=5, block=3)
    with pytest.raises(ValueError, match="block"):
        cls.fit(X, size=3, dim=4, num_points=5, block=4)
    s = cls.fit(X, size=10, dim=4, num_points=5)
    with pytest.raises(ValueError, match="table"):
        s.slots([1], table=2)
    with pytest.raises(ValueError, match="num_tables"):
        he.embedding_bags(np.zeros(3, np.int64), s.init_weight(), np.arange(4),
                          scheme=s, num_tables=3)
    with pytest.raises(ValueError, match="weight"):
        he.embedding_bag(np.zeros(2, np.int64), np.zeros(5, np.float32), np.array([0]),
                         scheme=s)


def test_from_tokens_and_parts_errors():
    X = np.arange(20).reshape(10, 2)
    s = he.LMA.fit(X, size=10, dim=4, num_points=5, signature_size=8)
    fields, tokens = np.tile([0, 1], 5), X[np.sort(np.random.default_rng(0).choice(
        10, 5, replace=False))].ravel()
    rebuilt = he.LMA.from_tokens(10, 4, 2, fields, tokens, s.data, signature_size=8)
    assert rebuilt == s
    with pytest.raises(ValueError, match="num_hashes"):
        he.LMA.fit(X, size=10, dim=4, num_hashes=9, num_points=5, signature_size=8)
    with pytest.raises(ValueError, match="data"):
        he.LMA(10, 4, 2, s.keys, s.data[:, :3], signature_size=8)
    with pytest.raises(ValueError, match="keys"):
        he.LMA(10, 4, 2, s.keys[:-1], s.data, signature_size=8)
    with pytest.raises(ValueError, match="keys"):
        he.LMA(10, 4, 2, s.keys, s.data[:2], signature_size=8)
    with pytest.raises(ValueError, match="tokens"):
        he.LMA.from_tokens(10, 4, 2, np.r_[fields, 0], np.r_[tokens, tokens[0]],
                           np.r_[s.data, s.data[:1]], signature_size=8)
    with pytest.raises(ValueError, match="fields"):
        he.LMA.from_tokens(10, 4, 1, fields, tokens, s.data, signature_size=8)
    with pytest.raises(ValueError, match="signature_size"):
        he.LSHTable(10, 4, 2, s.keys, s.data, signature_size=4)
    # checked before the casts (field 2**32 was field 0, 0.5 was 0, and an
    # int64 slot 2**32 + 7 passed "slots < size" as 7)
    with pytest.raises(ValueError, match=r"fields: expected integers in \[0, 2\)"):
        he.LMA.from_tokens(10, 4, 2, np.r_[fields[:-1], 1 << 32], tokens, s.data,
                           signature_size=8)
    with pytest.raises(TypeError, match="fields: expected integers.*float64"):
        he.LMA.from_tokens(10, 4, 2, fields + 0.5, tokens, s.data, signature_size=8)
    t = he.LSHTable.fit(X, size=10, dim=4, num_points=5)
    with pytest.raises(ValueError, match=r"data: expected values in \[0, 2\*\*32\)"):
        he.LSHTable(10, 4, 2, t.keys, t.data.astype(np.int64) + (1 << 32), block=t.block)
    with pytest.raises(ValueError, match=r"data: expected values in \[0, 2\*\*32\)"):
        he.LMA(10, 4, 2, s.keys, s.data.astype(np.int64) - (1 << 40), signature_size=8)
    with pytest.raises(TypeError, match="data: expected an integer array"):
        he.LMA(10, 4, 2, s.keys, s.data.astype(np.float64), signature_size=8)
    assert he.LSHTable(10, 4, 2, t.keys, t.data.astype(np.int64), block=t.block) == t
    # named, not an IndexError or a Cython buffer error
    with pytest.raises(ValueError, match="keys: expected a map"):
        he.LMA(10, 4, 2, np.int64(5), s.data, signature_size=8)
    with pytest.raises(ValueError, match="tokens: expected a 1-D array"):
        he.LMA.from_tokens(10, 4, 2, 0, 5, s.data[:1], signature_size=8)
    with pytest.raises(ValueError, match="tokens: expected a 1-D array"):
        he.LMA.from_tokens(10, 4, 2, [[0], [1]], [[1], [2]], s.data[:2], signature_size=8)
    with pytest.raises(TypeError, match="num_fields"):
        he.LMA.from_tokens(10, 4, "2", fields, tokens, s.data, signature_size=8)
    with pytest.raises(ValueError, match=r"data: expected one row per token \(10\)"):
        he.LMA.from_tokens(10, 4, 2, fields, tokens, s.data[:4], signature_size=8)


@pytest.mark.parametrize("H", [9, 12, 63])
def test_lma_default_signature_holds_num_hashes_values(H):
    # the default min(8, H R) refused H = 9..63 with one run, naming a
    # signature_size the caller never gave
    X = np.random.default_rng(H).integers(0, 30, (200, 3))
    s = he.LMA.fit(X, size=1000, dim=8, num_hashes=H, num_points=100)
    assert s.data.shape[1] == H and s.num_hashes == H
    s8 = he.LMA.fit(X, size=1000, dim=8, num_hashes=2, num_points=100, block=1)
    assert s8.data.shape[1] == 8                    # min(8, 2 * 8 runs), as before
    out = he.embedding_bags(X[:5], s.init_weight(seed=1), scheme=s, num_tables=3)
    assert out.shape == (5, 24) and np.isfinite(out).all()


def test_fit_without_tqdm_installed():
    # tqdm is imported only for a progress bar: a fit without one needs no tqdm
    import subprocess
    import sys
    code = ("import sys; sys.modules['tqdm'] = sys.modules['tqdm.auto'] = None\n"
            "import numpy as np, hashemb as he\n"
            "X = np.array([[0, 5], [0, 5], [1, 6], [1, 7]])\n"
            "for cls in (he.LSHTable, he.LMA):\n"
            "    print(cls.fit(X, size=1000, dim=8, num_points=4).num_sampled)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["5", "5"], out.stderr


def test_fit_on_a_missing_gpu_says_so_before_any_work():
    from hashemb._gpu._runtime import device_count
    if device_count():
        pytest.skip("this process has a GPU")
    with pytest.raises(RuntimeError, match="device: 'gpu' needs CuPy and a CUDA device"):
        he.LSHTable.fit(np.zeros((10, 2), np.int64), 10, 4, device="gpu")
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'gpu'"):
        he.LMA.fit(np.zeros((10, 2), np.int64), 10, 4, device="cuda")


def test_fingerprint_clashes_are_rare_and_counted():
    """2^17 sampled tokens in one map: fingerprints (31 bits) collide on a probe
    run with probability ~2^-30 each, so the count is 0 or tiny, and every
    token that is not merged finds its own row."""
    n = 1 << 17
    X = np.arange(n, dtype=np.int64).reshape(-1, 1)
    s = he.LSHTable.fit(X, size=1000, dim=4, num_points=n)
    assert s.clashes <= 2
    ids = s.lookup_ids(X[:, 0])
    assert (ids >= 0).all() and len(np.unique(ids)) >= n - s.clashes


# ------------------------------------------------------------ torch modules

def test_torch_collection_matches_kernels_and_trains():
    torch = pytest.importorskip("torch")
    from hashemb.torch import LSHEmbeddingBagCollection
    rng = np.random.default_rng(3)
    X = rng.integers(0, 60, (500, 3))
    emb = LSHEmbeddingBagCollection(torch.from_numpy(X), [60, 60, 60], 8, compression=4,
                                    lma=True, num_points=300, block=4, optimizer="sgd", lr=0.1)
    s = emb.scheme
    assert isinstance(s, he.LMA) and s.block == 4 and s.size == 60 * 3 * 8 // 4
    M = emb.weight.detach().numpy().copy()
    q = rng.integers(0, 70, (16, 3))                     # some tokens unseen
    out = emb(torch.from_numpy(q))
    flat = np.ascontiguousarray(q.T).reshape(-1)
    off = np.arange(flat.size + 1, dtype=np.int64)
    np.testing.assert_allclose(out.detach().numpy(),
                               he.embedding_bags(flat, M, off, scheme=s, num_tables=3),
                               rtol=1e-6)
    G = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(torch.from_numpy(G))
    want = M - 0.1 * bag_backward(s, flat, off, G.astype(np.float64), 3)
    np.testing.assert_allclose(emb.weight.detach().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lma", [False, True])
def test_torch_state_dict_roundtrip(lma, tmp_path):
    torch = pytest.importorskip("torch")
    from hashemb.torch import LSHEmbeddingBag, LSHEmbeddingBagCollection
    X = torch.randint(0, 50, (400, 2))
    a = LSHEmbeddingBagCollection(X, [50, 50], 8, compression=2, lma=lma, seed=1,
                                  optimizer="adagrad", lr=0.1)
    a(X[:32]).sum().backward()
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = LSHEmbeddingBagCollection(torch.randint(0, 50, (400, 2)), [50, 50], 8, compression=2,
                                  lma=lma, seed=7, optimizer="adagrad", lr=0.1)
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert b.scheme == a.scheme
    q = torch.randint(0, 60, (64, 2))
    assert torch.equal(a(q), b(q))
    single = LSHEmbeddingBag(a.scheme, 50, 8, table=1)        # a prebuilt scheme
    assert single.scheme is a.scheme and single.memory_bytes() > single.weight.numel() * 4
    # its width is the scheme's: another embedding_dim is an error (it was
    # kept as the attribute while the output stayed 8 wide)
    with pytest.raises(ValueError, match=r"embedding_dim: expected 8 \(the given"):
        LSHEmbeddingBag(a.scheme, 50, 4, table=1)
    with pytest.raises(ValueError, match="embedding_dim: expected 8"):
        LSHEmbeddingBagCollection(a.scheme, [50, 50], 16)


def test_torch_errors():
    torch = pytest.importorskip("torch")
    from hashemb.torch import LSHEmbeddingBagCollection
    X = torch.randint(0, 50, (100, 2))
    with pytest.raises(ValueError, match="num_embeddings"):
        LSHEmbeddingBagCollection(X, [50, 50, 50], 8, compression=2)
    with pytest.raises(TypeError, match="data"):
        LSHEmbeddingBagCollection(X.float(), [50, 50], 8, compression=2)
    with pytest.raises(ValueError, match="input"):
        LSHEmbeddingBagCollection(X, [50, 50], 8, compression=2)(X[:, :1])


def test_cli_writes_a_loadable_scheme(tmp_path, capsys):
    from hashemb.__main__ import main
    X = np.random.default_rng(0).integers(0, 30, (300, 4))
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "t.npz"
    assert main(["lsh-table", "--data", str(tmp_path / "x.npy"), "--dim", "8", "--num-hash",
                 "2", "--num-points", "200", "--lma", "--out", str(out)]) == 0
    s = he.LMA.load(out)
    assert s == he.LMA.fit(X, s.size, 8, num_hashes=2, num_points=200)
    assert "saved" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lsh-table", "--dim", "8"])                     # --data is required


def test_cli_builds_on_the_gpu_or_says_why_not(tmp_path, capsys, monkeypatch):
    from hashemb.__main__ import main
    from hashemb._gpu import _runtime as RT
    X = np.random.default_rng(0).integers(-9, 30, (300, 3))
    np.save(tmp_path / "x.npy", X)
    args = ["lsh-table", "--data", str(tmp_path / "x.npy"), "--dim", "8", "--num-points", "250",
            "--device", "gpu", "--out", str(tmp_path / "t.npz")]
    if RT.device_count() == 0:
        with pytest.raises(SystemExit):
            main(args)
        assert "argument --device: 'gpu' needs CuPy and a CUDA device" in capsys.readouterr().err
        # the emulator stands in for the device: the build the flag asks for
        import gpu_emu
        monkeypatch.setattr(RT, "_backend", gpu_emu.emu_backend())
        monkeypatch.setattr(RT, "device_count", lambda: 1)
    assert main(args) == 0
    s = he.LSHTable.load(tmp_path / "t.npz")
    assert s == he.LSHTable.fit(X, s.size, 8, num_points=250)
    with pytest.raises(SystemExit):
        main(args[:-2] + ["--device", "tpu"])


# ------------------------------------------------------------ GPU build

@pytest.fixture(scope="module", params=["emulator", "cupy"])
def gpu_backend(request):
    """The GPU build's kernels on the host emulator (tests/cuda/emu.cpp), or on
    a CUDA device through CuPy (skipped without one)."""
    if request.param == "emulator":
        import gpu_emu
        return gpu_emu.emu_backend()
    import gpu_emu
    from hashemb._gpu import _runtime as RT
    gpu_emu.cupy_or_skip()
    return RT.backend()


@pytest.mark.parametrize("cls", SCHEMES)
@pytest.mark.parametrize("block,nh", [(1, 2), (4, 3), (8, 1)])
@pytest.mark.parametrize("chunk", [256, 1, 3])
def test_gpu_build_equals_cpu_build(cls, block, nh, chunk, gpu_backend, monkeypatch):
    # chunk: keys per thread, past which a token's minimum is split over
    # threads and combined by atomic min (one token is in every row)
    from hashemb._gpu import lsh as gpu_lsh
    monkeypatch.setattr(gpu_lsh, "CHUNK", chunk)
    X = np.random.default_rng(4).integers(-50, 400, (600, 5))
    X[:, 2] = 7
    X[::3, 4] = 11
    cpu = cls.fit(X, size=9973, dim=8, num_hashes=nh, num_points=500, seed=3, block=block)
    gpu = cls.fit(X, size=9973, dim=8, num_hashes=nh, num_points=500, seed=3, block=block,
                  device="gpu", _backend=gpu_backend)
    assert gpu == cpu and (gpu.data == cpu.data).all()
    with pytest.raises(ValueError, match="device"):
        cls.fit(X, size=99, dim=8, num_points=5, device="tpu")


@pytest.fixture
def put(gpu_backend, monkeypatch):
    """A host array as the public functions' device input: on the emulator a
    gpu_emu.Stand with the GPU branch routed to it, else a CuPy array."""
    from hashemb._gpu import _runtime as RT
    if isinstance(gpu_backend, RT.CupyBackend):
        return gpu_backend.xp.asarray
    monkeypatch.setattr(RT, "_backend", gpu_backend)
    import gpu_emu
    return gpu_emu.stand


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a).view(np.ndarray)


@pytest.mark.parametrize("cls", SCHEMES)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # put is stateless
@given(rows=st.integers(1, 60), T=st.integers(1, 4), vocab=st.integers(1, 40),
       dtype=st.sampled_from([np.int32, np.int64, np.uint64]), frac=st.floats(0.1, 1.0),
       block=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**32))
def test_fit_on_device_data_equals_the_cpu_fit(cls, rows, T, vocab, dtype, frac, block, seed,
                                               put):
    # the tokens numbered on the device (sorts) as the CPU's map numbers them
    # (order of first occurrence): equal schemes, data included; small vocab
    # repeats tokens within and across fields, negative values test the
    # int32 sign extension and uint64 the top bit
    rng = np.random.default_rng(seed)
    X = rng.integers(-vocab, vocab, (rows, T)).astype(dtype)
    if dtype == np.uint64:
        X[rng.random((rows, T)) < 0.3] |= np.uint64(1 << 63)
    num_points = max(1, int(rows * frac))
    kw = dict(size=997, dim=4, num_hashes=2, num_points=num_points, seed=seed % 7, block=block)
    cpu = cls.fit(X, **kw)
    gpu = cls.fit(put(X), **kw)
    assert gpu == cpu and (gpu.data == cpu.data).all() and (gpu.keys == cpu.keys).all()
    assert gpu.num_points == cpu.num_points == num_points and gpu.clashes == cpu.clashes
    tok = put(X[: min(rows, 5), 0])
    assert (_host(gpu.lookup_ids(tok)) == cpu.lookup_ids(X[: min(rows, 5), 0])).all()


@pytest.mark.parametrize("cls", SCHEMES)
def test_lookup_ids_on_device_tokens(cls, put):
    X = np.random.default_rng(1).integers(0, 30, (200, 3))
    s = cls.fit(X, size=501, dim=8, num_points=150, seed=2, block=4)
    tok = np.array([[0, 5, 29, 30], [-1, 7, 2**40, 12]])
    for table in range(3):
        for dt in (np.int32, np.int64, np.uint64):
            if dt == np.int32 and (np.abs(tok) >= 2**31).any():
                continue
            t = tok.astype(dt)
            got = s.lookup_ids(put(t), table=table)
            assert got.shape == t.shape and _host(got).tolist() == \
                s.lookup_ids(t, table=table).tolist()
    assert (_host(s.lookup_ids(put(np.array([], np.int64)))) == []).all()
    with pytest.raises(TypeError, match="tokens: expected an int32, int64 or uint64"):
        s.lookup_ids(put(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="table"):
        s.lookup_ids(put(np.zeros(3, np.int64)), table=3)


@pytest.mark.parametrize("cls", SCHEMES)
def test_fit_on_device_data_refuses_bad_input_by_name(cls, put):
    X = put(np.arange(40).reshape(20, 2))
    with pytest.raises(TypeError, match="X: expected a numpy.ndarray for device='cpu'"):
        cls.fit(X, 100, 4, device="cpu")
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'gpu'"):
        cls.fit(X, 100, 4, device="cuda")
    with pytest.raises(TypeError, match="X: expected an int32, int64 or uint64"):
        cls.fit(put(np.zeros((4, 2), np.float32)), 100, 4)
    with pytest.raises(ValueError, match="X: expected a 2-D"):
        cls.fit(put(np.arange(4)), 100, 4)
    with pytest.raises(ValueError, match="X: expected at least one row"):
        cls.fit(put(np.zeros((0, 2), np.int64)), 100, 4)
    with pytest.raises(ValueError, match="num_points: expected <= 20"):
        cls.fit(X, 100, 4, num_points=21)
    # device="gpu" with device data: the same build, no copy
    assert cls.fit(X, 100, 4, device="gpu") == cls.fit(_host(X), 100, 4)


# -- from a mutation round: each kills a mutant the suite let through

def test_minhash_coefficients_are_pinned():
    # values of the current release: saved tables depend on the seed's streams
    X = np.array([[0, 5], [0, 5], [1, 6]])
    s = he.LSHTable.fit(X, size=1000, dim=4, num_hashes=2, num_points=3, seed=0, block=1)
    assert s.slots([0, 123456789], table=0).tolist() == [[6, 21, 315, 576], [146, 34, 408, 482]]
    lma = he.LMA.fit(X, size=1000, dim=4, num_hashes=2, num_points=3, seed=0, block=1)
    assert lma.slots([0, 123456789], table=0).tolist() == [[912, 276, 5, 50], [480, 97, 249, 352]]


def test_lsh_table_from_parts_refuses_starts_past_size():
    t = he.LSHTable.fit(np.arange(20).reshape(10, 2), size=10, dim=4, num_points=5)
    with pytest.raises(ValueError, match="data: expected slots < size = 10"):
        he.LSHTable(10, 4, 2, t.keys, t.data.astype(np.int64) + 25, block=t.block)


def test_lsh_collection_uses_its_seed():
    torch = pytest.importorskip("torch")
    from hashemb.torch import LSHEmbeddingBagCollection
    X = torch.randint(0, 50, (400, 2))
    for lma in (False, True):
        assert LSHEmbeddingBagCollection(X, [50, 50], 8, compression=2, lma=lma,
                                         seed=5).scheme.seed == 5


def test_schemes_keep_private_read_only_copies_of_keys_and_data():
    """The kernels index with keys and data unchecked: a caller's later write
    to the arrays it passed (or to config()'s) went out of bounds (a segfault
    in the bag kernel after data[:] = 2**30)."""
    X = np.arange(40).reshape(20, 2)
    t = he.LSHTable.fit(X, size=64, dim=8, num_points=10, num_hashes=1)
    keys, data = t.keys.copy(), t.data.copy()
    s = he.LSHTable(64, 8, 2, keys, data, num_hashes=1, block=t.block)
    M = s.init_weight()
    x = np.array([[0, 1], [2, 3]])
    want = he.embedding_bag(x, M, scheme=s)
    data[:] = 1 << 30
    keys[:] = 0
    np.testing.assert_array_equal(he.embedding_bag(x, M, scheme=s), want)
    assert s == t and (s.slots(x) < 64).all()
    import copy
    import pickle
    lma = he.LMA.fit(X, size=64, dim=8, num_points=10)
    # (a copy brought its arrays back writeable, and its kernels' view of
    # data as a copy of its own)
    for scheme in (s, lma, copy.deepcopy(s), pickle.loads(pickle.dumps(lma))):
        for a in (scheme.keys, scheme.data, scheme.config()["keys"], scheme.config()["data"]):
            with pytest.raises(ValueError, match="read-only"):
                a[...] = 0
        assert np.shares_memory(scheme._lsh["data"], scheme.data)
    np.testing.assert_array_equal(he.embedding_bag(x, M, scheme=copy.deepcopy(s)), want)


def test_torch_extra_state_holds_copies_of_the_scheme_arrays():
    torch = pytest.importorskip("torch")
    from hashemb.torch import HashEmbeddingBag
    X = np.arange(40).reshape(20, 2)
    emb = HashEmbeddingBag(he.LSHTable.fit(X, size=64, dim=8, num_points=10))
    x = torch.tensor([[0, 1]])
    want = emb(x)
    sd = emb.state_dict()
    sd["_extra_state"]["scheme"]["data"].fill_(1 << 30)
    torch.testing.assert_close(emb(x), want, rtol=0, atol=0)


def test_lsh_collection_fits_a_cuda_tensor_on_its_device():
    import gpu_emu
    torch = gpu_emu.torch_cuda()
    from hashemb.torch import LSHEmbeddingBagCollection
    X = torch.randint(-5, 60, (500, 3))
    for lma in (False, True):
        cpu = LSHEmbeddingBagCollection(X, [60] * 3, 8, compression=4, lma=lma, seed=2,
                                        num_points=400)
        gpu = LSHEmbeddingBagCollection(X.cuda(), [60] * 3, 8, compression=4, lma=lma, seed=2,
                                        num_points=400)
        assert gpu.scheme == cpu.scheme
    with pytest.raises(TypeError, match="data: expected an int32, int64 or uint64 tensor"):
        LSHEmbeddingBagCollection(X.cuda().float(), [60] * 3, 8)
