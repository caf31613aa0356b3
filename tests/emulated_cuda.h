// Just enough of CUDA to run kernels/selora.cu and selora.cpp on CPU tensors, for machines without a GPU
// (tests/emulated_op.py builds them against this header). A launch runs its blocks one after another, and a
// block's threads as fibers on one OS thread: each runs up to its next __syncthreads, then the next thread
// runs, in an order drawn afresh for every barrier interval (forward or backward over the threads, from a fixed
// seed), so a missing barrier shows as a wrong result. Tiling, shared memory, indexing and reductions behave as
// on the device; timing, races between blocks and the memory model do not. What the device would refuse or
// leave undefined (a bad launch, a barrier not reached by every thread of its block, a misaligned vector
// access, a misaligned or badly strided tensor-core tile) fails the launch.
#pragma once
#include <ATen/ATen.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
using cudaStream_t = void*;

inline dim3 threadIdx, blockIdx, blockDim, gridDim;
using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __shared__ static  // blocks run one at a time, so one copy per kernel instantiation is the block's
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
#define C10_CUDA_CHECK(expr) (expr)

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace c10::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline c10::DeviceIndex current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

// The kernels size their grids by the multiprocessor count: $MINISD_EMULATED_SMS, default 132 (an H100).
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  const char* sms = std::getenv("MINISD_EMULATED_SMS");
  *value = sms ? std::atoi(sms) : 132;
  return 0;
}

// A fault inside a kernel (where the device would stop with an error) is recorded, and the launch fails.
inline std::string fault_message;
inline void emulated_fault(const std::string& message) {
  if (fault_message.empty()) fault_message = message;
}

// The sources' reinterpret_casts are rewritten to this one: a pointer cast to a type that its address is not
// aligned for (a 16-byte vector load from an odd row, say) is a misaligned-address fault on the device. The
// access then goes to a scratch object instead (the host's aligned vector instructions would crash on it).
template <typename To, typename From>
To emulated_aligned_cast(From from) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using Pointee = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<Pointee>) {
      const std::uintptr_t offset = reinterpret_cast<std::uintptr_t>(from) % alignof(Pointee);
      if (offset != 0) {
        emulated_fault("misaligned address: " + std::to_string(alignof(Pointee)) + "-byte aligned access at " +
                       std::to_string(offset) + " bytes past a boundary");
        alignas(Pointee) static unsigned char scratch[sizeof(Pointee)];
        return reinterpret_cast<To>(scratch);
      }
    }
  }
  return reinterpret_cast<To>(from);
}

// The threads of the block being run: a fiber each, switched at __syncthreads.
struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done;
};
inline constexpr size_t kFiberStack = 256 * 1024;
inline ucontext_t scheduler_context;
inline std::vector<Fiber> fibers;
inline unsigned running = 0;                   // the fiber now running
inline const std::function<void()>* block_body = nullptr;

inline void __syncthreads() { swapcontext(&fibers[running].context, &scheduler_context); }

inline void fiber_main() {
  (*block_body)();
  fibers[running].done = true;  // returning resumes the scheduler (uc_link)
}

inline void set_thread_index(unsigned t) {
  threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
}

// Runs one block: every thread up to its next barrier, round after round, until all have returned.
inline void run_block(const std::function<void()>& body, unsigned threads, uint64_t& seed) {
  block_body = &body;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kFiberStack;
    f.context.uc_link = &scheduler_context;
    f.done = false;
    makecontext(&f.context, fiber_main, 0);
  }
  for (unsigned finished = 0; finished < threads;) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    const bool backward = seed >> 63;
    for (unsigned i = 0; i < threads; ++i) {
      running = backward ? threads - 1 - i : i;
      if (fibers[running].done) continue;
      set_thread_index(running);
      swapcontext(&scheduler_context, &fibers[running].context);
    }
    finished = 0;
    for (unsigned t = 0; t < threads; ++t) finished += fibers[t].done;
    if (finished != 0 && finished != threads) {
      emulated_fault("__syncthreads reached by " + std::to_string(threads - finished) + " of the " +
                     std::to_string(threads) + " threads of block (" + std::to_string(blockIdx.x) + ", " +
                     std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) + ")");
      return;  // the waiting fibers are abandoned; their stacks are reset by the next block
    }
  }
}

// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` is rewritten to
// `emulate_launch(grid, block, shared_bytes, stream, kernel, args...)`.
template <typename Kernel, typename... Args>
void emulate_launch(dim3 grid, dim3 block, size_t, cudaStream_t, Kernel kernel, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  // What the device would refuse to launch (cudaErrorInvalidConfiguration).
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64, "emulated launch: invalid block (", block.x, ", ",
              block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "emulated launch: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  gridDim = grid;
  blockDim = block;
  fault_message.clear();
  while (fibers.size() < threads) fibers.push_back(Fiber{{}, std::make_unique<char[]>(kFiberStack), true});
  const std::function<void()> body = [&] { kernel(args...); };
  uint64_t seed = 0x5e10a;
  for (unsigned z = 0; z < grid.z && fault_message.empty(); ++z)
    for (unsigned y = 0; y < grid.y && fault_message.empty(); ++y)
      for (unsigned x = 0; x < grid.x && fault_message.empty(); ++x) {
        blockIdx = dim3(x, y, z);
        run_block(body, threads, seed);
      }
  TORCH_CHECK(fault_message.empty(), "emulated kernel fault: ", fault_message);
}

// Warp matrix operations (<mma.h>) for 16×16×16 tiles. Which lane holds which element of a fragment is
// unspecified on the device; here accumulator element i of lane l is tile element (37·(32i + l) + 11) mod 256,
// a scrambled order, so code that assumed any particular mapping would compute wrong results. Matrix A and B
// fragments hold the whole tile in every lane and offer no element access at all (code touching their elements
// depends on the device's layout: it does not compile here). Products are exact in fp32 (the inputs are
// fp16/bf16) and accumulate in fp32, in an order of their own, as on the device.
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline int lane_id() {
  if (blockDim.y != 1 || blockDim.z != 1 || blockDim.x % 32 != 0) emulated_fault("emulated wmma needs whole 1-D warps");
  return static_cast<int>(threadIdx.x % 32);
}

inline int element_position(int lane, int i) { return (37 * (32 * i + lane) + 11) % 256; }

template <typename T>
bool valid_tile(const T* p, unsigned ldm, const char* what) {
  const unsigned multiple = sizeof(T) == 2 ? 8 : 4;  // elements
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || ldm % multiple != 0) {
    emulated_fault(std::string(what) + ": the tile pointer must be 32-byte aligned and ldm a multiple of " +
                   std::to_string(multiple) + " elements, got ldm " + std::to_string(ldm));
    return false;
  }
  return true;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment;

template <typename T, typename Layout>
class fragment<matrix_a, 16, 16, 16, T, Layout> {
 public:
  float tile[16][16];  // [m][k]
};

template <typename T, typename Layout>
class fragment<matrix_b, 16, 16, 16, T, Layout> {
 public:
  float tile[16][16];  // [k][n]
};

template <typename T>
class fragment<accumulator, 16, 16, 16, T, void> {
 public:
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& a, const T* p, unsigned ldm) {
  if (!valid_tile(p, ldm, "wmma::load_matrix_sync")) return;
  constexpr bool row_major_layout = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) a.tile[r][c] = static_cast<float>(row_major_layout ? p[r * ldm + c] : p[r + c * ldm]);
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T value) {
  for (T& v : f.x) v = value;
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  if (!valid_tile(p, ldm, "wmma::store_matrix_sync")) return;
  const int lane = lane_id();
  for (int i = 0; i < f.num_elements; ++i) {
    const int r = element_position(lane, i) / 16, c = element_position(lane, i) % 16;
    p[layout == mem_row_major ? r * ldm + c : r + c * ldm] = f.x[i];
  }
}

template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  const int lane = lane_id();
  for (int i = 0; i < d.num_elements; ++i) {
    const int r = element_position(lane, i) / 16, n = element_position(lane, i) % 16;
    float sum = c.x[i];
    for (int k = 0; k < 16; ++k) sum += a.tile[r][k] * b.tile[k][n];
    d.x[i] = sum;
  }
}
}  // namespace nvcuda::wmma
