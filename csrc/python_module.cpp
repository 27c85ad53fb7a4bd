// An empty Python module: importing csq_ext._C loads this library, whose static initializers
// register the operators. The ops are reached as torch.ops.csq_ext.*. Only setup.py builds
// this file; the CMake library is loaded with torch.ops.load_library instead.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
