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
#include "introspection.h"

namespace blockops {
namespace {

struct Registry {
  std::mutex mutex;
  std::vector<KernelCounter*> counters;
  std::map<std::string, const char* (*)()> families;
};

Registry& registry() {
  static Registry instance;  // function-local: safe to use from other files' static initialisers
  return instance;
}

}  // namespace

KernelCounter::KernelCounter(const char* name) : name_(name) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().counters.push_back(this);
}

FamilyRegistration::FamilyRegistration(const char* name, const char* (*cpu_isa)()) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().families[name] = cpu_isa;
}

std::vector<std::pair<std::string, uint64_t>> kernel_call_counts() {
  std::lock_guard<std::mutex> lock(registry().mutex);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const KernelCounter* c : registry().counters) out.emplace_back(c->name(), c->calls());
  return out;
}

bool cpu_has_avx2_fma() {
#if BLOCKOPS_X86_DISPATCH
  static const bool has = [] {
    const char* forced = std::getenv("BLOCKOPS_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "portable") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if BLOCKOPS_X86_DISPATCH
  static const bool has = [] {
    const char* forced = std::getenv("BLOCKOPS_CPU_ISA");
    if (forced != nullptr && (std::strcmp(forced, "avx2") == 0 || std::strcmp(forced, "portable") == 0)) return false;
    __builtin_cpu_init();
    return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
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

const char* cpu_isa_name() { return cpu_has_avx2_fma() ? "avx2+fma" : "portable"; }

const char* cpu_isa_path() {
  if (cpu_has_avx512_vbmi()) return "avx512-vbmi";
  if (cpu_has_avx512_vnni()) return "avx512-vnni";
  return cpu_has_avx2_fma() ? "avx2" : "portable";
}

std::string build_info_json() {
  // Hand-written JSON: every string below is ours (versions, family names, ISA names), none needs escaping.
  std::string families = "{";
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    bool first = true;
    for (const auto& [name, isa] : registry().families) {
      families += (first ? "\"" : ", \"") + name + "\": \"" + isa() + "\"";
      first = false;
    }
  }
  families += "}";
  std::string json = "{";
  json += "\"version\": \"" BLOCKOPS_VERSION "\", ";
  json += "\"torch_version\": \"" BLOCKOPS_TORCH_VERSION "\", ";
  json += "\"compiler\": \"" BLOCKOPS_CXX_COMPILER "\", ";
  json += std::string("\"cpu_isa\": \"") + cpu_isa_name() + "\", ";
  json += std::string("\"cpu_isa_path\": \"") + cpu_isa_path() + "\", ";
  // BLOCKOPS_CPU_ISA as set (the one value here that is not ours: only letters, digits, '-' and '+' are kept).
  std::string forced;
  for (const char* c = std::getenv("BLOCKOPS_CPU_ISA"); c != nullptr && *c != '\0'; ++c) {
    if (std::isalnum(static_cast<unsigned char>(*c)) || *c == '-' || *c == '+') forced += *c;
  }
  json += "\"cpu_isa_forced\": \"" + forced + "\", ";
#ifdef _OPENMP
  json += "\"cpu_parallel\": \"openmp\", ";
#else
  json += "\"cpu_parallel\": \"none\", ";
#endif
  json += "\"cpu_families\": " + families + ", ";
  json += std::string("\"cuda_compiled\": ") + (BLOCKOPS_CUDA_BUILT ? "true" : "false") + ", ";
  json += "\"cuda_version\": \"" BLOCKOPS_CUDA_VERSION "\", ";
  json += "\"cuda_families\": " BLOCKOPS_CUDA_FAMILY_ARCHS_JSON ", ";
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

PyMethodDef methods[] = {
    {"build_info_json", py_build_info_json, METH_NOARGS, "JSON description of what this build contains."},
    {"kernel_call_counts", py_kernel_call_counts, METH_NOARGS, "Calls per compiled kernel entry point."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "blockops compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
