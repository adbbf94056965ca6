// Host launchers of the CUDA kernels (csrc/cuda/kernels.cu), called by the pybind11 bindings.
// Plain C++ (no CUDA headers), so bindings.cpp compiles with the host compiler. Each launcher
// launches on `stream` (torch's current stream, as an integer) on GPU `device` and returns nullptr
// on success or a message (a refused size or the CUDA error string) that the bindings raise.
#pragma once
#include <cstdint>

#include "common/kernel_args.h"

namespace sstm {

const char* launch_diag_fisher(const FisherArgs& p, int device, uintptr_t stream);
const char* launch_gram(const GramArgs& p, int device, uintptr_t stream);
const char* launch_lora_merge(const MergeArgs& p, int device, uintptr_t stream);

// The GPU architectures the kernels were compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. "800,900").
const char* built_archs();

}  // namespace sstm
