// The SIMT harness runtime: fibers, the block scheduler, barriers, warp operations, launches and
// the runtime API subset the kernels and cuda_dispatch.cpp call. See include/simt.h for the model.
#include "simt.h"

#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define SIMT_TSAN 1
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif
// The harness's own bookkeeping (thread states, requests, results) is handed between a fiber and the
// scheduler without TSan-visible synchronisation (fiber switches are no_sync so that the kernel's
// threads stay unordered): those functions are not instrumented.
#ifdef SIMT_TSAN
#define SIMT_NOTSAN __attribute__((no_sanitize_thread))
#else
#define SIMT_NOTSAN
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

// The section every static __shared__ variable lives in (one copy per OS thread); this anchor makes
// sure it exists.
__shared__ char simt_shared_anchor;
extern "C" char __start_simt_shared[];
extern "C" char __stop_simt_shared[];

// Fiber context switch. On x86-64 a minimal switch of the callee-saved registers (no signal-mask
// system call, unlike swapcontext: the harness switches at every barrier and warp operation);
// elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void simt_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl simt_switch
.type simt_switch,@function
simt_switch:
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
.size simt_switch,.-simt_switch
.section .note.GNU-stack,"",@progbits
.text
)");
namespace simt {
struct Context {
  void* sp = nullptr;
};
SIMT_NOTSAN inline void context_switch(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }
SIMT_NOTSAN inline void context_make(Context& c, char* stack, size_t size, void (*entry)()) {
  // The frame simt_switch pops: mxcsr + x87 control word, six registers, then `entry` as the
  // return address; above it a null return address for `entry` (which never returns).
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(entry);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  top[-9] = 0x1f80u | (uint64_t{0x037f} << 32);
  c.sp = top - 9;
}
}  // namespace simt
#else
namespace simt {
struct Context {
  ucontext_t uc{};
};
SIMT_NOTSAN inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
SIMT_NOTSAN inline void context_make(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
}  // namespace simt
#endif

namespace simt {

enum class St : uint8_t { kReady, kBarrier, kWarp, kDone };

struct WarpReq {
  int kind = -1;  // ShflKind, or -1 for a wmma call / __syncwarp
  unsigned mask = 0;
  uint64_t bits = 0;
  int arg = 0, width = 32;
  const char* what = "";
  const void* ptr = nullptr;
  int64_t ldm = 0;
};

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
  int group;  // the number of groups committed before it was issued
};

struct Thread {
  uint3 tid{};
  int linear = 0;
  Block* block = nullptr;
  St st = St::kReady;
  const char* file = "";
  int line = 0;
  WarpReq req;
  uint64_t result = 0;
  Context ctx;
  char* stack = nullptr;
  size_t stack_size = 0;
  void* tsan_fiber = nullptr;
  std::vector<AsyncCopy> copies;  // cp.async copies issued and not yet waited for
  int committed = 0;              // cp.async groups committed so far
};

struct Block {
  uint3 bid{};
  dim3 bdim, gdim;
  std::vector<Thread> threads;
  char* dyn = nullptr;
  size_t dyn_bytes = 0;
  Context sched;
  void* tsan_sched = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool failed = false;
  std::string error;
  char* shared_base = nullptr;  // this OS thread's copy of the static shared section
  size_t shared_size = 0;
  long bar_gen = 0;
  char sync_start = 0, sync_end = 0, sync_bar[2] = {0, 0};
};

namespace {

thread_local Thread* g_cur = nullptr;
thread_local cudaError_t g_last = cudaSuccess;

std::mutex g_mutex;  // guards everything below
std::string g_message;
std::map<const void*, int> g_max_dyn;
std::map<std::string, long> g_launches;
std::vector<char*> g_stacks;  // free fiber stacks (with a guard page below each)
std::atomic<long> g_blocks{0}, g_threads{0}, g_barriers{0}, g_warp_ops{0};
std::atomic<int> g_sm_count{0}, g_optin{0}, g_workers{0};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}
int sm_count() { return g_sm_count.load() > 0 ? g_sm_count.load() : env_int("SIMT_SM_COUNT", 8); }
int smem_optin() { return g_optin.load() > 0 ? g_optin.load() : env_int("SIMT_SMEM_OPTIN", 232448); }
int workers() { return g_workers.load() > 0 ? g_workers.load() : env_int("SIMT_WORKERS", 2); }

#if defined(SIMT_ASAN) || defined(SIMT_TSAN)
constexpr size_t kStack = 192 * 1024;
#else
constexpr size_t kStack = 128 * 1024;
#endif
constexpr size_t kGuard = 4096;

char* get_stack() {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_stacks.empty()) {
      char* s = g_stacks.back();
      g_stacks.pop_back();
      return s;
    }
  }
  void* p = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "simt: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(p, kGuard, PROT_NONE);  // a stack overflow faults instead of corrupting its neighbour
  return static_cast<char*>(p) + kGuard;
}
void put_stack(char* s) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_stacks.push_back(s);
}

