// The Python module `ism_ext._C`. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY registrations of ops.cpp, which put the ops in `torch.ops.ism`
// (the pattern of pytorch/extension-cpp). It also exports the constants the Python side must agree
// with (kvcache_constants.h). Only setup.py compiles this file; the CMake build makes a plain shared
// library of the same ops for torch.ops.load_library.
#include <Python.h>

#include "kvcache_constants.h"

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ism_ext native ops (torch.ops.ism)", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "PAGE_SIZE_MULTIPLE", ism::kPageSizeMultiple) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
