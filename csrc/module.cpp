// The Python module blockops._C. Importing it loads this shared library, whose static initialisers register
// every op with the dispatcher (TORCH_LIBRARY in ops.cpp, TORCH_LIBRARY_IMPL in each kernel's file). It
// exposes two plain functions through the CPython API (no pybind11, so no link to libtorch_python):
//   build_info_json() -> str        what was built, see blockops.build_info()
//   kernel_call_counts() -> dict    calls per compiled kernel entry point
#include <Python.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "build_config.h"
#include "cpu_features.h"
#include "cuda_arch.h"
#include "introspection.h"

namespace blockops {
namespace {

struct Registry {
  std::mutex mutex;
  std::vector<KernelCounter*> counters;
  std::map<std::string, const char* (*)()> families;  // family -> its CPU kernels' ISA in this process
  std::map<std::string, std::string> op_families;       // op -> family (ops.cpp)
};

Registry& registry() {
  static Registry instance;  // function-local: safe to use from other files' static initialisers
  return instance;
}

}  // namespace

KernelCounter::KernelCounter(const char* family, const char* name) : family_(family), name_(name) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().counters.push_back(this);
}

FamilyRegistration::FamilyRegistration(const char* name, const char* (*cpu_isa)()) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().families[name] = cpu_isa;
}

void register_op_family(const std::string& op, const char* family) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().op_families[op] = family;
}

std::string op_family(const std::string& op) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  const auto it = registry().op_families.find(op);
  return it == registry().op_families.end() ? std::string() : it->second;
}

std::vector<std::pair<std::string, uint64_t>> kernel_call_counts() {
  std::lock_guard<std::mutex> lock(registry().mutex);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const KernelCounter* c : registry().counters) out.emplace_back(c->name(), c->calls());
  return out;
}

#if BLOCKOPS_X86_DISPATCH
namespace {
// How far BLOCKOPS_CPU_ISA lets the detectors below go: 0 "portable" (no SIMD path), 1 "avx2" (what an AVX2-only
// CPU runs: no AVX-512, no bf16 dot products), 2 anything else (what the CPU has). Read once.
int isa_cap() {
  static const int cap = [] {
    const char* forced = std::getenv("BLOCKOPS_CPU_ISA");
    if (forced == nullptr) return 2;
    return std::strcmp(forced, "portable") == 0 ? 0 : std::strcmp(forced, "avx2") == 0 ? 1 : 2;
  }();
  return cap;
}
}  // namespace
#endif

bool cpu_has_avx2_fma() {
#if BLOCKOPS_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if BLOCKOPS_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return isa_cap() >= 2 && cpu_has_avx2_fma() && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_vbmi() {
#if BLOCKOPS_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx512_vnni() && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_bf16_gemm() {
#if BLOCKOPS_X86_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return isa_cap() >= 2 && (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"));
  }();
  return has;
#else
  return false;   // other architectures: fp32 GEMM for bf16 activations (the safe default)
#endif
}

const char* cpu_isa_name() { return cpu_has_avx2_fma() ? "avx2+fma" : "portable"; }

const char* cpu_isa_path() {
  if (cpu_has_avx512_vbmi()) return "avx512-vbmi";
  if (cpu_has_avx512_vnni()) return "avx512-vnni";
  return cpu_has_avx2_fma() ? "avx2" : "portable";
}

const std::vector<CudaFamilyBuild>& cuda_family_builds() {
  static const std::vector<CudaFamilyBuild> builds = {BLOCKOPS_CUDA_FAMILY_TABLE};
  return builds;
}

const CudaFamilyBuild* find_cuda_family(const std::string& family) {
  for (const CudaFamilyBuild& b : cuda_family_builds()) {
    if (family == b.family) return &b;
  }
  return nullptr;
}

const std::vector<std::string>& hopper_kernel_families() {
  static const std::vector<std::string> families = {"attention", "lowbit"};
  return families;
}

bool hopper_kernels_built(const std::string& family) {
#if defined(BLOCKOPS_HAVE_CUTE)
  const CudaFamilyBuild* build = find_cuda_family(family);
  if (build == nullptr) return false;
  bool listed = false;
  for (const std::string& f : hopper_kernel_families()) listed = listed || f == family;
  if (!listed) return false;
  for (const cuda_arch::Arch& a : cuda_arch::parse(build->archs)) {
    if (a.major == 9 && a.minor == 0 && a.suffix == 'a') return true;
  }
#else
  (void)family;
#endif
  return false;
}

std::string cuda_build_summary() {
  if (!BLOCKOPS_CUDA_BUILT) {
    return "this build of blockops has no CUDA kernels (built without a CUDA toolkit or with BLOCKOPS_CUDA=0)";
  }
  return std::string("CUDA architectures requested for this build: \"") + BLOCKOPS_CUDA_REQUESTED_ARCHS +
         "\"; the kernels need " + BLOCKOPS_CUDA_MIN_ARCH + " or newer";
}

namespace {

// Hand-written JSON: every string below is ours (versions, family and op names, architectures), none needs
// escaping; BLOCKOPS_CPU_ISA is filtered.
std::string quoted(const std::string& s) { return "\"" + s + "\""; }

// "8.0;9.0a" -> ["8.0", "9.0a"]
std::string arch_list(const std::string& archs) {
  std::string out = "[";
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find(';', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) out += (out.size() > 1 ? ", " : "") + quoted(archs.substr(start, end - start));
    start = end + 1;
  }
  return out + "]";
}

