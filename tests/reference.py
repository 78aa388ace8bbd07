"""Plain reference implementations: every formula of ALGORITHMS.md in the
simplest Python (exact integers) and NumPy, independent of the C header."""
import numpy as np

P = (1 << 61) - 1
U64 = 1 << 64


def u64(x):
    return int(x) % U64


def uhash(coef, e, u, c, m):
    A, B, C, D0 = (int(v) for v in coef[:4])
    return ((A * (u64(e) % P) + B * (u64(u) % P) + C * (u64(c) % P) + D0) % P) % m


def usign(coef, e, u, c):
    A, B, C, D0, Q1, Q2, Q3, Q0 = (int(v) for v in coef[4:12])
    k = (A * (u64(e) % P) + B * (u64(u) % P) + C * (u64(c) % P) + D0) % P
    return 1 - 2 * ((Q0 + Q1 * k + Q2 * k * k + Q3 * k ** 3) % P % 2)


M64 = U64 - 1
GOLD = 0x9E3779B97F4A7C15


def mix64(x):
    """SplitMix64's finaliser, exact integers."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def lsh_row_key(salt, r):
    return mix64(u64(r) ^ salt) % P


def lsh_absent_key(salt, field, x):
    return mix64((mix64(u64(x) ^ (~salt & M64)) + field * GOLD) & M64) % P


def lsh_minhash(scheme, f, keys):
    """min over keys of h_f(key) = (a_f key + b_f) mod P, kept to 32 bits."""
    a, b = int(scheme._lsh["mh"][2 * f]), int(scheme._lsh["mh"][2 * f + 1])
    return min((a * k + b) % P for k in keys) & 0xFFFFFFFF


def lsh_combine(scheme, sig, k):
    """Start of run k: floor(m * ((c_k + sum_h A_h sig[pick[k, h]]) mod 2^64) / 2^64)."""
    lsh, nh = scheme._lsh, scheme.num_hashes
    pick = lsh["pick"].reshape(scheme.dim // scheme.block, nh)
    v = int(lsh["mix"][nh + k])
    for h in range(nh):
        v += int(lsh["mix"][h]) * int(sig[int(pick[k, h])])
    return ((v & M64) * scheme.size) >> 64


def lsh_signature(scheme, keys):
    """Signature values of a row-key set, one per minhash function."""
    F = scheme.num_hashes * scheme.dim // scheme.block if type(scheme).__name__ == "LSHTable" \
        else scheme._lsh["width"]
    return [lsh_minhash(scheme, f, keys) for f in range(F)]


def lsh_slot(scheme, e, x, i):
    """SCMA / LMA slot: a sampled token's stored data, or a random singleton."""
    n = int(scheme.lookup_ids([x], table=e)[0])      # the map is tested on its own
    n = None if n < 0 else n
    k, Z = divmod(i, scheme.block)
    if n is None:
        sig = lsh_signature(scheme, [lsh_absent_key(int(scheme._lsh["salt"]), int(e), x)])
        start = lsh_combine(scheme, sig, k)
    elif type(scheme).__name__ == "LSHTable":
        start = int(scheme.data[n, k])
    else:
        start = lsh_combine(scheme, scheme.data[n], k)
    return (start + Z) % scheme.size


def slot(scheme, e, x, i):
    """slot(e, x, i) per scheme kind, straight from the formulas."""
    name = type(scheme).__name__
    if name in ("LSHTable", "LMA"):
        return lsh_slot(scheme, e, x, i)
    m, D = scheme.size, scheme.dim
    if name == "FullTable":
        return (sum(scheme.table_sizes[:e]) + x) * D + i
    if name == "_RobeReference":
        Z = scheme.block
        R = np.random.RandomState(scheme.seed).randint(0, 2038074743, size=50)
        xg = x + (sum(scheme.table_sizes[:e]) if scheme.table_sizes else 0)
        key = (int(R[2]) * xg + int(R[1]) * (i // Z) + int(R[0])) % 2038074743
        return key % (m - Z + 1) + i % Z
    if name == "_HashedNetReference":
        v = (u64(x) * 9824516537 + i * 57857966300227 + 104729) % U64
        return (v % 117130198221199) % m
    # RobeZ / HashedNet
    Z, coef = scheme.block, scheme.hash.coef
    mod = m if scheme.wrap else m - Z + 1
    if Z <= D:
        return (uhash(coef, e, x, i // Z, mod) + i % Z) % m
    r = Z // D
    return (uhash(coef, e, u64(x) // r, 0, mod) + (u64(x) % r) * D + i) % m


def sign(scheme, e, x, i):
    if not getattr(scheme, "signed", False):
        return 1.0
    return float(usign(scheme.hash.coef, e, x, i))


def slots_signs(scheme, tokens, tables):
    n, D = len(tokens), scheme.dim
    S = np.empty((n, D), np.int64)
    G = np.empty((n, D))
    for r, (x, e) in enumerate(zip(tokens, tables)):
        for i in range(D):
            S[r, i] = slot(scheme, int(e), int(x), i)
            G[r, i] = sign(scheme, int(e), int(x), i)
    return S, G


def bag_forward(scheme, idx, off, M, T, table0=0, mode="sum", psw=None, pad=None):
    """out (B, T*D); off has T*B+1 entries (feature-major)."""
    D = scheme.dim
    B = (len(off) - 1) // T
    M = np.asarray(M, np.float64).reshape(-1)
    out = np.zeros((B, T * D))
    for t in range(T):
        for b in range(B):
            q = t * B + b
            rows = []
            for j in range(off[q], off[q + 1]):
                x = int(idx[j])
                if pad is not None and x == pad:
                    continue
                S, G = slots_signs(scheme, [x], [table0 + t])
                w = 1.0 if psw is None else float(psw[j])
                rows.append(w * G[0] * M[S[0]])
            if rows:
                R = np.array(rows)
                out[b, t * D:(t + 1) * D] = {"sum": R.sum(0), "mean": R.mean(0),
                                             "max": R.max(0)}[mode]
    return out


def bag_backward(scheme, idx, off, G_out, T, M=None, table0=0, mode="sum", psw=None, pad=None):
    """dL/dM (size m) by np.add.at over every (entry, element)."""
    D = scheme.dim
    B = (len(off) - 1) // T
    grad = np.zeros(scheme.size)
    Mf = None if M is None else np.asarray(M, np.float64).reshape(-1)
    for t in range(T):
        for b in range(B):
            q = t * B + b
            js = [j for j in range(off[q], off[q + 1])
                  if pad is None or int(idx[j]) != pad]
            if not js:
                continue
            g = G_out[b, t * D:(t + 1) * D]
            S, Sg = slots_signs(scheme, [int(idx[j]) for j in js], [table0 + t] * len(js))
            if mode == "max":
                vals = Sg * Mf[S]
                win = vals.argmax(0)          # first maximum wins
                for i in range(D):
                    grad[S[win[i], i]] += Sg[win[i], i] * g[i]
                continue
            for r, j in enumerate(js):
                c = 1.0 if psw is None else float(psw[j])
                if mode == "mean":
                    c /= len(js)
                np.add.at(grad, S[r], c * Sg[r] * g)
    return grad
