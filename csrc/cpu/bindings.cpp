// pybind11 module `sstmerge._C`: the C++ CPU kernels. No libtorch: tensors arrive as data pointers
// (integers), sizes, strides and dtype codes (see python/sstmerge/ops/_cpp.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include <vector>

#include "cpu/dispatch.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sstmerge C++ CPU kernels (OpenMP; ISA variants chosen at run time)";
  m.def("isa", &sstm::active_isa, "The ISA variant the kernels run with on this CPU.");
  m.def("built_isas", &sstm::built_isas, "The ISA variants compiled into this module.");
}
