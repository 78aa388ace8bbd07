# cython: language_level=3
"""The scheme struct bridge, slot/sign evaluation and the vectorised universal hash."""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from ..hashing import sign_terms

_EMPTY_U64 = np.zeros(2, np.uint64)
_EMPTY_U32 = np.zeros(1, np.uint32)
_EMPTY_I32 = np.zeros(1, np.int32)


cdef class SchemeView:
    def __cinit__(self, scheme):
        cdef const uint64_t[::1] coef = scheme._coef
        cdef const uint64_t[::1] run_coef = scheme._run_coef
        # a signed scheme's per-element terms of its expanded sign cubic
        # follow c_i (he_signs reads sign_coef[D .. 4D))
        terms = sign_terms(scheme._sign_coef, scheme._coef) if scheme._signed \
            else scheme._sign_coef
        cdef const uint64_t[::1] sign_coef = terms
        cdef const int64_t[::1] table_base = scheme._table_base
        cdef int i
        self._keep = (scheme._coef, scheme._run_coef, terms, scheme._table_base)
        self.s.kind = scheme._kind
        self.s.is_signed = scheme._signed
        self.s.dim = scheme.dim
        self.s.run = scheme._run
        self.s.runs = scheme.dim // scheme._run
        self.s.size = scheme.size
        self.s.mod = scheme._mod
        self.s.mod_inv = reciprocal(self.s.mod)
        self.s.p_mod = HE_P % self.s.mod if self.s.mod else 0
        self.s.rows = scheme._rows
        self.s.rows_inv = reciprocal(self.s.rows)
        self.s.ref_p = scheme._ref_p
        self.s.ref_p_inv = reciprocal(self.s.ref_p)
        for i in range(HE_NCOEF):
            self.s.coef[i] = coef[i]
        self.s.run_coef = &run_coef[0]
        self.s.sign_coef = &sign_coef[0]
        self.s.table_base = &table_base[0]
        self.s.num_tables = table_base.shape[0] if scheme._sized else 0
        lsh = scheme._lsh or {}
        cdef const uint64_t[::1] keys = lsh.get("keys", _EMPTY_U64)
        cdef const uint32_t[::1] data = lsh.get("data", _EMPTY_U32)
        cdef const int32_t[::1] pick = lsh.get("pick", _EMPTY_I32)
        cdef const uint64_t[::1] mh = lsh.get("mh", _EMPTY_U64)
        cdef const uint64_t[::1] mix = lsh.get("mix", _EMPTY_U64)
        self.s.lsh_keys = &keys[0]
        self.s.lsh_mask = keys.shape[0] - 1
        self.s.lsh_salt = lsh.get("salt", 0)
        self.s.lsh_data = &data[0]
        self.s.lsh_width = lsh.get("width", 0)
        self.s.lsh_nh = lsh.get("num_hashes", 0)
        self.s.lsh_pick = &pick[0]
        self.s.lsh_mh = &mh[0]
        self.s.lsh_mix = &mix[0]
        self._keep = self._keep + (keys, data, pick, mh, mix)
        # (struct field, array) of every pointer, for a device copy of the struct
        self._pointers = [
            ("run_coef", scheme._run_coef), ("sign_coef", terms),
            ("table_base", scheme._table_base), ("lsh_keys", np.asarray(keys)),
            ("lsh_data", np.asarray(data)), ("lsh_pick", np.asarray(pick)),
            ("lsh_mh", np.asarray(mh)), ("lsh_mix", np.asarray(mix))]

    def struct_bytes(self):
        """The he_scheme struct as bytes (host pointers included)."""
        return (<char*>&self.s)[:sizeof(he_scheme)]

    def pointer_fields(self):
        """[(byte offset, array)] of every pointer field of the struct: a device
        copy of the struct is :meth:`struct_bytes` with these patched to device
        copies of the arrays."""
        cdef size_t base = <size_t>&self.s
        offs = {"run_coef": <size_t>&self.s.run_coef - base,
                "sign_coef": <size_t>&self.s.sign_coef - base,
                "table_base": <size_t>&self.s.table_base - base,
                "lsh_keys": <size_t>&self.s.lsh_keys - base,
                "lsh_data": <size_t>&self.s.lsh_data - base,
                "lsh_pick": <size_t>&self.s.lsh_pick - base,
                "lsh_mh": <size_t>&self.s.lsh_mh - base,
                "lsh_mix": <size_t>&self.s.lsh_mix - base}
        return [(offs[name], arr) for name, arr in self._pointers]


ctypedef fused index_t:
    int32_t
    int64_t

ctypedef fused key_t:
    int32_t
    int64_t
    uint64_t


