// The emulator's scheduler: CUDA threads as fibers that switch only at barriers.
//
// A launch runs its blocks one at a time (all at once for a cooperative launch), in an order set by
// FASTLSTM_EMU_BLOCK_ORDER. Within a block every runnable thread runs until it waits at a barrier
// or returns, in the order set by FASTLSTM_EMU_THREAD_ORDER; then the barriers whose threads have all
// arrived are released. Orders: forward, reverse, shuffle (seeded by FASTLSTM_EMU_SEED).
//
// Checked, with a message and exit status 86 on failure:
// - __syncthreads: every thread of the block waits at the same call (not another call, not returned);
// - warp collectives (mma, shuffles, __syncwarp): all 32 lanes at the same call;
// - grid_sync: every thread of the grid, in a cooperative launch;
// - static shared memory at most 48 KiB per block, threads and grid within CUDA's limits.
//
// For the standalone programs in research/gpu (tests/emu/host_api.h): dynamic shared memory,
// thread-block clusters (run one cluster at a time: cluster_sync is the barrier of its blocks, and
// a block reaches the others' dynamic shared memory), threads that spin-wait on memory another
// block writes (spin_wait: the spinning thread lets every other runnable thread run first), a
// TF32 mma, and FASTLSTM_EMU_DRIFT=1: blocks resident together leave their __syncthreads in random
// halves, so that they drift apart and a missing grid-wide barrier changes the results.
// FASTLSTM_EMU_LAUNCH_LOG=path appends one line per launch: the kernel's offset in the executable
// (hex; `nm` names it) and the grid's x, y, z (tests/emu/coverage.py reads it).
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

// Fiber switches. On x86-64 a few instructions that keep the callee-saved registers and the
// floating-point control words (ucontext's swapcontext makes a system call per switch; this halved
// the time of a 129-block forward step here); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void fastlstm_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl fastlstm_emu_switch
  .type fastlstm_emu_switch,@function
fastlstm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastlstm_emu_switch,.-fastlstm_emu_switch
)");

namespace {
struct Context {
  void* sp = nullptr;
};
// A context that starts `entry` on the stack [stack, stack + bytes) at its first switch.
void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15)));
  // From the saved stack pointer up: control words, r15 r14 r13 r12 rbx rbp, the address `ret`
  // jumps to, and a null return address for entry (which never returns). After `ret` the stack
  // pointer is 8 mod 16, as at any function's entry.
  uint64_t* sp = top - 9;
  uint32_t csr[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  std::memcpy(&sp[0], csr, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;
  c.sp = sp;
}
void switch_context(Context& from, Context& to) { fastlstm_emu_switch(&from.sp, to.sp); }
}  // namespace
#else
namespace {
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
}  // namespace
#endif

namespace fastlstm_emu {

ThreadIndex* g_index = nullptr;

namespace {

constexpr std::size_t kStaticSharedLimit = 48 * 1024;
constexpr int kWarp = 32;

[[noreturn]] void fail(const char* fmt, ...) {
  std::fprintf(stderr, "fastlstm_emu: error: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(86);
}

enum class Order { kForward, kReverse, kShuffle };

Order order_from_env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || std::string(v) == "forward") return Order::kForward;
  if (std::string(v) == "reverse") return Order::kReverse;
  if (std::string(v) == "shuffle") return Order::kShuffle;
  fail("%s must be forward, reverse or shuffle, got '%s'", name, v);
}

uint64_t seed_from_env() {
  const char* v = std::getenv("FASTLSTM_EMU_SEED");
  return v ? std::strtoull(v, nullptr, 10) : 0;
}

unsigned sms_from_env() {
  const char* v = std::getenv("FASTLSTM_EMU_SMS");
  if (v == nullptr) return 132;
  const long n = std::strtol(v, nullptr, 10);
  if (n < 1 || n > 1024) fail("FASTLSTM_EMU_SMS must be an SM count in [1, 1024], got '%s'", v);
  return static_cast<unsigned>(n);
}

bool drift_from_env() {
  const char* v = std::getenv("FASTLSTM_EMU_DRIFT");
  if (v == nullptr || std::string(v) == "0") return false;
  if (std::string(v) == "1") return true;
  fail("FASTLSTM_EMU_DRIFT must be 0 or 1, got '%s'", v);
}

struct Options {
  Order thread_order = order_from_env("FASTLSTM_EMU_THREAD_ORDER");
  Order block_order = order_from_env("FASTLSTM_EMU_BLOCK_ORDER");
  std::mt19937_64 rng{seed_from_env()};
  // Blocks a cooperative launch may have resident (an H100's SM count unless FASTLSTM_EMU_SMS
  // says otherwise, one block per SM).
  unsigned max_cooperative_blocks = sms_from_env();
  bool drift = drift_from_env();
};

Options& options() {
  static Options o;
  return o;
}

void apply_order(std::vector<int>& v, Order order) {
  if (order == Order::kReverse) std::reverse(v.begin(), v.end());
  if (order == Order::kShuffle) std::shuffle(v.begin(), v.end(), options().rng);
}

enum class Wait { kRunnable, kBlock, kWarp, kGrid, kDone, kSpin, kCluster };

const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kRunnable: return "running";
    case Wait::kBlock: return "__syncthreads";
    case Wait::kWarp: return "a warp collective";
    case Wait::kGrid: return "grid_sync";
    case Wait::kDone: return "returned";
    case Wait::kSpin: return "a spin-wait";
    case Wait::kCluster: return "cluster_sync";
  }
  return "?";
}

