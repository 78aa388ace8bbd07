# Declarations of hashemb/_include/hashemb/slots.h, the one source of the hash
# and slot math, and the bridge from a Python scheme object to its C struct.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef extern from "hashemb/slots.h" nogil:
    uint64_t HE_P
    int HE_NCOEF
    int HE_FULL, HE_ROBE, HE_ROBE_WIDE, HE_ROBE_REF, HE_HNET_REF, HE_LSH_TABLE, HE_LMA

    ctypedef struct he_scheme:
        int32_t kind
        int32_t is_signed
        int64_t dim
        int64_t run
        int64_t runs
        uint64_t size
        uint64_t mod
        uint64_t mod_inv
        uint64_t p_mod
        uint64_t rows
        uint64_t rows_inv
        uint64_t ref_p
        uint64_t ref_p_inv
        uint64_t coef[12]
        const uint64_t* run_coef
        const uint64_t* sign_coef
        const int64_t* table_base
        int64_t num_tables
        const uint64_t* lsh_keys
        uint64_t lsh_mask
        uint64_t lsh_salt
        const uint32_t* lsh_data
        int64_t lsh_width
        int64_t lsh_nh
        const int32_t* lsh_pick
        const uint64_t* lsh_mh
        const uint64_t* lsh_mix

    ctypedef struct he_row:
        uint64_t base
        uint64_t sbase

    uint64_t he_fold(uint64_t x)
    uint64_t he_mulmod(uint64_t a, uint64_t b)
    uint64_t he_fastmod(uint64_t v, uint64_t d, uint64_t inv)
    uint64_t he_hash(const uint64_t* c, uint64_t e, uint64_t u, uint64_t blk,
                     uint64_t m, uint64_t m_inv)
    ctypedef struct he_tterm:
        uint64_t a
        uint64_t sa

    he_row he_row_begin(const he_scheme* s, int64_t table, int64_t token)
    he_tterm he_table_term(const he_scheme* s, int64_t table)
    he_row he_row_begin_t(const he_scheme* s, int64_t table, he_tterm tt, int64_t token)
    uint64_t he_sign_base(const he_scheme* s, he_tterm tt, int64_t token)
    uint64_t he_run_start(const he_scheme* s, const he_row* r, int64_t k)
    void he_run_starts(const he_scheme* s, const he_row* r, uint64_t* out)
    ctypedef struct he_one_run_k:
        int kind
    int he_one_run(const he_scheme* s)
    he_one_run_k he_one_run_of(const he_scheme* s, int64_t table, he_tterm tt)
    uint64_t he_one_run_start(const he_one_run_k* k, uint64_t x)
    void he_one_run_starts(const he_one_run_k* k, const void* x, int wide, int64_t n,
                           uint64_t* out)
    enum: HE_RUNS_VEC
    enum: HE_ROWS_ONE, HE_ROWS_ROBE, HE_ROWS_EACH
    ctypedef struct he_rows_k:
        int how
    void he_rows_of(he_rows_k* k, const he_scheme* s, int64_t table, he_tterm tt)
    void he_rows_starts(const he_rows_k* k, const void* x, int wide, int64_t n, uint64_t* out)
    int he_sign(const he_scheme* s, const he_row* r, int64_t i)
    void he_signs(const he_scheme* s, const he_row* r, int64_t i0, int64_t n, float* out)
    void he_signs_of(const he_scheme* s, const uint64_t* sb, int64_t n, float* out)
    void he_sign_rows(const he_scheme* s, he_tterm tt, const void* x, int wide, int64_t n,
                      float* out)
    enum: HE_SIGN_ROWS
    int he_sign_of_key(const uint64_t* q, uint64_t k)
    uint64_t he_hash_base(const uint64_t* c, uint64_t e, uint64_t u)
    uint64_t he_addmod(uint64_t a, uint64_t b)
    uint64_t he_run_slot(const he_scheme* s, uint64_t start, int64_t j)
    uint64_t he_mix64(uint64_t x)
    uint64_t he_lsh_row_key(uint64_t salt, uint64_t r)
    uint64_t he_lsh_value(const uint64_t* mh, int64_t f, uint64_t key)
    uint32_t he_lsh_hash(const uint64_t* mh, int64_t f, uint64_t key)
    uint64_t he_lsh_probe(uint64_t salt, int64_t field, uint64_t token)
    uint64_t he_lsh_fingerprint(uint64_t h)
    int64_t he_lsh_find(const he_scheme* s, int64_t field, uint64_t token)
    uint64_t he_lsh_slot(const he_scheme* s, const uint32_t* sig, uint64_t key, int64_t k)
    int he_reads_map(const he_scheme* s)
    uint64_t he_table_probe(const he_scheme* s, int64_t table)
    uint64_t he_row_probe(const he_scheme* s, uint64_t table_probe, int64_t token)
    const void* he_probe_hint(const he_scheme* s, uint64_t probe)
    he_row he_row_begin_probed(const he_scheme* s, int64_t table, int64_t token, uint64_t probe)
    const void* he_row_data(const he_scheme* s, const he_row* r)

cdef extern from "hashemb/openmp.h" nogil:
    int he_max_threads()
    int he_has_openmp()
    void he_set_max_threads(int n)


cdef inline uint64_t reciprocal(uint64_t d) noexcept nogil:
    return <uint64_t>0xFFFFFFFFFFFFFFFF // d if d else 0


cdef class SchemeView:
    """The C struct of a scheme, holding references to the arrays it points into."""
    cdef he_scheme s
    cdef object _keep
    cdef object _pointers