// This OS thread's copy of the static shared memory section.
struct SharedRange {
  char* base = nullptr;
  size_t size = 0;
};
int find_tls(dl_phdr_info* info, size_t, void* data) {
  auto* out = static_cast<SharedRange*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_TLS) continue;
    char* lo = reinterpret_cast<char*>(info->dlpi_addr + ph.p_vaddr);
    if (__start_simt_shared >= lo && __start_simt_shared < lo + ph.p_memsz && info->dlpi_tls_data) {
      out->base = static_cast<char*>(info->dlpi_tls_data) + (__start_simt_shared - lo);
      out->size = static_cast<size_t>(__stop_simt_shared - __start_simt_shared);
      return 1;
    }
  }
  return 0;
}
// Offset of the static shared section's start below the anchor variable within any thread's TLS
// block (the same for every thread), found once from this thread's copy.
ptrdiff_t shared_anchor_offset() {
  static const ptrdiff_t delta = [] {
    volatile char touch = simt_shared_anchor;  // allocates this module's TLS block in this thread
    (void)touch;
    SharedRange range;
    dl_iterate_phdr(find_tls, &range);
    if (!range.base) {
      std::fprintf(stderr, "simt: cannot find the static shared memory section\n");
      std::abort();
    }
    return const_cast<char*>(&simt_shared_anchor) - range.base;
  }();
  return delta;
}

void set_error(cudaError_t e, const std::string& msg) {
  g_last = e;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_message = msg;
}

// ---------------------------------------------------------------------------------------- fibers
SIMT_NOTSAN void to_fiber(Block& b, Thread& t) {
  g_cur = &t;
#ifdef SIMT_TSAN
  __tsan_switch_to_fiber(t.tsan_fiber, 1 /* no_sync: barriers are the only edges */);
#endif
#ifdef SIMT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, t.stack_size);
#endif
  context_switch(b.sched, t.ctx);
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

SIMT_NOTSAN void to_scheduler(Thread& t, bool exiting) {
  Block& b = *t.block;
#ifdef SIMT_TSAN
  __tsan_switch_to_fiber(b.tsan_sched, 1);
#endif
#ifdef SIMT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, b.sched_bottom, b.sched_size);
#else
  (void)exiting;
#endif
  context_switch(t.ctx, b.sched);
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_cur = &t;
}

SIMT_NOTSAN void fiber_entry() {
  Thread& t = *g_cur;
  Block& b = *t.block;
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_bottom, &b.sched_size);
#endif
#ifdef SIMT_TSAN
  __tsan_acquire(&b.sync_start);
#endif
  b.body(b.ctx);
  if (!t.copies.empty())
    fail("exits with %zu cp.async copies never waited for (cp.async.wait_group)", t.copies.size());
  t.st = St::kDone;
#ifdef SIMT_TSAN
  __tsan_release(&b.sync_end);
#endif
  to_scheduler(t, true);
  std::abort();  // never resumed
}

std::string site(const Thread& t) { return std::string(t.file) + ":" + std::to_string(t.line); }

