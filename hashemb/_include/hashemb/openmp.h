/* OpenMP is optional: without it every kernel runs on one thread. */
#ifndef HASHEMB_OPENMP_H
#define HASHEMB_OPENMP_H
#ifdef _OPENMP
#include <omp.h>
static inline int he_max_threads(void) { return omp_get_max_threads(); }
static inline int he_thread_num(void) { return omp_get_thread_num(); }
static inline int he_has_openmp(void) { return 1; }
#else
static inline int he_max_threads(void) { return 1; }
static inline int he_thread_num(void) { return 0; }
static inline int he_has_openmp(void) { return 0; }
#endif
#endif