struct WarpLane {
  uint32_t a[4], b[2];
  float c[4], d[4];
  uint32_t value, result;
  int src;
  unsigned mask;
};

struct WarpState {
  WarpLane lane[kWarp];
  int64_t generation = 0;  // releases so far
  int64_t computed = -1;   // generation whose results are in lane[].d / .result
};

struct BlockState {
  std::vector<void*> arrays;
  std::vector<std::size_t> sizes;
  std::vector<const std::type_info*> types;
  std::size_t shared_bytes = 0;
  std::vector<WarpState> warps;
  void* dynamic = nullptr;  // the launch's dynamic shared memory, this block's
  unsigned rank = 0;        // within its cluster
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  ThreadIndex index;
  Wait wait = Wait::kRunnable;
  Site site{nullptr, 0};
  int64_t arrivals = 0;     // waits of the current kind so far, this one included
  int64_t per_kind[7] = {};  // waits so far, by kind (block barriers, warp collectives, grid, ...)
  int block = 0;       // index into Launch::blocks
  int linear_tid = 0;  // within the block
  int shared_next = 0; // this thread's next shared declaration
  void* fake_stack = nullptr;
};

std::size_t stack_bytes() { return EMU_ASAN ? (1u << 20) : (256u << 10); }

struct Launch {
  dim3 grid, block;
  bool cooperative = false;
  std::size_t dynamic_bytes = 0;
  unsigned cluster = 1;  // blocks per cluster; a cluster launch has one cluster resident at a time
  const std::function<void()>* body = nullptr;
  std::vector<BlockState> blocks;
  std::vector<Fiber> fibers;
  Context scheduler;
  Fiber* current = nullptr;
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
  int64_t launch_id = 0;
};

Launch* g_launch = nullptr;
int64_t g_launch_count = 0;
std::vector<char*> g_stack_pool;

void start_switch(void** fake, const void* bottom, std::size_t size) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
void finish_switch(void* fake, const void** bottom, std::size_t* size) {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

// Called on the fiber: back to the scheduler until released.
void yield(Wait wait, Site site) {
  Launch& l = *g_launch;
  Fiber* f = l.current;
  f->wait = wait;
  f->site = site;
  f->arrivals = ++f->per_kind[static_cast<int>(wait)];
  start_switch(&f->fake_stack, l.sched_stack_bottom, l.sched_stack_size);
  switch_context(f->ctx, l.scheduler);
  finish_switch(f->fake_stack, &l.sched_stack_bottom, &l.sched_stack_size);
}

void fiber_main() {
  Launch& l = *g_launch;
  finish_switch(nullptr, &l.sched_stack_bottom, &l.sched_stack_size);
  (*l.body)();
  Fiber* f = l.current;
  f->wait = Wait::kDone;
  start_switch(nullptr, l.sched_stack_bottom, l.sched_stack_size);
  switch_context(f->ctx, l.scheduler);
  fail("a returned CUDA thread was resumed");
}

void run_fiber(Launch& l, Fiber& f) {
  l.current = &f;
  g_index = &f.index;
  void* fake = nullptr;
  start_switch(&fake, f.stack, stack_bytes());
  switch_context(l.scheduler, f.ctx);
  finish_switch(fake, nullptr, nullptr);
  l.current = nullptr;
  g_index = nullptr;
}

std::string describe(const Launch& l, const Fiber& f) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u) at %s (%s:%d, arrival %lld)",
                f.index.thread_idx.x, f.index.thread_idx.y, f.index.thread_idx.z,
                f.index.block_idx.x, f.index.block_idx.y, f.index.block_idx.z, wait_name(f.wait),
                f.site.file ? f.site.file : "-", f.site.line, static_cast<long long>(f.arrivals));
  (void)l;
  return buf;
}