cdef void _row_slots(const he_scheme* s, uint64_t* o) noexcept nogil:
    """A row's run starts, in its last R places of o, spread to its D slots
    from the first run on: run k fills [kL, kL + L), which ends before run
    k + 1's start at D - R + k + 1 (D = R L). A run's first slot is its
    start as the kernels computed it, unwrapped: a start past the array
    shows."""
    cdef int64_t k, i, L = s.run, R = s.runs, D = s.dim
    cdef uint64_t st
    for k in range(R):
        st = o[D - R + k]
        o[k * L] = st
        for i in range(1, L):
            o[k * L + i] = he_run_slot(s, st, i)


DEF SLOT_ROWS = 64  # tokens a work item of slots()


cdef void _rows_slots(const he_scheme* s, const index_t* x, const int64_t* tables,
                      int64_t n, uint64_t* out) noexcept nogil:
    """slots() of n tokens: the run starts of a table's tokens four at a time
    through he_rows_starts (the bag kernels' hashing), spread by _row_slots."""
    cdef he_rows_k k
    cdef uint64_t buf[4 * HE_RUNS_VEC]
    cdef int64_t a = 0, z, j, c, i, R = s.runs, D = s.dim
    cdef bint batch = R <= HE_RUNS_VEC
    while a < n:
        z = a + 1
        while z < n and tables[z] == tables[a]:
            z += 1
        he_rows_of(&k, s, tables[a], he_table_term(s, tables[a]))
        j = a
        while j < z:
            c = min(4, z - j) if batch else 1
            he_rows_starts(&k, x + j, sizeof(index_t) == 8, c,
                           &buf[0] if batch else out + j * D + D - R)
            if batch:
                for i in range(c):
                    memcpy(out + (j + i) * D + D - R, buf + i * R, R * sizeof(uint64_t))
            for i in range(c):
                _row_slots(s, out + (j + i) * D)
            j += c
        a = z


