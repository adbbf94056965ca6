// pybind11 module `sstmerge._C`: the C++ CPU kernels. No libtorch: tensors arrive as
// (data_ptr, dtype code, sizes, strides) tuples (see python/sstmerge/ops/_cpp.py); outputs are fp32
// contiguous buffers allocated by the caller. Every function releases the GIL while it runs and
// takes `isa` ("" = the active variant) and `nthreads` (OpenMP threads).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels/amx.h"

namespace py = pybind11;
using TensorSpec = std::tuple<uintptr_t, int, std::vector<int64_t>, std::vector<int64_t>>;

static sstm::Tensor to_tensor(const TensorSpec& spec, int ndim, const char* name) {
  const auto& [ptr, dt, sizes, strides] = spec;
  if (int(sizes.size()) != ndim || int(strides.size()) != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) +
                                " sizes and strides");
  if (dt < 0 || dt > 2) throw std::invalid_argument(std::string(name) + ": bad dtype code");
  sstm::Tensor t;
  t.ptr = reinterpret_cast<const void*>(ptr);
  t.dt = dt;
  t.ndim = ndim;
  for (int i = 0; i < ndim; ++i) {
    if (sizes[i] < 0) throw std::invalid_argument(std::string(name) + ": negative size");
    t.size[i] = sizes[i];
    t.stride[i] = strides[i];
  }
  return t;
}
template <class T>
static T* ptr_of(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sstmerge C++ CPU kernels (OpenMP; ISA variants chosen at run time)";
  m.def("isa", &sstm::active_isa, "The ISA variant the kernels run with on this CPU.");
  m.def("built_isas", &sstm::built_isas, "The ISA variants compiled into this module.");
  m.def(
      "amx_unavailable", [] { return std::string(sstm::amx_unavailable()); },
      "Why the AMX tile kernels (bf16 lora_merge_, avx512 variant) cannot run here; '' if they "
      "can. SSTMERGE_AMX=0 turns them off.");
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["cuda_requested"] = bool(SSTM_CUDA_REQUESTED);  // SSTMERGE_CUDA was not OFF
        d["cuda_built"] = bool(SSTM_CUDA_BUILT);          // a CUDA compiler was found: _C_cuda
        return d;
      },
      "What the build configured: whether CUDA was requested and _C_cuda built.");
  m.def(
      "runnable_isas",
      [] {
        std::vector<std::string> out;
        for (const auto& isa : sstm::built_isas()) {
          try {
            sstm::ops(isa);
            out.push_back(isa);
          } catch (const std::invalid_argument&) {
          }
        }
        return out;
      },
      "The built ISA variants this CPU can run.");

  m.def(
      "diag_fisher_linear",
      [](uintptr_t out, const TensorSpec& x, const TensorSpec& g, uintptr_t mask, int nthreads,
         const std::string& isa) {
        auto tx = to_tensor(x, 3, "x"), tg = to_tensor(g, 3, "g");
        const auto& t = sstm::ops(isa);
        py::gil_scoped_release nogil;
        t.diag_fisher_linear(ptr_of<float>(out), tx, tg, ptr_of<const float>(mask), nthreads);
      },
      py::arg("out"), py::arg("x"), py::arg("g"), py::arg("mask"), py::arg("nthreads"),
      py::arg("isa") = "");
  m.def(
      "subspace_grads",
      [](uintptr_t out, const TensorSpec& x, const TensorSpec& g, const TensorSpec& q_in,
         const TensorSpec& q_out, uintptr_t mask, int nthreads, const std::string& isa) {
        auto tx = to_tensor(x, 3, "x"), tg = to_tensor(g, 3, "g");
        auto qi = to_tensor(q_in, 2, "q_in"), qo = to_tensor(q_out, 2, "q_out");
        const auto& t = sstm::ops(isa);
        py::gil_scoped_release nogil;
        t.subspace_grads(ptr_of<float>(out), tx, tg, qi, qo, ptr_of<const float>(mask), nthreads);
      },
      py::arg("out"), py::arg("x"), py::arg("g"), py::arg("q_in"), py::arg("q_out"),
      py::arg("mask"), py::arg("nthreads"), py::arg("isa") = "");
  m.def(
      "kfac_factor",
      [](uintptr_t out, const TensorSpec& x, uintptr_t mask, std::optional<TensorSpec> q,
         int nthreads, const std::string& isa) {
        auto tx = to_tensor(x, 2, "x");
        sstm::Tensor tq;
        if (q) tq = to_tensor(*q, 2, "q");
        const auto& t = sstm::ops(isa);
        py::gil_scoped_release nogil;
        t.kfac_factor(ptr_of<float>(out), tx, ptr_of<const float>(mask), q ? &tq : nullptr,
                      nthreads);
      },
      py::arg("out"), py::arg("x"), py::arg("mask"), py::arg("q"), py::arg("nthreads"),
      py::arg("isa") = "");
  m.def(
      "kfac_sketch",
      [](uintptr_t out, const TensorSpec& x, const TensorSpec& omega, uintptr_t mask, int nthreads,
         const std::string& isa) {
        auto tx = to_tensor(x, 2, "x"), to = to_tensor(omega, 2, "omega");
        const auto& t = sstm::ops(isa);
        py::gil_scoped_release nogil;
        t.kfac_sketch(ptr_of<float>(out), tx, to, ptr_of<const float>(mask), nthreads);
      },
      py::arg("out"), py::arg("x"), py::arg("omega"), py::arg("mask"), py::arg("nthreads"),
      py::arg("isa") = "");
  m.def(
      "lora_merge_",
      [](const TensorSpec& w, const TensorSpec& b, const TensorSpec& a, double scale, int nthreads,
         const std::string& isa) {
        auto tw = to_tensor(w, 2, "w"), tb = to_tensor(b, 2, "b"), ta = to_tensor(a, 2, "a");
        const auto& t = sstm::ops(isa);
        py::gil_scoped_release nogil;
        t.lora_merge(tw, tb, ta, float(scale), nthreads);
      },
      py::arg("w"), py::arg("b"), py::arg("a"), py::arg("scale"), py::arg("nthreads"),
      py::arg("isa") = "");
}
