// Run-time choice of the ISA variant of the CPU kernels.
#pragma once
#include <string>
#include <vector>

namespace sstm {
std::string active_isa();
std::vector<std::string> built_isas();
}  // namespace sstm
