// The Python module `ism_ext._C`. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY registrations of ops.cpp, which put the ops in `torch.ops.ism`
// (the pattern of pytorch/extension-cpp). It also exports the constants the Python side must agree
// with: the page-size rule (kvcache_constants.h) and the (dtype, head dim) list the CUDA kernels are
// compiled for (cuda/static_switch.h, plain C++, so CPU-only builds export the same list). Only setup.py compiles this file; the CMake build makes a plain shared
// library of the same ops for torch.ops.load_library.
#include <Python.h>

#include <iterator>

#include "cuda/static_switch.h"
#include "kvcache_constants.h"

namespace {

// ("float16", "bfloat16") and (64, 128): the CUDA kernels compile every dtype with every head dim.
int add_kernel_lists(PyObject* module) {
  PyObject* dtypes = PyTuple_New(static_cast<Py_ssize_t>(std::size(ism::cuda::kKernelDtypes)));
  PyObject* head_dims = PyTuple_New(static_cast<Py_ssize_t>(std::size(ism::cuda::kKernelHeadDims)));
  if (dtypes == nullptr || head_dims == nullptr) return -1;
  Py_ssize_t i = 0;
  for (ism::DType d : ism::cuda::kKernelDtypes) {
    PyTuple_SET_ITEM(dtypes, i++, PyUnicode_FromString(ism::cuda::dtype_name(d)));
  }
  i = 0;
  for (int d : ism::cuda::kKernelHeadDims) PyTuple_SET_ITEM(head_dims, i++, PyLong_FromLong(d));
  if (PyModule_AddObject(module, "CUDA_KERNEL_DTYPES", dtypes) != 0) return -1;
  return PyModule_AddObject(module, "CUDA_KERNEL_HEAD_DIMS", head_dims);
}

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ism_ext native ops (torch.ops.ism)", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "PAGE_SIZE_MULTIPLE", ism::kPageSizeMultiple) != 0 ||
      add_kernel_lists(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