bool same_place(const Fiber& a, const Fiber& b) {
  return a.wait == b.wait && a.arrivals == b.arrivals && a.site.line == b.site.line &&
         (a.site.file == b.site.file ||
          (a.site.file && b.site.file && std::strcmp(a.site.file, b.site.file) == 0));
}

// Releases what can be released once every fiber waits or has returned; false when nothing can.
bool release(Launch& l, int first, int count, int threads_per_block) {
  // Warp collectives.
  bool released = false;
  for (int w0 = first; w0 < first + count; w0 += kWarp) {
    const int n = std::min(kWarp, first + count - w0);
    int at_warp = 0, spinning = 0;
    for (int i = 0; i < n; ++i) {
      at_warp += l.fibers[w0 + i].wait == Wait::kWarp;
      spinning += l.fibers[w0 + i].wait == Wait::kSpin;
    }
    if (at_warp == 0 || spinning) continue;  // a spinning lane reaches the collective later
    for (int i = 0; i < n; ++i) {
      const Fiber& f = l.fibers[w0 + i];
      if (!same_place(f, l.fibers[w0]) || n != kWarp) {
        fail("warp collective without a converged warp (launch %lld): %s, but %s",
             static_cast<long long>(l.launch_id), describe(l, l.fibers[w0]).c_str(),
             describe(l, f).c_str());
      }
    }
    const Fiber& f0 = l.fibers[w0];
    WarpState& ws = l.blocks[f0.block].warps[f0.linear_tid / kWarp];
    ++ws.generation;
    for (int i = 0; i < n; ++i) l.fibers[w0 + i].wait = Wait::kRunnable;
    released = true;
  }
  if (released) return true;
  // Block barriers.
  std::vector<int> complete;
  for (int b0 = first; b0 < first + count; b0 += threads_per_block) {
    int at_block = 0, spinning = 0;
    for (int i = 0; i < threads_per_block; ++i) {
      at_block += l.fibers[b0 + i].wait == Wait::kBlock;
      spinning += l.fibers[b0 + i].wait == Wait::kSpin;
    }
    if (at_block == 0 || spinning) continue;  // a spinning thread reaches the barrier later
    for (int i = 0; i < threads_per_block; ++i) {
      const Fiber& f = l.fibers[b0 + i];
      if (!same_place(f, l.fibers[b0])) {
        const Fiber& w = l.fibers[b0].wait == Wait::kBlock ? l.fibers[b0] : f;
        const Fiber& o = &w == &f ? l.fibers[b0] : f;
        fail("divergent __syncthreads (launch %lld): %s, but %s",
             static_cast<long long>(l.launch_id), describe(l, w).c_str(), describe(l, o).c_str());
      }
    }
    complete.push_back(b0);
  }
  if (options().drift && complete.size() > 1) {
    // Each block leaves with probability 1/2 (one at least): the others wait another round.
    std::vector<int> leaving;
    for (int b0 : complete) {
      if (options().rng() & 1) leaving.push_back(b0);
    }
    if (leaving.empty()) leaving.push_back(complete[options().rng() % complete.size()]);
    complete.swap(leaving);
  }
  for (int b0 : complete) {
    for (int i = 0; i < threads_per_block; ++i) l.fibers[b0 + i].wait = Wait::kRunnable;
    released = true;
  }
  if (released) return true;
  // Grid barrier (a cooperative launch) or cluster barrier (the resident cluster's blocks).
  int at_grid = 0, spinning = 0;
  for (int i = first; i < first + count; ++i) {
    at_grid += l.fibers[i].wait == Wait::kGrid || l.fibers[i].wait == Wait::kCluster;
    spinning += l.fibers[i].wait == Wait::kSpin;
  }
  if (at_grid == 0 || spinning) return false;
  const bool cluster = l.fibers[first].wait == Wait::kCluster;
  for (int i = first; i < first + count; ++i) {
    const Fiber& f = l.fibers[i];
    if (!same_place(f, l.fibers[first]) || (cluster ? l.cluster == 1 : !l.cooperative)) {
      fail(cluster ? "cluster_sync not reached by every thread of the cluster (launch %lld): %s"
                   : "grid_sync not reached by every thread of a cooperative launch (launch %lld): %s",
           static_cast<long long>(l.launch_id), describe(l, f).c_str());
    }
  }
  for (int i = first; i < first + count; ++i) l.fibers[i].wait = Wait::kRunnable;
  return true;
}

