// Just enough of CUDA to run kernels/selora.cu and selora.cpp on CPU tensors, for machines without a GPU
// (tests/emulated_op.py builds them against this header). A launch runs its blocks one after another, the
// block's threads as std::threads that meet at a barrier for __syncthreads, so tiling, shared memory,
// indexing and reductions behave as on the device; timing, races between blocks and the memory model do not.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <barrier>
#include <cstdlib>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
using cudaStream_t = void*;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
using std::max;
using std::min;

#define __global__
#define __launch_bounds__(threads)
#define __shared__ static  // blocks run one at a time, so one copy per kernel instantiation is the block's
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
#define C10_CUDA_CHECK(expr) (expr)

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

// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` is rewritten to
// `emulate_launch(grid, block, shared_bytes, stream, kernel, args...)`. One std::thread per thread of a block
// runs every block in turn, all meeting at a barrier after each: the next block reuses the shared memory.
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
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            barrier.arrive_and_wait();
          }
    });
  for (std::thread& thread : pool) thread.join();
}
