// The kernels of crate/core/cuda/kernels.cu compiled for the host, and `emulated_launch`, which
// runs one by name the way cuLaunchKernel does: a grid, threads per block, and an array of
// pointers to the argument values. Each argument's size is checked against the kernel's
// signature, so a launch with the wrong count or width of arguments fails instead of reading
// garbage.
#include "cuda_emulation.h"

#include "../../core/cuda/kernels.cu"

#include <cstdio>
#include <cstring>
#include <thread>
#include <utility>

namespace emulation {

struct Kernel {
    const char* name;
    std::vector<size_t> sizes;
    void (*call)(void** args);
};

template <typename... A, size_t... I>
void call_with(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);
}

template <auto kernel, typename... A>
Kernel entry(const char* name, void (*)(A...)) {
    return Kernel{name, {sizeof(A)...}, [](void** args) { call_with(kernel, args, std::index_sequence_for<A...>{}); }};
}

#define KERNEL(name) entry<name>(#name, name)
#define BOTH(name) KERNEL(name##_f32), KERNEL(name##_bf16)

const std::vector<Kernel>& kernels() {
    static const std::vector<Kernel> all = {
        BOTH(layer_norm_fwd), BOTH(layer_norm_bwd_rows), BOTH(layer_norm_bwd_params), BOTH(softmax_fwd),
        BOTH(softmax_bwd),    BOTH(gelu_fwd),            BOTH(gelu_bwd),              BOTH(add_bias),
        BOTH(scale_columns),  BOTH(sum_rows),       KERNEL(cross_entropy_fwd), KERNEL(cross_entropy_bwd),   KERNEL(adamw_moment),
        KERNEL(adamw_update), KERNEL(ema_update),   KERNEL(resized_cross_entropy_fwd), KERNEL(resized_cross_entropy_bwd),
        KERNEL(resized_argmax), BOTH(im2col_nhwc), KERNEL(im2col_nhwc_x16), BOTH(col2im_nhwc), BOTH(max_pool2_nhwc_fwd), BOTH(max_pool2_nhwc_bwd),
        BOTH(upsample2_nhwc_fwd), BOTH(upsample2_nhwc_bwd), BOTH(row_lookup_bwd),
    };
    return all;
}

}  // namespace emulation

// 0 on success; otherwise writes why into `error` and returns 1.
extern "C" int emulated_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned threads,
                               void** args, const size_t* sizes, size_t count, char* error, size_t error_len) {
    using namespace emulation;
    const Kernel* kernel = nullptr;
    for (const Kernel& k : kernels()) {
        if (std::strcmp(k.name, name) == 0) kernel = &k;
    }
    if (!kernel) {
        std::snprintf(error, error_len, "no kernel named %s", name);
        return 1;
    }
    if (count != kernel->sizes.size()) {
        std::snprintf(error, error_len, "%s takes %zu arguments, got %zu", name, kernel->sizes.size(), count);
        return 1;
    }
    for (size_t i = 0; i < count; i++) {
        if (sizes[i] != kernel->sizes[i]) {
            std::snprintf(error, error_len, "%s: argument %zu is %zu bytes, the kernel takes %zu", name, i, sizes[i],
                          kernel->sizes[i]);
            return 1;
        }
    }
    if (threads == 0 || threads > 1024 || grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_y > 65535 ||
        grid_z > 65535) {
        std::snprintf(error, error_len, "%s: invalid launch of (%u, %u, %u) blocks of %u threads", name, grid_x, grid_y,
                      grid_z, threads);
        return 1;
    }
    // One launch at a time (tests run in parallel): the grid, the current block and the
    // function-static shared arrays are process-wide.
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> lock(one_at_a_time);
    grid_dim = {grid_x, grid_y, grid_z};
    block_dim = {threads, 1, 1};
    // A team of `threads` OS threads runs the blocks in order, meeting at a barrier after each
    // (so a block's shared memory is free before the next block uses it).
    Block current(threads);
    block = &current;
    std::vector<std::thread> team;
    team.reserve(threads);
    for (unsigned t = 0; t < threads; t++) {
        team.emplace_back([=, &current] {
            thread_index = {t, 0, 0};
            for (unsigned z = 0; z < grid_z; z++) {
                for (unsigned y = 0; y < grid_y; y++) {
                    for (unsigned x = 0; x < grid_x; x++) {
                        block_index = {x, y, z};
                        kernel->call(args);
                        current.sync.arrive_and_wait();
                    }
                }
            }
        });
    }
    for (std::thread& t : team) t.join();
    return 0;
}