std::string where(const Block& b, const Thread& t) {
  char s[160];
  std::snprintf(s, sizeof s, "block (%u,%u,%u) thread (%u,%u,%u)", b.bid.x, b.bid.y, b.bid.z, t.tid.x, t.tid.y,
                t.tid.z);
  return s;
}

SIMT_NOTSAN void block_fail(Block& b, const std::string& msg) {
  if (!b.failed) {
    b.failed = true;
    b.error = msg;
  }
}

// A warp's waiting lanes: completes every group whose mask is fully present at one call site.
// Returns whether any group completed; reports misuse on the block.
SIMT_NOTSAN bool resolve_warp(Block& b, int warp) {
  const int n = static_cast<int>(b.threads.size());
  const int base = warp * 32, lanes = std::min(32, n - base);
  bool progress = false;
  unsigned handled = 0;
  for (int f = 0; f < lanes; ++f) {
    Thread& first = b.threads[base + f];
    if (first.st != St::kWarp || (handled >> f & 1u)) continue;
    const WarpReq& r = first.req;
    if (!(r.mask >> f & 1u)) {
      block_fail(b, "simt: " + where(b, first) + " calls " + r.what + " at " + site(first) +
                        " with a mask that does not include its own lane");
      return false;
    }
    bool ready = true;
    for (int l = 0; l < 32; ++l) {
      if (!(r.mask >> l & 1u)) continue;
      if (l >= lanes) {
        block_fail(b, "simt: " + where(b, first) + ": " + r.what + " at " + site(first) + " names lane " +
                          std::to_string(l) + ", which the block does not have");
        return false;
      }
      Thread& o = b.threads[base + l];
      if (o.st == St::kWarp && o.file == first.file && o.line == first.line && o.req.mask == r.mask) continue;
      if (o.st == St::kWarp && o.req.mask != r.mask && o.file == first.file && o.line == first.line) {
        block_fail(b, std::string("simt: ") + r.what + " at " + site(first) + ": lanes of warp " +
                          std::to_string(warp) + " pass different masks");
        return false;
      }
      ready = false;
      const char* state = o.st == St::kDone      ? "has exited"
                          : o.st == St::kBarrier ? "waits at __syncthreads"
                                                 : "waits at another warp operation";
      block_fail(b, "simt: divergent warp operation: " + where(b, first) + " waits in " + r.what + " at " +
                        site(first) + " for lane " + std::to_string(l) + ", which " + state +
                        (o.st == St::kDone ? "" : " (" + site(o) + ")"));
      return false;
    }
    if (!ready) continue;
    g_warp_ops.fetch_add(1, std::memory_order_relaxed);
    for (int l = 0; l < 32; ++l) {
      if (!(r.mask >> l & 1u)) continue;
      Thread& o = b.threads[base + l];
      if (r.kind < 0 && o.req.ptr != r.ptr) {
        block_fail(b, std::string("simt: ") + r.what + " at " + site(first) + ": lanes of warp " +
                          std::to_string(warp) + " pass different pointers (the call must be warp-uniform)");
        return false;
      }
      if (r.kind < 0 && o.req.ldm != r.ldm) {
        block_fail(b, std::string("simt: ") + r.what + " at " + site(first) + ": lanes pass different ldm");
        return false;
      }
      if (r.kind >= 0) {
        const int w = o.req.width, seg = (l / w) * w;
        int src = l;
        switch (o.req.kind) {
          case kIdx: src = seg + ((o.req.arg % w) + w) % w; break;
          case kUp: src = l - o.req.arg >= seg ? l - o.req.arg : l; break;
          case kDown: src = l + o.req.arg < seg + w ? l + o.req.arg : l; break;
          default: src = (l ^ o.req.arg) < seg + w ? (l ^ o.req.arg) : l; break;
        }
        if (src < 0 || src >= 32 || !(r.mask >> src & 1u)) {
          block_fail(b, "simt: " + where(b, o) + ": " + r.what + " at " + site(o) + " reads lane " +
                            std::to_string(src) + ", which is not in the mask");
          return false;
        }
        o.result = b.threads[base + src].req.bits;
      }
    }
    for (int l = 0; l < 32; ++l)
      if (r.mask >> l & 1u) {
        b.threads[base + l].st = St::kReady;
        handled |= 1u << l;
      }
    progress = true;
  }
  return progress;
}

