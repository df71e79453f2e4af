// Portable build of the kernels (ATen's DEFAULT vectors: NEON on Arm, SSE on x86-64).
#define CPU_CAPABILITY DEFAULT
#include "kernels_table.h"