// Runs fibers [first, first + count) (whole blocks) to completion.
void run_resident(Launch& l, int first, int count, int threads_per_block) {
  std::vector<int> order(count);
  // Rounds in which only spin-waits ran and nothing was released: some are normal (a thread polls
  // before the writer has run), very many mean nothing will ever change.
  constexpr int64_t kMaxIdleRounds = 100000;
  int64_t idle_rounds = 0;
  for (;;) {
    for (int i = 0; i < count; ++i) order[i] = first + i;
    apply_order(order, options().thread_order);
    bool progress = false, spinning = false;
    for (int i : order) {
      const Wait before = l.fibers[i].wait;
      if (before == Wait::kRunnable || before == Wait::kSpin) {
        run_fiber(l, l.fibers[i]);
        progress |= before == Wait::kRunnable || l.fibers[i].wait != Wait::kSpin;
        spinning |= l.fibers[i].wait == Wait::kSpin;
      }
    }
    bool all_done = true;
    for (int i = first; i < first + count; ++i) all_done &= l.fibers[i].wait == Wait::kDone;
    if (all_done) return;
    if (release(l, first, count, threads_per_block)) {
      idle_rounds = 0;
    } else if (!spinning) {
      fail("deadlock: no barrier can be released (launch %lld)", static_cast<long long>(l.launch_id));
    } else if (progress) {
      idle_rounds = 0;
    } else if (++idle_rounds > kMaxIdleRounds) {
      fail("deadlock: threads spin-wait on memory nobody writes and no barrier can be released "
           "(launch %lld)", static_cast<long long>(l.launch_id));
    }
  }
}

