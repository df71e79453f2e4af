// The pool behind empty_output(); see output_pool.h for why it exists.
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define NORMKERNELS_HAVE_ATFORK 1
#endif

namespace normkernels {
namespace cpu {
namespace {

// glibc's default mmap threshold: from here up a freed block may go back to the OS.
constexpr size_t kMinPooledBytes = size_t(128) << 10;
constexpr size_t kGranule = size_t(2) << 20;  // also the huge-page size on x86-64 and most Arm

// The size class of a request: a multiple of 2 MiB, or below that a power of two (so outputs
// under 2 MiB waste at most their own size, and a few classes serve every shape).
size_t pooled_bytes(size_t n) {
  if (n >= kGranule) return (n + kGranule - 1) / kGranule * kGranule;
  size_t bytes = kMinPooledBytes;
  while (bytes < n) bytes *= 2;
  return bytes;
}

struct Block {
  void* data;
  size_t bytes;
};

void* fresh_memory(size_t bytes) {
#if defined(__linux__)
  void* p = nullptr;
  if (bytes < kGranule) {  // too small for a huge page: page-aligned is enough
    return posix_memalign(&p, 4096, bytes) == 0 ? p : nullptr;
  }
  if (posix_memalign(&p, kGranule, bytes) != 0) return nullptr;
  // A hint: honoured where transparent huge pages are "madvise" or "always", else ignored.
  madvise(p, bytes, MADV_HUGEPAGE);
  return p;
#else
  return c10::alloc_cpu(bytes);
#endif
}

void free_memory(void* p) {
#if defined(__linux__)
  std::free(p);
#else
  c10::free_cpu(p);
#endif
}

size_t limit_from_env() {
  const char* text = std::getenv("NORMKERNELS_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0', "NORMKERNELS_CPU_CACHE_MB must be a whole number of ",
              "MiB (0 turns the output pool off), got '", text, "'");
  return static_cast<size_t>(mb) << 20;
}

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() : limit_(limit_from_env()) {}

  // fork() while another thread holds the lock (a tensor freed on a worker thread) would leave
  // the child (a DataLoader worker, say) a pool locked forever: hold it across the fork.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

  // Whether n bytes come from the pool's blocks.
  bool pools(size_t n) const { return n >= kMinPooledBytes && limit_ != 0; }

  c10::DataPtr allocate(size_t n) override {
    if (!pools(n)) return c10::GetDefaultCPUAllocator()->allocate(n);
    Block* block = obtain(pooled_bytes(n));
    return {block->data, block, &OutputPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  // A block's memory for a kernel's scratch (n >= kMinPooledBytes: pools(n)), handed back by
  // give_back_memory with the same n.
  void* take_memory(size_t n) {
    Block* block = obtain(pooled_bytes(n));
    void* data = block->data;
    delete block;
    return data;
  }
  void give_back_memory(void* data, size_t n) noexcept {
    Block* block = new (std::nothrow) Block{data, pooled_bytes(n)};
    if (block == nullptr) {
      free_memory(data);
      return;
    }
    give_back(block);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t empty() {
    std::vector<Block*> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) idle.insert(idle.end(), entry.second.begin(), entry.second.end());
      free_.clear();
      cached_ = 0;
    }
    size_t freed = 0;
    for (Block* block : idle) {
      freed += block->bytes;
      free_memory(block->data);
      delete block;
    }
    return freed;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  // An idle block of `bytes` (a size class), else fresh memory.
  Block* obtain(size_t bytes) {
    if (Block* block = take(bytes)) return block;
    void* data = fresh_memory(bytes);
    if (data == nullptr) {
      // Idle blocks of other sizes may be what stands between us and the memory.
      empty();
      data = fresh_memory(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "normkernels: could not allocate ",
                     bytes, " bytes of CPU memory");
    return new Block{data, bytes};
  }

  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    Block* block = it->second.back();
    it->second.pop_back();
    cached_ -= bytes;
    return block;
  }

  static void give_back(void* ctx);

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> free_;  // idle blocks by size
  size_t cached_ = 0;
  const size_t limit_;
};

// Never destroyed: tensors may outlive static destruction and still return their blocks.
OutputPool& pool() {
  static OutputPool* instance = [] {
    auto* p = new OutputPool();
#ifdef NORMKERNELS_HAVE_ATFORK
    pthread_atfork([] { pool().lock(); }, [] { pool().unlock(); }, [] { pool().unlock(); });
#endif
    return p;
  }();
  return *instance;
}

void OutputPool::give_back(void* ctx) {
  Block* block = static_cast<Block*>(ctx);
  OutputPool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex_);
    if (p.cached_ + block->bytes <= p.limit_) {
      p.free_[block->bytes].push_back(block);
      p.cached_ += block->bytes;
      return;
    }
  }
  free_memory(block->data);
  delete block;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        c10::MemoryFormat format) {
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

void* allocate_scratch(size_t bytes) {
  OutputPool& p = pool();
  if (p.pools(bytes)) return p.take_memory(bytes);
  return ::operator new(bytes, std::align_val_t{kScratchAlignment});
}

void free_scratch(void* data, size_t bytes) noexcept {
  OutputPool& p = pool();
  if (p.pools(bytes)) {
    p.give_back_memory(data, bytes);
    return;
  }
  ::operator delete(data, std::align_val_t{kScratchAlignment});
}

size_t empty_cpu_cache() { return pool().empty(); }

size_t cached_cpu_bytes() { return pool().cached(); }

}  // namespace cpu
}  // namespace normkernels
