// Where the CPU ops' large outputs (y, dx), and the kernels' large scratch arrays, come from.
//
// torch's CPU allocator hands big blocks straight back to the OS when they are freed (glibc
// mmaps blocks past its threshold and trims the heap top past another), so the next step's
// output of the same size is fresh memory again and its first write page-faults: one trap and
// one zeroed 4 KiB page at a time. For a 12 MB layer-norm output that costs more than the
// kernel itself (8192x768 bf16 forward+backward: 7.9 ms with faults, 2.5 ms without).
// Training and serving repeat the same shapes every step, so we keep the freed blocks of our
// outputs and hand them out again, as the CUDA caching allocator does on the GPU.
//
// Blocks from 128 KiB (glibc's default mmap threshold) are pooled. Below 1 MiB malloc's own
// reuse is not enough either: glibc raises its thresholds as mmapped blocks are freed, but once
// other sizes come and go it trims the heap top, and a 16x512x7x7 bf16 batch-norm step
// (0.8 MB y and dx) page-faulted 100-190 times a step, as much time as its two kernels.
// Sizes are rounded up to a power of two below 2 MiB and to a multiple of 2 MiB above, so
// shapes that differ a little share blocks; fresh blocks of 2 MiB or more are 2 MiB-aligned
// and advised as transparent huge pages where Linux allows, so even a first touch faults 512
// times less often. The pool keeps at most
// NORMKERNELS_CPU_CACHE_MB (default 1024; 0 turns pooling off) of idle blocks;
// empty_cpu_cache() gives them all back.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <cstddef>

namespace normkernels {
namespace cpu {

// An uninitialised CPU tensor shaped like `sizes` in `format`, of options' dtype, whose
// storage comes from the pool (resizing it works as for any tensor).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        c10::MemoryFormat format = c10::MemoryFormat::Contiguous);

// Scratch memory of the kernels (reductions.h's Scratch and LineBuffer), aligned to
// kScratchAlignment bytes: blocks of the pool from its smallest pooled size up, else operator
// new. Their scratch arrays of N * C values (GroupNorm's and BatchNorm's per-(n, c) sums) came
// from malloc, which, for the same reasons as outputs, handed out fresh pages step after step:
// a GroupNorm 64x2048x1x1 fp32 backward faulted 480 times a call and took 1.95 ms. free_scratch
// takes the bytes asked for.
constexpr size_t kScratchAlignment = 64;
void* allocate_scratch(size_t bytes);
void free_scratch(void* data, size_t bytes) noexcept;

// Frees every idle pooled block; returns the bytes given back.
size_t empty_cpu_cache();

// Bytes held idle in the pool now.
size_t cached_cpu_bytes();

}  // namespace cpu
}  // namespace normkernels