char* stack_for(std::size_t i) {
  while (g_stack_pool.size() <= i) {
    void* p = mmap(nullptr, stack_bytes(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    g_stack_pool.push_back(static_cast<char*>(p));
  }
  return g_stack_pool[i];
}

void free_block(BlockState& b) {
  for (void* p : b.arrays) std::free(p);
  std::free(b.dynamic);
  b = BlockState();
}

// Shared memory a block may have in all (an H100's opt-in maximum).
constexpr std::size_t kSharedLimit = 227 * 1024;

void log_launch(const void* kernel, dim3 grid) {
  static std::FILE* log = [] {
    const char* path = std::getenv("FASTLSTM_EMU_LAUNCH_LOG");
    return path ? std::fopen(path, "a") : nullptr;
  }();
  Dl_info info;
  if (log == nullptr || kernel == nullptr || dladdr(kernel, &info) == 0) return;
  std::fprintf(log, "%zx %u %u %u\n",
               static_cast<std::size_t>(static_cast<const char*>(kernel) -
                                        static_cast<const char*>(info.dli_fbase)),
               grid.x, grid.y, grid.z);
  std::fflush(log);
}

}  // namespace

cudaError_t launch_body(dim3 grid, dim3 block, bool cooperative, const std::function<void()>& body,
                        const void* kernel) {
  return launch_ex(grid, block, cooperative, 0, 1, body, kernel);
}

cudaError_t launch_ex(dim3 grid, dim3 block, bool cooperative, std::size_t dynamic_shared_bytes,
                      unsigned cluster, const std::function<void()>& body, const void* kernel) {
  if (g_launch != nullptr) fail("a kernel launched another kernel");
  log_launch(kernel, grid);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || block.x > 1024 ||
      block.y > 1024 || block.z > 64 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (cooperative && nblocks > options().max_cooperative_blocks) {
    return cudaErrorCooperativeLaunchTooLarge;
  }
  // Clusters along x only, as many blocks as a GPC may hold (16, the non-portable maximum).
  if (cluster == 0 || cluster > 16 || grid.x % cluster != 0 || (cluster > 1 && cooperative)) {
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_shared_bytes > kSharedLimit) return cudaErrorInvalidValue;
  Launch l;
  l.grid = grid;
  l.block = block;
  l.cooperative = cooperative;
  l.dynamic_bytes = dynamic_shared_bytes;
  l.cluster = cluster;
  l.body = &body;
  l.launch_id = g_launch_count++;
  g_launch = &l;
  const int tpb = static_cast<int>(threads);
  const int resident = cooperative ? static_cast<int>(nblocks) : static_cast<int>(cluster);

  // Whole clusters in the chosen order (of blocks when the cluster is one block), each cluster's
  // blocks by rank.
  std::vector<int> cluster_order(nblocks / cluster);
  for (std::size_t i = 0; i < cluster_order.size(); ++i) cluster_order[i] = static_cast<int>(i);
  apply_order(cluster_order, options().block_order);
  std::vector<int> block_order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) {
    block_order[i] = cluster_order[i / cluster] * static_cast<int>(cluster) + static_cast<int>(i % cluster);
  }

  for (uint64_t g0 = 0; g0 < nblocks; g0 += resident) {
    l.blocks.assign(resident, BlockState());
    l.fibers.assign(std::size_t(resident) * tpb, Fiber());
    for (int rb = 0; rb < resident; ++rb) {
      const int lin = block_order[g0 + rb];
      const dim3 bidx(lin % grid.x, (lin / grid.x) % grid.y, lin / (grid.x * grid.y));
      l.blocks[rb].warps.resize((tpb + kWarp - 1) / kWarp);
      l.blocks[rb].rank = static_cast<unsigned>(lin) % cluster;
      if (dynamic_shared_bytes > 0) {
        // Exactly its size, NaN bytes, as for static shared arrays.
        l.blocks[rb].dynamic = std::malloc(dynamic_shared_bytes);
        if (l.blocks[rb].dynamic == nullptr) fail("out of memory");
        std::memset(l.blocks[rb].dynamic, 0xff, dynamic_shared_bytes);
      }
      for (int t = 0; t < tpb; ++t) {
        Fiber& f = l.fibers[std::size_t(rb) * tpb + t];
        f.block = rb;
        f.linear_tid = t;
        f.index = {dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y)), bidx, block,
                   grid};
        f.stack = stack_for(std::size_t(rb) * tpb + t);
        make_context(f.ctx, f.stack, stack_bytes(), fiber_main);
      }
    }
    run_resident(l, 0, resident * tpb, tpb);
    for (BlockState& b : l.blocks) free_block(b);
  }
  g_launch = nullptr;
  return cudaSuccess;
}

void* shared_alloc(std::size_t bytes, std::size_t align, const std::type_info& type) {
  if (g_launch == nullptr || g_launch->current == nullptr) fail("__shared__ outside a kernel");
  Fiber& f = *g_launch->current;
  BlockState& b = g_launch->blocks[f.block];
  const int k = f.shared_next++;
  if (k == static_cast<int>(b.arrays.size())) {
    b.shared_bytes += bytes;
    if (b.shared_bytes > kStaticSharedLimit) {
      fail("static shared memory of %zu bytes exceeds the %zu-byte limit", b.shared_bytes,
           kStaticSharedLimit);
    }
    if (b.shared_bytes + g_launch->dynamic_bytes > kSharedLimit) {
      fail("%zu bytes of static and %zu of dynamic shared memory exceed the %zu-byte limit",
           b.shared_bytes, g_launch->dynamic_bytes, kSharedLimit);
    }
    void* p = nullptr;
    // Exactly `bytes`, so that AddressSanitizer sees an access one past the end.
    if (posix_memalign(&p, std::max<std::size_t>(align, 16), bytes) != 0) fail("out of memory");
    std::memset(p, 0xff, bytes);  // NaN in every floating-point type: unwritten reads show up
    b.arrays.push_back(p);
    b.sizes.push_back(bytes);
    b.types.push_back(&type);
  } else if (b.sizes[k] != bytes || *b.types[k] != type) {
    fail("threads of one block declared different __shared__ arrays");
  }
  return b.arrays[k];
}

