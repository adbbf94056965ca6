#include "cpu/dispatch.h"

#include <cstdlib>
#include <stdexcept>

namespace sstm {

#define SSTM_TABLE(NS) \
  OpTable { #NS, &NS::diag_fisher_linear, &NS::subspace_grads, &NS::kfac_factor, &NS::kfac_sketch, \
            &NS::lora_merge }

std::vector<std::string> built_isas() {
  std::vector<std::string> out;
#ifdef SSTM_HAVE_avx512
  out.push_back("avx512");
#endif
#ifdef SSTM_HAVE_avx2
  out.push_back("avx2");
#endif
  out.push_back("generic");
  return out;
}

static bool cpu_runs(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return isa == "generic";
}

static std::string best_isa() {
  for (const auto& isa : built_isas())
    if (cpu_runs(isa)) return isa;
  return "generic";
}

// SSTMERGE_ISA=generic|avx2|avx512 forces a variant (for tests and benchmarks); an unknown or
// unrunnable value is an error at first use, not a silent fallback.
std::string active_isa() {
  static const std::string isa = [] {
    const char* forced = std::getenv("SSTMERGE_ISA");
    return (forced && *forced) ? std::string(forced) : best_isa();
  }();
  return isa;
}

const OpTable& ops(const std::string& want) {
  static const OpTable tables[] = {
#ifdef SSTM_HAVE_avx512
      SSTM_TABLE(avx512),
#endif
#ifdef SSTM_HAVE_avx2
      SSTM_TABLE(avx2),
#endif
      SSTM_TABLE(generic),
  };
  const std::string isa = want.empty() ? active_isa() : want;
  for (const auto& t : tables) {
    if (isa != t.isa) continue;
    if (!cpu_runs(isa))
      throw std::invalid_argument("sstmerge: this CPU cannot run the '" + isa + "' kernels");
    return t;
  }
  std::string built;
  for (const auto& b : built_isas()) built += (built.empty() ? "" : ", ") + b;
  throw std::invalid_argument("sstmerge: no CPU kernel variant '" + isa + "' (built: " + built +
                              "); check SSTMERGE_ISA");
}
}  // namespace sstm
