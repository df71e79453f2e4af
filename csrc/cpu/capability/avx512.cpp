// AVX-512 build of the kernels (x86-64 only; setup.py adds -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mfma).
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_table.h"
#else
#include "../kernels.h"
const normkernels::cpu::Kernels* normkernels::cpu::kernels_AVX512() { return nullptr; }
#endif
