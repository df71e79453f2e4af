// AVX2 + FMA build of the kernels (x86-64 only; setup.py adds -mavx2 -mfma -mf16c).
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_table.h"
#else
#include "../kernels.h"
const normkernels::cpu::Kernels* normkernels::cpu::kernels_AVX2() { return nullptr; }
#endif