template <typename Map, typename Value>
std::string object(const Map& map, Value&& value) {
  std::string out = "{";
  for (const auto& [key, v] : map) out += (out.size() > 1 ? ", " : "") + quoted(key) + ": " + value(v);
  return out + "}";
}

}  // namespace

std::string build_info_json() {
  std::map<std::string, std::string> cpu_families, op_families, counter_families, cuda_archs, cuda_ptx;
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    for (const auto& [name, isa] : registry().families) cpu_families[name] = isa();
    op_families = registry().op_families;
    for (const KernelCounter* c : registry().counters) counter_families[c->name()] = c->family();
  }
  for (const CudaFamilyBuild& b : cuda_family_builds()) {
    cuda_archs[b.family] = b.archs;
    cuda_ptx[b.family] = b.ptx;
  }
  // BLOCKOPS_CPU_ISA as set (the one value here that is not ours: only letters, digits, '-' and '+' are kept).
  std::string forced;
  for (const char* c = std::getenv("BLOCKOPS_CPU_ISA"); c != nullptr && *c != '\0'; ++c) {
    if (std::isalnum(static_cast<unsigned char>(*c)) || *c == '-' || *c == '+') forced += *c;
  }
#ifdef _OPENMP
  const char* parallel = "openmp";
#else
  const char* parallel = "none";
#endif
  std::string json = "{";
  json += "\"version\": \"" BLOCKOPS_VERSION "\", ";
  json += "\"torch_version\": \"" BLOCKOPS_TORCH_VERSION "\", ";
  json += "\"compiler\": \"" BLOCKOPS_CXX_COMPILER "\", ";
  json += "\"cpu_isa\": " + quoted(cpu_isa_name()) + ", ";
  json += "\"cpu_isa_path\": " + quoted(cpu_isa_path()) + ", ";
  json += "\"cpu_isa_forced\": " + quoted(forced) + ", ";
  json += std::string("\"cpu_bf16_gemm\": ") + (cpu_has_bf16_gemm() ? "true" : "false") + ", ";
  json += "\"cpu_parallel\": " + quoted(parallel) + ", ";
  json += "\"cpu_families\": " + object(cpu_families, quoted) + ", ";
  json += std::string("\"cuda_compiled\": ") + (BLOCKOPS_CUDA_BUILT ? "true" : "false") + ", ";
  json += "\"cuda_version\": \"" BLOCKOPS_CUDA_VERSION "\", ";
  json += "\"cuda_requested_archs\": " + arch_list(BLOCKOPS_CUDA_REQUESTED_ARCHS) + ", ";
  json += "\"cuda_families\": " + object(cuda_archs, arch_list) + ", ";
  json += "\"cuda_ptx\": " + object(cuda_ptx, arch_list) + ", ";
  json += "\"ops\": " + object(op_families, quoted) + ", ";
  json += "\"kernel_counters\": " + object(counter_families, quoted) + ", ";
  std::map<std::string, bool> hopper;
  for (const std::string& f : hopper_kernel_families()) hopper[f] = hopper_kernels_built(f);
  json += "\"hopper_kernels\": " + object(hopper, [](bool b) { return std::string(b ? "true" : "false"); }) + ", ";
  json += "\"cutlass_include\": \"" BLOCKOPS_CUTLASS_INCLUDE "\"";
  json += "}";
  return json;
}

}  // namespace blockops

namespace {

PyObject* py_build_info_json(PyObject*, PyObject*) {
  return PyUnicode_FromString(blockops::build_info_json().c_str());
}

PyObject* py_kernel_call_counts(PyObject*, PyObject*) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& [name, calls] : blockops::kernel_call_counts()) {
    PyObject* value = PyLong_FromUnsignedLongLong(calls);
    if (value == nullptr || PyDict_SetItemString(dict, name.c_str(), value) != 0) {
      Py_XDECREF(value);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return dict;
}

// cuda_kernel_image(family, major, minor) -> str | None: the kernel image of `family` in this build that a GPU of
// compute capability major.minor would run ("sm_80", "compute_80", or "" for none); None when the family has no
// CUDA kernels in this build. Lets the tests check KernelGuard's rules without a GPU.
PyObject* py_cuda_kernel_image(PyObject*, PyObject* args) {
  const char* family = nullptr;
  int major = 0, minor = 0;
  if (!PyArg_ParseTuple(args, "sii", &family, &major, &minor)) return nullptr;
  const blockops::CudaFamilyBuild* build = blockops::find_cuda_family(family);
  if (build == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(blockops::cuda_arch::kernel_image(build->archs, build->ptx, major, minor).c_str());
}

PyMethodDef methods[] = {
    {"build_info_json", py_build_info_json, METH_NOARGS, "JSON description of what this build contains."},
    {"kernel_call_counts", py_kernel_call_counts, METH_NOARGS, "Calls per compiled kernel entry point."},
    {"cuda_kernel_image", py_cuda_kernel_image, METH_VARARGS,
     "The kernel image of a family a GPU of the given compute capability would run."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "blockops compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