void grid_sync(const char* file, int line) {
  if (g_launch == nullptr || !g_launch->cooperative) fail("grid_sync outside a cooperative launch");
  yield(Wait::kGrid, Site{file, line});
}

unsigned sm_count() { return options().max_cooperative_blocks; }

namespace {
Launch& current_launch(const char* what) {
  if (g_launch == nullptr || g_launch->current == nullptr) fail("%s outside a kernel", what);
  return *g_launch;
}
}  // namespace

void* dynamic_shared() {
  Launch& l = current_launch("dynamic shared memory");
  return l.blocks[l.current->block].dynamic;
}

unsigned cluster_size() { return current_launch("a cluster query").cluster; }

unsigned cluster_rank() {
  Launch& l = current_launch("a cluster query");
  return l.blocks[l.current->block].rank;
}

void* cluster_shared(void* p, unsigned rank) {
  Launch& l = current_launch("map_shared_rank");
  const auto* base = static_cast<unsigned char*>(l.blocks[l.current->block].dynamic);
  const auto* q = static_cast<unsigned char*>(p);
  if (base == nullptr || q < base || q > base + l.dynamic_bytes) {
    fail("map_shared_rank of an address outside the block's dynamic shared memory");
  }
  const std::size_t offset = static_cast<std::size_t>(q - base);
  if (rank >= l.cluster) fail("map_shared_rank to rank %u of a cluster of %u", rank, l.cluster);
  // The resident blocks are one cluster, by rank.
  return static_cast<unsigned char*>(l.blocks[rank].dynamic) + offset;
}

void cluster_sync(const char* file, int line) {
  if (current_launch("cluster_sync").cluster == 1) fail("cluster_sync outside a cluster launch");
  yield(Wait::kCluster, Site{file, line});
}

void spin_wait(const char* file, int line) {
  current_launch("spin_wait");
  yield(Wait::kSpin, Site{file, line});
}

namespace {

WarpState& my_warp(int* lane) {
  if (g_launch == nullptr || g_launch->current == nullptr) fail("warp collective outside a kernel");
  Fiber& f = *g_launch->current;
  *lane = f.linear_tid % kWarp;
  return g_launch->blocks[f.block].warps[f.linear_tid / kWarp];
}

float element(uint32_t reg, int half, bool bf16) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// Every lane's D = A B + C of one 16 x 8 tile, from the whole A [16][K], B [K][8] and C.
template <int K>
void multiply(WarpState& ws, const float (&A)[16][K], const float (&B)[K][8], const float (&C)[16][8]) {
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int m = g + (e / 2) * 8, n = 2 * t + e % 2;
      double s = 0;
      for (int k = 0; k < K; ++k) s += double(A[m][k]) * double(B[k][n]);
      ws.lane[l].d[e] = static_cast<float>(s + double(C[m][n]));
    }
  }
}

// D = A B + C for one m16n8k16 tile from the fragments of all 32 lanes (PTX ISA fragment layouts for
// .m16n8k16 with 16-bit A/B and f32 C/D): groupID = lane / 4, tig = lane % 4;
//   A (16 x 16, row): a0 {row g, k 2t..2t+1}, a1 {row g+8, k 2t..}, a2 {row g, k 2t+8..},
//                      a3 {row g+8, k 2t+8..}; the low half holds the lower k
//   B (16 x 8, col):  b0 {k 2t..2t+1, col g}, b1 {k 2t+8.., col g}
//   C, D (16 x 8):    c0, c1 {row g, col 2t, 2t+1}, c2, c3 {row g+8, col 2t, 2t+1}
// Products of 16-bit values are exact in float; they are summed in double and rounded once (the
// hardware's internal order and rounding differ in the last bits).
void compute_mma(WarpState& ws, bool bf16) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    const WarpLane& x = ws.lane[l];
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = element(x.a[0], h, bf16);
      A[g + 8][2 * t + h] = element(x.a[1], h, bf16);
      A[g][2 * t + 8 + h] = element(x.a[2], h, bf16);
      A[g + 8][2 * t + 8 + h] = element(x.a[3], h, bf16);
      B[2 * t + h][g] = element(x.b[0], h, bf16);
      B[2 * t + 8 + h][g] = element(x.b[1], h, bf16);
      C[g][2 * t + h] = x.c[h];
      C[g + 8][2 * t + h] = x.c[2 + h];
    }
  }
  multiply(ws, A, B, C);
}

