// A cache of large freed CPU blocks for the kernels' big buffers (per-call workspaces, saved
// activations, outputs, gradients: megabytes, allocated afresh on every call or step).
//
// glibc hands blocks this large back to the kernel (mmap'd blocks on free, the heap top by trimming),
// so the next call touches fresh pages and pays a page fault per 4 KiB (for a batch-1 LSTMCell
// training step at H = 1024, with two 16 MiB weight gradients a step, about as much as the
// arithmetic). Kept here instead, a freed block is reused by the next
// call that needs about as much, as oneDNN reuses its scratchpad and torch's CUDA allocator its
// blocks. Tensors from the cache are ordinary CPU tensors (only their storage's allocator differs),
// so one that escapes to the user is safe: its block returns to the cache when it is freed.
//
// Blocks of kMinBytes or more are cached, up to FASTLSTM_CPU_CACHE_MB mebibytes in all (default 256;
// 0 turns the cache off). A freed block that would exceed the cap makes room by freeing the blocks
// cached longest ago (least recently freed first): a process that moves on to other shapes gets its
// new blocks cached instead of keeping the old ones and page-faulting on every call. A block larger
// than the cap is freed as before. fastlstm.empty_cpu_cache() frees every cached block (the op
// fastlstm::cpu_cache_release, lstm_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include "cpu/knobs.h"

#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace fastlstm::cpu {

class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;

  BlockCache() {
    const long long mb = knobs().cache_mb;
    cap_ = mb > 0 ? size_t(mb) << 20 : 0;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || cap_ == 0) {
      void* p = n == 0 ? nullptr : c10::alloc_cpu(n);
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    // A cached block at least n bytes and at most an eighth larger (so that a small request does not
    // pin a large block), else a fresh one.
    void* p = nullptr;
    size_t size = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(n);
      if (it != free_.end() && it->first <= n + n / 8) {
        size = it->first;
        p = it->second->second;
        cached_ -= size;
        order_.erase(it->second);
        free_.erase(it);
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(n);
    return {p, new Block{p, size, this}, &BlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every cached block; returns the bytes freed.
  size_t release() {
    std::list<std::pair<size_t, void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(order_);
      free_.clear();
      cached_ = 0;
    }
    size_t bytes = 0;
    for (const auto& [size, p] : blocks) {
      bytes += size;
      c10::free_cpu(p);
    }
    return bytes;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  struct Block {
    void* p;
    size_t size;
    BlockCache* cache;
  };

  static void give_back(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    BlockCache* cache = b->cache;
    std::vector<void*> evicted;  // freed after the lock is released
    bool kept = false;
    if (b->size <= cache->cap_) {
      std::lock_guard<std::mutex> lock(cache->mu_);
      while (cache->cached_ + b->size > cache->cap_) {  // the oldest blocks make room
        const auto& [size, p] = cache->order_.back();
        auto range = cache->free_.equal_range(size);
        for (auto it = range.first; it != range.second; ++it) {
          if (it->second == std::prev(cache->order_.end())) {
            cache->free_.erase(it);
            break;
          }
        }
        evicted.push_back(p);
        cache->cached_ -= size;
        cache->order_.pop_back();
      }
      cache->order_.emplace_front(b->size, b->p);
      cache->free_.emplace(b->size, cache->order_.begin());
      cache->cached_ += b->size;
      kept = true;
    }
    for (void* p : evicted) c10::free_cpu(p);
    if (!kept) c10::free_cpu(b->p);
    delete b;
  }

  std::mutex mu_;
  // The cached blocks, most recently freed first, and an index of them by size.
  std::list<std::pair<size_t, void*>> order_;
  std::multimap<size_t, std::list<std::pair<size_t, void*>>::iterator> free_;
  size_t cached_ = 0;
  size_t cap_ = 0;
};

// The process's cache (never destroyed: tensors may be freed during teardown).
inline BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

// at::empty for a CPU buffer whose storage comes from the block cache.
inline at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &block_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

inline at::Tensor cached_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return cached_empty(sizes, options).zero_();
}

}  // namespace fastlstm::cpu
