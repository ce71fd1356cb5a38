// genfuse._C: host-side hot paths of the runtime (pybind11, C++17, no torch).
// It holds the paged KV-cache block manager (block_manager.h), the CPU matmul against GGML
// block-quantized weights (quant_matmul.h), and reports its version.
#include <pybind11/pybind11.h>

#ifndef GENFUSE_VERSION
#define GENFUSE_VERSION "unknown"
#endif

namespace py = pybind11;

void register_block_manager(py::module_& m);  // bind_block_manager.cpp
void register_quant_matmul(py::module_& m);   // bind_quant_matmul.cpp
void register_cpu_layer(py::module_& m);      // bind_cpu_layer.cpp

PYBIND11_MODULE(_C, m) {
    m.doc() = "genfuse C++ extension: host-side hot paths of the runtime";
    m.def("version", []() { return std::string(GENFUSE_VERSION); },
          "The genfuse version this extension was built for.");
    m.def("build_info", []() {
        py::dict d;
        d["cxx_standard"] = __cplusplus;
#if defined(__clang__)
        d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
        d["compiler"] = std::string("gcc ") + __VERSION__;
#else
        d["compiler"] = std::string("unknown");
#endif
        return d;
    }, "Compiler and language standard the extension was built with.");
    register_block_manager(m);
    register_quant_matmul(m);
    register_cpu_layer(m);
}
