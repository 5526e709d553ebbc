// The Python module of one CPU build (fastlstm._cpu_<isa>, see setup.py): importing it loads this
// library, whose static registrations (TORCH_LIBRARY_IMPL in lstm_cpu.cpp) install the CPU kernels.
// fastlstm/_loader.py imports exactly one of these, the best this CPU can run.
#include <Python.h>

#define FASTLSTM_STR2(x) #x
#define FASTLSTM_STR(x) FASTLSTM_STR2(x)
#define FASTLSTM_CAT2(a, b) a##b
#define FASTLSTM_CAT(a, b) FASTLSTM_CAT2(a, b)

PyMODINIT_FUNC FASTLSTM_CAT(PyInit_, FASTLSTM_CPU_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FASTLSTM_STR(FASTLSTM_CPU_MODULE),
                                          nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