SIMT_NOTSAN void run_block(Block& b, SharedRange shared) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    t.tid = {i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y)};
    t.block = &b;
    t.st = St::kReady;
    t.copies.clear();
    t.committed = 0;
#ifdef SIMT_ASAN
    // A fiber that left its kernel through fail() or a previous launch's frames leave redzones on
    // the reused stack; the new fiber starts from a clean one.
    __asan_unpoison_memory_region(t.stack, t.stack_size);
#endif
    context_make(t.ctx, t.stack, t.stack_size, fiber_entry);
  }
  // Unwritten shared memory reads as NaN in every float type (and as -1 in integers).
  if (b.dyn_bytes) std::memset(b.dyn, 0xff, b.dyn_bytes);
  if (shared.size) std::memset(shared.base, 0xff, shared.size);
  b.bar_gen = 0;
  b.failed = false;
  b.shared_base = shared.base;
  b.shared_size = shared.size;
#ifdef SIMT_TSAN
  __tsan_release(&b.sync_start);
#endif
  const int warps = (n + 31) / 32;
  while (!b.failed) {
    for (Thread& t : b.threads) {
      if (t.st != St::kReady) continue;
      to_fiber(b, t);
      if (b.failed) break;
    }
    if (b.failed) break;
    bool progress = false;
    for (int w = 0; w < warps && !b.failed; ++w) progress |= resolve_warp(b, w);
    if (b.failed || progress) continue;
    const Thread* at = nullptr;
    bool divergent = false;
    for (const Thread& t : b.threads) {
      if (t.st != St::kBarrier) continue;
      if (!at) at = &t;
      else if (t.file != at->file || t.line != at->line) divergent = true;
    }
    if (!at) break;  // every thread has exited
    if (divergent) {
      std::string msg = "simt: divergent __syncthreads in block (" + std::to_string(b.bid.x) + "," +
                        std::to_string(b.bid.y) + "," + std::to_string(b.bid.z) + "): ";
      std::map<std::string, int> sites;
      for (const Thread& t : b.threads)
        if (t.st == St::kBarrier) ++sites[site(t)];
      for (const auto& [s, count] : sites) msg += std::to_string(count) + " threads at " + s + "; ";
      block_fail(b, msg + "a barrier must be reached by every thread of the block that has not exited");
      break;
    }
    g_barriers.fetch_add(1, std::memory_order_relaxed);
    ++b.bar_gen;
    for (Thread& t : b.threads)
      if (t.st == St::kBarrier) t.st = St::kReady;
  }
#ifdef SIMT_TSAN
  __tsan_acquire(&b.sync_end);
#endif
}

}  // namespace

// ---------------------------------------------------------------------------------------- device side
Thread* current() { return g_cur; }

[[noreturn]] SIMT_NOTSAN void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  Thread* t = g_cur;
  if (!t) {
    std::fprintf(stderr, "simt: %s (outside a kernel)\n", buf);
    std::abort();
  }
  block_fail(*t->block, std::string("simt: ") + where(*t->block, *t) + ": " + buf);
#ifdef SIMT_TSAN
  __tsan_release(&t->block->sync_end);  // the scheduler reads the message after acquiring this
#endif
  to_scheduler(*t, true);
  std::abort();
}

SIMT_NOTSAN static Thread& in_kernel(const char* what) {
  Thread* t = g_cur;
  if (!t) {
    std::fprintf(stderr, "simt: %s used outside a kernel\n", what);
    std::abort();
  }
  return *t;
}

