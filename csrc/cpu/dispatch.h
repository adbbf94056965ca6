// Run-time choice of the ISA variant of the CPU kernels.
#pragma once
#include <string>
#include <vector>

#include "cpu/ops.h"

namespace sstm {
// The variant the kernels run with: SSTMERGE_ISA (read once, at import) or the best this CPU runs.
std::string active_isa();
std::vector<std::string> built_isas();
// The kernels of variant `isa` ("" = active_isa()); throws std::invalid_argument if it is not
// built or this CPU cannot run it.
const OpTable& ops(const std::string& isa = "");
}  // namespace sstm
