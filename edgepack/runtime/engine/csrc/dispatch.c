/* The kernel table in use: the best this CPU runs, found at import; set_isa picks a lesser
 * one (tests compare every instruction set against the others on the same machine). */
#include <stdlib.h>

#include "engine.h"

#if EP_ARM && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* the kernel's bit for sdot/udot (asm/hwcap.h) */
#endif
#endif

/* best first */
static const Kernels *const tables[] = {
#if EP_X86
    &kernels_avx512,
    &kernels_avx2,
#endif
#if EP_ARM
    &kernels_neon_dotprod,
    &kernels_neon,
#endif
    &kernels_generic,
};
enum { N_TABLES = sizeof tables / sizeof tables[0] };

static int best = N_TABLES - 1; /* index into tables */
const Kernels *kernels = &kernels_generic;
int act_bits = 8;

void detect_isa(void) {
#if EP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
        best = 0;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        best = 1;
#elif EP_ARM && defined(__linux__)
    /* every aarch64 CPU has NEON; the kernel says whether it has sdot */
    best = getauxval(AT_HWCAP) & HWCAP_ASIMDDP ? 0 : 1;
#elif EP_ARM
    best = 1; /* no getauxval: NEON, which every aarch64 CPU has */
#endif
    kernels = tables[best];
    const char *bits = getenv("EDGEPACK_ACTIVATION_BITS"); /* other values: the default (Python refuses them) */
    if (bits && !strcmp(bits, "32")) act_bits = 32;
    if (bits && !strcmp(bits, "8")) act_bits = 8;
}

const char *current_isa(void) { return kernels->name; }

const char *best_isa(void) { return tables[best]->name; }

int set_isa(const char *name) {
    for (int i = best; i < N_TABLES; i++)
        if (!strcmp(name, tables[i]->name)) {
            kernels = tables[i];
            return 0;
        }
    return -1;
}