SIMT_NOTSAN const uint3& thread_idx() { return in_kernel("threadIdx").tid; }
SIMT_NOTSAN const uint3& block_idx() { return in_kernel("blockIdx").block->bid; }
SIMT_NOTSAN const dim3& block_dim() { return in_kernel("blockDim").block->bdim; }
SIMT_NOTSAN const dim3& grid_dim() { return in_kernel("gridDim").block->gdim; }
SIMT_NOTSAN int lane_id() { return in_kernel("a warp operation").linear % 32; }

SIMT_NOTSAN void* dynamic_shared(size_t align) {
  Thread& t = in_kernel("dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(t.block->dyn) % align) fail("dynamic shared memory is not %zu-byte aligned", align);
  return t.block->dyn;
}

SIMT_NOTSAN void syncthreads(const char* file, int line) {
  Thread& t = in_kernel("__syncthreads");
  Block& b = *t.block;
  t.st = St::kBarrier;
  t.file = file;
  t.line = line;
#ifdef SIMT_TSAN
  __tsan_release(&b.sync_bar[b.bar_gen & 1]);
#endif
  to_scheduler(t, false);
#ifdef SIMT_TSAN
  __tsan_acquire(&b.sync_bar[(b.bar_gen - 1) & 1]);
#else
  (void)b;
#endif
}

SIMT_NOTSAN static uint64_t warp_wait(Thread& t, const WarpReq& r, const char* file, int line) {
  t.st = St::kWarp;
  t.req = r;
  t.file = file;
  t.line = line;
  to_scheduler(t, false);
  return t.result;
}

SIMT_NOTSAN void syncwarp(unsigned mask, const char* file, int line) {
  Thread& t = in_kernel("__syncwarp");
  WarpReq r;
  r.mask = mask;
  r.what = "__syncwarp";
  warp_wait(t, r, file, line);
}

SIMT_NOTSAN uint64_t shfl(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Thread& t = in_kernel("__shfl_*_sync");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("__shfl_*_sync at %s:%d: width %d is not a power of 2 <= 32", file, line, width);
  WarpReq r;
  r.kind = kind;
  r.mask = mask;
  r.bits = bits;
  r.arg = arg;
  r.width = width;
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  r.what = names[kind & 3];
  return warp_wait(t, r, file, line);
}

SIMT_NOTSAN void wmma_op(const char* what, const void* ptr, int64_t ldm_bytes, const char* file, int line) {
  Thread& t = in_kernel(what);
  if (ptr) {
    if (reinterpret_cast<uintptr_t>(ptr) % 32)
      fail("%s at %s:%d: the pointer %p is not 256-bit (32-byte) aligned", what, file, line, ptr);
    if (ldm_bytes <= 0 || ldm_bytes % 16)
      fail("%s at %s:%d: ldm of %lld bytes is not a positive multiple of 16 bytes (8 half or 4 float elements)",
           what, file, line, static_cast<long long>(ldm_bytes));
  }
  if (t.block->threads.size() < static_cast<size_t>((t.linear / 32 + 1) * 32))
    fail("%s at %s:%d: a wmma call needs all 32 lanes of the warp, the block's last warp is partial", what, file, line);
  WarpReq r;
  r.mask = 0xffffffffu;
  r.what = what;
  r.ptr = ptr;
  r.ldm = ldm_bytes;
  warp_wait(t, r, file, line);
}

// cp.async: the destination is poisoned (0xff) when the copy is issued, since on a GPU it may land
// at any moment until the wait, and the copy (src_bytes bytes, zeros up to 16) is carried out when
// a wait covers its group: shared memory read before the wait shows NaN, and a copy issued into a
// buffer other threads still read is a write TSan orders against their reads. Instrumented, so
// TSan and ASan see the copy's accesses as the issuing thread's.
void cp_async16(void* dst, const void* src, int src_bytes, const char* file, int line) {
  Thread& t = in_kernel("cp.async");
  const Block& b = *t.block;
  auto* d = static_cast<char*>(dst);
  const bool in_dyn = d >= b.dyn && d + 16 <= b.dyn + b.dyn_bytes;
  const bool in_static = d >= b.shared_base && d + 16 <= b.shared_base + b.shared_size;
  if (!in_dyn && !in_static) fail("cp.async at %s:%d: the destination %p is not in shared memory", file, line, dst);
  if (reinterpret_cast<uintptr_t>(dst) % 16)
    fail("cp.async at %s:%d: the shared memory address %p is not 16-byte aligned", file, line, dst);
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async at %s:%d: src-size %d is not in [0, 16]", file, line, src_bytes);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16)
    fail("cp.async at %s:%d: the global address %p is not 16-byte aligned", file, line, src);
  std::memset(dst, 0xff, 16);  // undefined until the wait: whoever reads it before sees NaN
  t.copies.push_back({dst, src, src_bytes, t.committed});
}

void cp_async_commit() { ++in_kernel("cp.async.commit_group").committed; }

void cp_async_wait(int pending, const char* file, int line) {
  Thread& t = in_kernel("cp.async.wait_group");
  if (pending < 0) fail("cp.async.wait_group at %s:%d: %d groups", file, line, pending);
  std::vector<AsyncCopy> keep;
  for (const AsyncCopy& c : t.copies) {
    if (c.group < t.committed - pending) {
      auto* d = static_cast<unsigned char*>(c.dst);
      if (c.bytes) std::memcpy(d, c.src, static_cast<size_t>(c.bytes));
      std::memset(d + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
    } else {
      keep.push_back(c);
    }
  }
  t.copies.swap(keep);
}

// ---------------------------------------------------------------------------------------- host side
cudaError_t set_max_dynamic_smem(const void* func, int bytes) {
  if (bytes < 0 || bytes > smem_optin()) {
    set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: cudaFuncAttributeMaxDynamicSharedMemorySize " +
                                         std::to_string(bytes) + " is above the device's opt-in limit " +
                                         std::to_string(smem_optin()));
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_dyn[func] = bytes;
  return cudaSuccess;
}

cudaError_t launch(const void* func, const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   void (*body)(void*), void* ctx) {
  if (g_cur) fail("%s launched from inside a kernel (dynamic parallelism is not modelled)", name);
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  std::string bad;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    bad = "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
          ") is not a valid block size (at most 1024 threads, z <= 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    bad = "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
          ") is not a valid grid (x < 2^31, y and z <= 65535, none 0)";
  if (!bad.empty()) {
    set_error(cudaErrorInvalidConfiguration, std::string("launch of ") + name + ": " + bad);
    return g_last;
  }
  int limit = 48 * 1024;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    const auto it = g_max_dyn.find(func);
    if (it != g_max_dyn.end()) limit = it->second;
    ++g_launches[name];
  }
  if (smem > static_cast<size_t>(limit)) {
    set_error(cudaErrorInvalidValue, std::string("launch of ") + name + ": " + std::to_string(smem) +
                                         " bytes of dynamic shared memory, above the kernel's limit of " +
                                         std::to_string(limit) +
                                         " (raise it with cudaFuncAttributeMaxDynamicSharedMemorySize)");
    return g_last;
  }
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const int W = static_cast<int>(std::min<uint64_t>(std::max(1, workers()), blocks));
  std::vector<std::string> errors(W);
  std::atomic<bool> stop{false};
  // Everything a worker uses is set up here, on the launching thread, and torn down after all
  // workers joined: nothing passes between workers while they run (a stack or a sync object
  // handed from one to another, e.g. through the stack pool's mutex or a reused thread stack, would
  // order one worker's blocks after another's and hide races between them). TSan fibers likewise:
  // it reuses the ids of destroyed fibers.
  std::vector<Block> pool_blocks(W);
  std::vector<std::vector<char>> arenas(W);
  for (int w = 0; w < W; ++w) {
    Block& b = pool_blocks[w];
    b.bdim = block;
    b.gdim = grid;
    b.body = body;
    b.ctx = ctx;
    b.threads.resize(threads);
    for (Thread& t : b.threads) {
      t.stack = get_stack();
      t.stack_size = kStack;
#ifdef SIMT_TSAN
      t.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
    b.dyn_bytes = smem;
    arenas[w].resize(smem + 256);
    b.dyn = arenas[w].data() + (256 - reinterpret_cast<uintptr_t>(arenas[w].data()) % 256) % 256;
  }
  const ptrdiff_t shared_delta = shared_anchor_offset();
  auto work = [&](int w) {
    Block& b = pool_blocks[w];
#ifdef SIMT_TSAN
    b.tsan_sched = __tsan_get_current_fiber();
#endif
    // This OS thread's copy of the static shared section.
    const SharedRange shared{const_cast<char*>(&simt_shared_anchor) - shared_delta,
                             static_cast<size_t>(__stop_simt_shared - __start_simt_shared)};
    for (uint64_t i = static_cast<uint64_t>(w); i < blocks && !stop.load(); i += static_cast<uint64_t>(W)) {
      b.bid = {static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
               static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y))};
      run_block(b, shared);
      g_blocks.fetch_add(1, std::memory_order_relaxed);
      g_threads.fetch_add(static_cast<long>(threads), std::memory_order_relaxed);
      if (b.failed) {
        errors[w] = b.error;
        stop.store(true);
        break;
      }
    }
  };
  if (W == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int w = 0; w < W; ++w) pool.emplace_back(work, w);
    for (auto& t : pool) t.join();
  }
  for (Block& b : pool_blocks)
    for (Thread& t : b.threads) {
      if (!b.failed) put_stack(t.stack);  // a failed block's fibers stay suspended on theirs
#ifdef SIMT_TSAN
      __tsan_destroy_fiber(t.tsan_fiber);
#endif
    }
  for (const std::string& e : errors) {
    if (e.empty()) continue;
    std::fprintf(stderr, "%s (in %s)\n", e.c_str(), name);
    set_error(cudaErrorLaunchFailure, e + " (in " + name + ")");
    if (env_int("SIMT_ABORT", 0)) std::abort();
    return g_last;
  }
  return cudaSuccess;
}

}  // namespace simt

