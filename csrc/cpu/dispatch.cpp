#include "cpu/dispatch.h"

#include <cstdlib>

namespace sstm {
#ifdef SSTM_HAVE_avx512
namespace avx512 { const char* isa_name(); }
#endif
#ifdef SSTM_HAVE_avx2
namespace avx2 { const char* isa_name(); }
#endif
namespace generic { const char* isa_name(); }

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

// SSTMERGE_ISA=generic|avx2|avx512 forces a variant (for tests and benchmarks).
std::string active_isa() {
  const char* forced = std::getenv("SSTMERGE_ISA");
  if (forced && *forced) return forced;
#if defined(SSTM_HAVE_avx512) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return "avx512";
#endif
#if defined(SSTM_HAVE_avx2) && (defined(__x86_64__) || defined(_M_X64))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "generic";
}
}  // namespace sstm
