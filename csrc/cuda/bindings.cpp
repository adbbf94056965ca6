// pybind11 module `sstmerge._C_cuda`: the CUDA kernels. No libtorch: tensors arrive as data
// pointers (integers), sizes, strides and dtype codes, plus the GPU index and torch's current CUDA
// stream as an integer (see python/sstmerge/ops/_cuda.py). A refused or failed launch raises
// RuntimeError with the reason.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/kernel_args.h"
#include "cuda/launch.h"

namespace py = pybind11;

namespace {

using Strides2 = std::array<int64_t, 2>;
using Strides3 = std::array<int64_t, 3>;

void check_dtype(const char* what, int dt) {
  if (!sstm::valid_dtype(dt))
    throw std::invalid_argument(std::string("sstmerge._C_cuda: unknown dtype code ") +
                                std::to_string(dt) + " for " + what);
}

void raise_if(const char* op, const char* err) {
  if (err) throw std::runtime_error(std::string("sstmerge._C_cuda.") + op + ": " + err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sstmerge CUDA kernels (raw pointers, strides, dtype codes, torch's current stream)";

  m.def(
      "diag_fisher_linear",
      [](uintptr_t x, Strides3 xs, uintptr_t g, Strides3 gs, int dt, uintptr_t mask, Strides2 ms,
         int64_t B, int64_t T, int64_t I, int64_t O, uintptr_t out, int device, uintptr_t stream) {
        check_dtype("x/g", dt);
        const auto p = sstm::fisher_args(x, xs.data(), g, gs.data(), dt, mask, ms.data(), B, T, I,
                                         O, out);
        raise_if("diag_fisher_linear", sstm::launch_diag_fisher(p, device, stream));
      },
      py::arg("x"), py::arg("x_strides"), py::arg("g"), py::arg("g_strides"), py::arg("dtype"),
      py::arg("mask"), py::arg("mask_strides"), py::arg("B"), py::arg("T"), py::arg("I"),
      py::arg("O"), py::arg("out"), py::arg("device"), py::arg("stream"),
      "out[O, I] (fp32, contiguous) = sum_b G_b * G_b, G_b = sum_t mask[b,t] g[b,t]^T x[b,t]; "
      "mask = 0 for none, else fp32 [B, T].");

  m.def(
      "gram",
      [](uintptr_t a, int a_dt, Strides3 as, uintptr_t b, int b_dt, Strides3 bs, uintptr_t w,
         Strides2 ws, int64_t batch, int64_t rows, int64_t M, int64_t L, int64_t rows_per_split,
         int64_t splits, bool symmetric, uintptr_t out, int device, uintptr_t stream) {
        check_dtype("a", a_dt);
        check_dtype("b", b_dt);
        const auto p = sstm::gram_args(a, a_dt, as.data(), b, b_dt, bs.data(), w, ws.data(), batch,
                                       rows, M, L, rows_per_split, splits, symmetric, out);
        raise_if("gram", sstm::launch_gram(p, device, stream));
      },
      py::arg("a"), py::arg("a_dtype"), py::arg("a_strides"), py::arg("b"), py::arg("b_dtype"),
      py::arg("b_strides"), py::arg("w"), py::arg("w_strides"), py::arg("batch"), py::arg("rows"),
      py::arg("M"), py::arg("L"), py::arg("rows_per_split"), py::arg("splits"),
      py::arg("symmetric"), py::arg("out"), py::arg("device"), py::arg("stream"),
      "out[n*splits + s] (fp32 [M, L] each, contiguous) = sum over the rows r of split s of "
      "w[n, r] a[n, r, :]^T b[n, r, :]; strides are (batch, row, col); w = 0 for none.");

  m.def(
      "lora_merge_",
      [](uintptr_t w, int w_dt, Strides2 wst, uintptr_t b, Strides2 bs, uintptr_t a, Strides2 as,
         int ab_dt, int64_t O, int64_t I, int64_t K, double scale, int device, uintptr_t stream) {
        check_dtype("w", w_dt);
        check_dtype("a/b", ab_dt);
        const auto p = sstm::merge_args(w, w_dt, wst.data(), b, bs.data(), a, as.data(), ab_dt, O,
                                        I, K, scale);
        raise_if("lora_merge_", sstm::launch_lora_merge(p, device, stream));
      },
      py::arg("w"), py::arg("w_dtype"), py::arg("w_strides"), py::arg("b"), py::arg("b_strides"),
      py::arg("a"), py::arg("a_strides"), py::arg("ab_dtype"), py::arg("O"), py::arg("I"),
      py::arg("K"), py::arg("scale"), py::arg("device"), py::arg("stream"),
      "In place w[O, I] <- round(w + scale * b[O, K] @ a[K, I]), the product in fp32.");

  m.def("built_archs", &sstm::built_archs,
        "GPU architectures compiled in (nvcc's __CUDA_ARCH_LIST__, e.g. '800,900').");
}
