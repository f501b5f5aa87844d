// Runs CUDA kernels on the host, for tests on machines without a GPU: every thread of a block
// is an OS thread, so __syncthreads and warp shuffles are real barriers and the kernels' own
// indexing and reductions are what gets tested. Blocks run one after another, so a function-
// static array serves as a block's __shared__ memory (and launches run one at a time). Only what kernels.cu uses is provided.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#define __global__
#define __device__

// CUDA's 16-byte vector type (the vectorised copies).
struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
#define __forceinline__ inline
#define __shared__ static

namespace emulation {

struct Index {
    unsigned x, y, z;
};

struct Block {
    explicit Block(unsigned threads) : sync(threads), exchange(threads) {
        for (unsigned w = 0; w < (threads + 31) / 32; w++) warps.push_back(std::make_unique<std::barrier<>>(32));
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> exchange;  // one slot per thread, for shuffles
};

inline thread_local Index thread_index, block_index;
inline Index block_dim, grid_dim;
inline Block* block;
inline std::mutex atomics;

}  // namespace emulation

#define threadIdx (emulation::thread_index)
#define blockIdx (emulation::block_index)
#define blockDim (emulation::block_dim)
#define gridDim (emulation::grid_dim)

using std::min;

inline void __syncthreads() { emulation::block->sync.arrive_and_wait(); }

// All 32 lanes of the warp must take part (kernels.cu only shuffles with full masks).
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    emulation::Block& b = *emulation::block;
    const unsigned t = threadIdx.x;
    std::barrier<>& warp = *b.warps[t / 32];
    b.exchange[t] = v;
    warp.arrive_and_wait();
    const float other = b.exchange[(t & ~31u) | ((t & 31u) ^ unsigned(lane_mask))];
    warp.arrive_and_wait();  // nobody overwrites a slot before its reader has read it
    return other;
}

inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask) {
    float bits;
    std::memcpy(&bits, &v, sizeof v);
    bits = __shfl_xor_sync(mask, bits, lane_mask);
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

inline float atomicAdd(float* address, float v) {
    std::lock_guard<std::mutex> lock(emulation::atomics);
    const float old = *address;
    *address = old + v;
    return old;
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