def slots(SchemeView sv, const index_t[::1] tokens, const int64_t[::1] tables,
          int64_t[:, ::1] out):
    """out[n, i] = slot(tables[n], tokens[n], i) for every element i < D."""
    cdef const he_scheme* s = &sv.s
    cdef int64_t c, N = tokens.shape[0]
    for c in prange((N + SLOT_ROWS - 1) // SLOT_ROWS, nogil=True, schedule='static'):
        _rows_slots(s, &tokens[c * SLOT_ROWS], &tables[c * SLOT_ROWS],
                    min(SLOT_ROWS, N - c * SLOT_ROWS), <uint64_t*>&out[c * SLOT_ROWS, 0])


cdef void _rows_signs(const he_scheme* s, const index_t* x, const int64_t* tables, int64_t n,
                      float* out) noexcept nogil:
    """signs() of n <= HE_SIGN_ROWS tokens, whatever their tables: their sign
    bases (not their rows' slots), then their signs at once (he_signs_of,
    the bag kernels' signs)."""
    cdef uint64_t sb[HE_SIGN_ROWS]
    cdef int64_t g
    for g in range(n):
        sb[g] = he_sign_base(s, he_table_term(s, tables[g]), x[g])
    he_signs_of(s, sb, n, out)


def signs(SchemeView sv, const index_t[::1] tokens, const int64_t[::1] tables,
          float[:, ::1] out):
    """out[n, i] = g(tables[n], tokens[n], i), +-1 (all 1 for unsigned schemes)."""
    cdef const he_scheme* s = &sv.s
    cdef int64_t c, N = tokens.shape[0]
    for c in prange((N + HE_SIGN_ROWS - 1) // HE_SIGN_ROWS, nogil=True, schedule='static'):
        _rows_signs(s, &tokens[c * HE_SIGN_ROWS], &tables[c * HE_SIGN_ROWS],
                    min(HE_SIGN_ROWS, N - c * HE_SIGN_ROWS), &out[c * HE_SIGN_ROWS, 0])


def universal_hash(const uint64_t[::1] coef, const key_t[::1] keys, uint64_t table,
                   uint64_t block, uint64_t m, int64_t[::1] out):
    """out[n] = ((A*table + B*keys[n] + C*block + D0) mod P) mod m."""
    cdef int64_t n
    cdef uint64_t inv = reciprocal(m)
    for n in prange(keys.shape[0], nogil=True, schedule='static'):
        out[n] = <int64_t>he_hash(&coef[0], table, <uint64_t>keys[n], block, m, inv)


def universal_sign(const uint64_t[::1] coef, const key_t[::1] keys, uint64_t table,
                   uint64_t element, float[::1] out):
    """out[n] = g(table, keys[n], element) from the sign coefficients
    coef = [A', B', C', D0', Q1, Q2, Q3, Q0] (see he_sign_of_key)."""
    cdef int64_t n
    cdef uint64_t k
    for n in prange(keys.shape[0], nogil=True, schedule='static'):
        k = he_addmod(he_hash_base(&coef[0], table, <uint64_t>keys[n]),
                      he_mulmod(coef[2], he_fold(element)))
        out[n] = he_sign_of_key(&coef[4], k)


def has_openmp():
    return bool(he_has_openmp())


def max_threads():
    return he_max_threads()


def set_max_threads(int n):
    he_set_max_threads(n)


# ------------------------------------------------------------ SCMA / LMA build

def lsh_insert(const int32_t[::1] fields, const uint64_t[::1] tokens, uint64_t salt,
               uint64_t[::1] keys, int64_t[::1] ids):
    """Insert (fields[n], tokens[n]) into the open-addressing map ``keys``
    (2 cap zeros, cap a power of two above the distinct pairs); ids[n] = the
    pair's id, numbered in order of first occurrence. Returns the pair count."""
    cdef uint64_t mask = keys.shape[0] // 2 - 1, h, tag
    cdef int64_t n, count = 0
    with nogil:
        for n in range(tokens.shape[0]):
            tag = <uint64_t>(fields[n] + 1) << 32
            h = he_lsh_probe(salt, fields[n], tokens[n]) & mask
            while True:
                if keys[2 * h + 1] == 0:
                    keys[2 * h] = tokens[n]
                    keys[2 * h + 1] = tag | <uint64_t>count
                    ids[n] = count
                    count += 1
                    break
                if (keys[2 * h + 1] >> 32) << 32 == tag and keys[2 * h] == tokens[n]:
                    ids[n] = <int64_t>(keys[2 * h + 1] & <uint64_t>0xFFFFFFFF)
                    break
                h = (h + 1) & mask
    return count


def lsh_compact(const int32_t[::1] fields, const uint64_t[::1] tokens, uint64_t salt,
                uint64_t[::1] keys):
    """The lookup map of distinct (fields[n], tokens[n]) -> n: entries
    fingerprint << 32 | n in ``keys`` (cap zeros, cap a power of two >= 2n).
    Returns the tokens left out because an earlier token on their probe run has
    their fingerprint (about n * 2^-30 of them; they read that token's data)."""
    cdef uint64_t mask = keys.shape[0] - 1, h, fp, pos
    cdef int64_t n, clashes = 0
    with nogil:
        for n in range(tokens.shape[0]):
            h = he_lsh_probe(salt, fields[n], tokens[n])
            fp = he_lsh_fingerprint(h)
            pos = h & mask
            while True:
                if keys[pos] == 0:
                    keys[pos] = (fp << 32) | <uint64_t>n
                    break
                if keys[pos] >> 32 == fp:
                    clashes += 1
                    break
                pos = (pos + 1) & mask
    return clashes


def lsh_find(SchemeView sv, const index_t[::1] tokens, int64_t field, int64_t[::1] out):
    """out[n] = id of (field, tokens[n]) in the scheme's map, or -1."""
    cdef int64_t n
    for n in prange(tokens.shape[0], nogil=True, schedule='static'):
        out[n] = he_lsh_find(&sv.s, field, <uint64_t>tokens[n])


def lsh_row_keys(const int64_t[::1] rows, uint64_t salt, uint64_t[::1] out):
    """out[n] = minhash key of sample row rows[n]."""
    cdef int64_t n
    for n in prange(rows.shape[0], nogil=True, schedule='static'):
        out[n] = he_lsh_row_key(salt, <uint64_t>rows[n])


def lsh_signatures(SchemeView sv, const int64_t[::1] ptr, const uint64_t[::1] keys,
                   int64_t id0, int64_t id1, int64_t F, bint slots, uint32_t[:, ::1] out):
    """Minhash signatures of ids id0..id1-1, whose row keys are keys[ptr[i]:ptr[i+1]]:
    sig_f = min_r h_f(key_r) (61-bit, then kept to 32 bits) for f < F. With
    ``slots`` out[i - id0, k] = he_lsh_slot(sig, k), the start of run k < D/Z;
    else out[i - id0] = sig."""
    cdef const he_scheme* s = &sv.s
    cdef const uint64_t* mh = s.lsh_mh
    cdef uint64_t* mins
    cdef uint32_t* sig
    cdef int64_t i, j, f, k
    cdef uint64_t v, key
    with nogil, parallel():
        mins = <uint64_t*>malloc(F * sizeof(uint64_t))
        sig = <uint32_t*>malloc(F * sizeof(uint32_t))
        for i in prange(id0, id1, schedule='dynamic', chunksize=64):
            for f in range(F):
                mins[f] = HE_P
            for j in range(ptr[i], ptr[i + 1]):
                key = keys[j]
                for f in range(F):
                    v = he_lsh_value(mh, f, key)
                    if v < mins[f]:
                        mins[f] = v
            for f in range(F):
                sig[f] = <uint32_t>mins[f]
            if slots:
                for k in range(s.runs):
                    out[i - id0, k] = <uint32_t>he_lsh_slot(s, sig, 0, k)
            else:
                for f in range(F):
                    out[i - id0, f] = sig[f]
        free(mins)
        free(sig)
