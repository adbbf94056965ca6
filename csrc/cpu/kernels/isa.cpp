// Compiled once per ISA (see CMakeLists.txt): reports which variant this object file is.
#define SSTM_STR2(x) #x
#define SSTM_STR(x) SSTM_STR2(x)
namespace sstm { namespace SSTM_ISA {
const char* isa_name() { return SSTM_STR(SSTM_ISA); }
}}  // namespace sstm::SSTM_ISA