// The same for .m16n8k8 with .tf32 A/B (the tensor core reads the top 19 bits of each register):
//   A (16 x 8, row): a0 {row g, k t}, a1 {row g+8, k t}, a2 {row g, k t+4}, a3 {row g+8, k t+4}
//   B (8 x 8, col):  b0 {k t, col g}, b1 {k t+4, col g};  C, D as above.
void compute_mma_tf32(WarpState& ws) {
  auto tf32 = [](uint32_t r) {
    r &= 0xffffe000u;
    float f;
    std::memcpy(&f, &r, 4);
    return f;
  };
  float A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, t = l % 4;
    const WarpLane& x = ws.lane[l];
    A[g][t] = tf32(x.a[0]);
    A[g + 8][t] = tf32(x.a[1]);
    A[g][t + 4] = tf32(x.a[2]);
    A[g + 8][t + 4] = tf32(x.a[3]);
    B[t][g] = tf32(x.b[0]);
    B[t + 4][g] = tf32(x.b[1]);
    for (int h = 0; h < 2; ++h) {
      C[g][2 * t + h] = x.c[h];
      C[g + 8][2 * t + h] = x.c[2 + h];
    }
  }
  multiply(ws, A, B, C);
}

// A warp-collective mma: deposits this lane's fragments, waits for the warp, takes its result.
template <typename Compute>
void warp_mma(float* d, const uint32_t* a, const uint32_t* b, Site site, Compute compute) {
  int lane;
  WarpState& ws = my_warp(&lane);
  WarpLane& x = ws.lane[lane];
  std::memcpy(x.a, a, sizeof x.a);
  std::memcpy(x.b, b, sizeof x.b);
  std::memcpy(x.c, d, sizeof x.c);
  yield(Wait::kWarp, site);
  // The first lane to resume computes every lane's result; later lanes may already have deposited
  // their next operands, which is why results live apart from operands.
  if (ws.computed != ws.generation) {
    compute(ws);
    ws.computed = ws.generation;
  }
  std::memcpy(d, ws.lane[lane].d, sizeof x.d);
}

}  // namespace

void mma_m16n8k16_f32(float* d, const uint32_t* a, const uint32_t* b, bool bf16, Site site) {
  warp_mma(d, a, b, site, [bf16](WarpState& ws) { compute_mma(ws, bf16); });
}

void mma_m16n8k8_tf32_f32(float* d, const uint32_t* a, const uint32_t* b, Site site) {
  warp_mma(d, a, b, site, compute_mma_tf32);
}

uint32_t shfl_u32(unsigned mask, uint32_t value, int src_lane, Site site) {
  if (mask != 0xffffffffu) fail("only full-warp shuffles are emulated (mask %#x)", mask);
  int lane;
  WarpState& ws = my_warp(&lane);
  ws.lane[lane].value = value;
  ws.lane[lane].src = src_lane;
  yield(Wait::kWarp, site);
  if (ws.computed != ws.generation) {
    uint32_t values[kWarp];
    for (int l = 0; l < kWarp; ++l) values[l] = ws.lane[l].value;
    for (int l = 0; l < kWarp; ++l) ws.lane[l].result = values[ws.lane[l].src & (kWarp - 1)];
    ws.computed = ws.generation;
  }
  return ws.lane[lane].result;
}

}  // namespace fastlstm_emu

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}

void __syncthreads(const char* file, int line) {
  using namespace fastlstm_emu;
  if (g_launch == nullptr || g_launch->current == nullptr) fail("__syncthreads outside a kernel");
  yield(Wait::kBlock, Site{file, line});
}

void __syncwarp(unsigned mask, const char* file, int line) {
  using namespace fastlstm_emu;
  if (mask != 0xffffffffu) fail("only full-warp __syncwarp is emulated (mask %#x)", mask);
  int lane;
  my_warp(&lane);
  yield(Wait::kWarp, Site{file, line});
}