// ---------------------------------------------------------------------------------------- runtime API
cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::g_last;
  simt::g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return simt::g_last; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  thread_local std::string s;
  std::lock_guard<std::mutex> lock(simt::g_mutex);
  s = std::string(cudaGetErrorName(e)) + ": " + simt::g_message;
  return s.c_str();
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device > 0) return cudaErrorInvalidValue;  // one emulated GPU (a CPU tensor's index is -1)
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = simt::sm_count(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = simt::smem_optin(); return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches run to completion
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  *stream = nullptr;  // one in-order queue: every launch has finished when it returns
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }

// ---------------------------------------------------------------------------------------- test controls
// Plain C entry points so that tests (ctypes) can set the emulated device and read counters.
extern "C" {
__attribute__((visibility("default"))) void simt_configure(int sm_count, int smem_optin, int workers) {
  simt::g_sm_count.store(sm_count);
  simt::g_optin.store(smem_optin);
  simt::g_workers.store(workers);
}
// Counters since the start: [launches, blocks, threads, barriers, warp operations].
__attribute__((visibility("default"))) void simt_counters(long* out) {
  long launches = 0;
  {
    std::lock_guard<std::mutex> lock(simt::g_mutex);
    for (const auto& kv : simt::g_launches) launches += kv.second;
  }
  out[0] = launches;
  out[1] = simt::g_blocks.load();
  out[2] = simt::g_threads.load();
  out[3] = simt::g_barriers.load();
  out[4] = simt::g_warp_ops.load();
}
// Launches so far of kernels whose name (as written at the launch site) starts with `prefix`.
__attribute__((visibility("default"))) long simt_launches(const char* prefix) {
  std::lock_guard<std::mutex> lock(simt::g_mutex);
  long n = 0;
  for (const auto& kv : simt::g_launches)
    if (kv.first.rfind(prefix, 0) == 0) n += kv.second;
  return n;
}
}
