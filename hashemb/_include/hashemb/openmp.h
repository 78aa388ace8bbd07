/* OpenMP is optional: without it every kernel runs on one thread. */
#ifndef HASHEMB_OPENMP_H
#define HASHEMB_OPENMP_H
#ifdef _OPENMP
#include <omp.h>
static inline int he_max_threads(void) { return omp_get_max_threads(); }
static inline int he_thread_num(void) { return omp_get_thread_num(); }
/* the team size inside a parallel region (may be below what num_threads asked) */
static inline int he_num_threads(void) { return omp_get_num_threads(); }
static inline int he_has_openmp(void) { return 1; }
/* the calling thread's team size for later parallel regions */
static inline void he_set_max_threads(int n) { omp_set_num_threads(n); }
#else
static inline int he_max_threads(void) { return 1; }
static inline int he_thread_num(void) { return 0; }
static inline int he_num_threads(void) { return 1; }
static inline int he_has_openmp(void) { return 0; }
static inline void he_set_max_threads(int n) { (void)n; }
#endif
#endif
