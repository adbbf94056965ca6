// Intel AMX (Advanced Matrix Extensions) for the avx512 variant: whether the tile kernels may run
// here, and the tile configuration they load. AMX needs the CPU (CPUID.7.0:EDX bits 22 AMX-BF16
// and 24 AMX-TILE) and Linux's permission for this process to use the tile data state
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; Linux >= 5.16). SSTMERGE_AMX=0 turns the
// tile kernels off (read at each call, so tests can compare both paths in one process).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sstm {

// "" when this process may run AMX-BF16 tile instructions, else the reason it may not.
inline const char* amx_unavailable() {
  static const char* const why = []() -> const char* {
#if defined(__x86_64__) && defined(__linux__) && defined(SYS_arch_prctl)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
      return "the CPU has no AMX-BF16";
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0)
      return "Linux did not grant the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM failed)";
    return "";
#else
    return "AMX kernels are built for x86-64 Linux only";
#endif
  }();
  return why;
}

// The tile kernels run: the CPU and OS allow it and SSTMERGE_AMX is not "0".
inline bool amx_enabled() {
  const char* e = std::getenv("SSTMERGE_AMX");
  if (e && std::strcmp(e, "0") == 0) return false;
  return amx_unavailable()[0] == '\0';
}

// The 64-byte operand of LDTILECFG (palette 1): rows and bytes per row of tiles 0..7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

}  // namespace sstm
