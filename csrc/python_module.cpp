// The Python module `ism_ext._C`. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY registrations of ops.cpp, which put the ops in `torch.ops.ism`
// (the pattern of pytorch/extension-cpp). Only setup.py compiles this file; the CMake build makes
// a plain shared library of the same ops for torch.ops.load_library.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ism_ext native ops (torch.ops.ism)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
