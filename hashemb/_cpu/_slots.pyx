# cython: language_level=3
"""The scheme struct bridge, slot/sign evaluation and the vectorised universal hash."""
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint64_t


cdef class SchemeView:
    def __cinit__(self, scheme):
        cdef const uint64_t[::1] coef = scheme._coef
        cdef const uint64_t[::1] run_coef = scheme._run_coef
        cdef const uint64_t[::1] sign_coef = scheme._sign_coef
        cdef const int64_t[::1] table_base = scheme._table_base
        cdef int i
        self._keep = (scheme._coef, scheme._run_coef, scheme._sign_coef, scheme._table_base)
        self.s.kind = scheme._kind
        self.s.is_signed = scheme._signed
        self.s.dim = scheme.dim
        self.s.run = scheme._run
        self.s.runs = scheme.dim // scheme._run
        self.s.size = scheme.size
        self.s.mod = scheme._mod
        self.s.mod_inv = reciprocal(self.s.mod)
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


ctypedef fused index_t:
    int32_t
    int64_t

ctypedef fused key_t:
    int32_t
    int64_t
    uint64_t


def slots(SchemeView sv, const index_t[::1] tokens, const int64_t[::1] tables,
          int64_t[:, ::1] out):
    """out[n, i] = slot(tables[n], tokens[n], i) for every element i < D."""
    cdef const he_scheme* s = &sv.s
    cdef int64_t n, k, i, L = s.run
    cdef uint64_t st
    cdef he_row row
    for n in prange(tokens.shape[0], nogil=True, schedule='static'):
        row = he_row_begin(s, tables[n], tokens[n])
        for k in range(s.runs):
            st = he_run_start(s, &row, k)
            for i in range(L):
                out[n, k * L + i] = <int64_t>he_run_slot(s, st, i)


def signs(SchemeView sv, const index_t[::1] tokens, const int64_t[::1] tables,
          float[:, ::1] out):
    """out[n, i] = g(tables[n], tokens[n], i), +-1 (all 1 for unsigned schemes)."""
    cdef const he_scheme* s = &sv.s
    cdef int64_t n, i
    cdef he_row row
    for n in prange(tokens.shape[0], nogil=True, schedule='static'):
        row = he_row_begin(s, tables[n], tokens[n])
        for i in range(s.dim):
            out[n, i] = he_sign(s, &row, i)


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
