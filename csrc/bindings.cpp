// Python bindings of the InPlace-ABN operators (specs/inplace_abn.md §5.3).
#include <torch/extension.h>

#include "abn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "InPlace-ABN kernels (segkd csrc/)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("statistics", &iabn::statistics, "per-channel (mean, biased var, count int64[1]) of x",
        py::arg("x"));
  m.def("reduce_statistics", &iabn::reduce_statistics, "Chan combination of per-rank statistics",
        py::arg("all_mean"), py::arg("all_var"), py::arg("all_count"));
  m.def("forward_", &iabn::forward_, "in-place normalise + affine (|w|+eps) + activation", py::arg("x"),
        py::arg("mean"), py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("activation"), py::arg("activation_param"));
  m.def("backward_reduce", &iabn::backward_reduce, "(sum_dy, sum_xhat_dy) per channel", py::arg("y_act"),
        py::arg("dy_act"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("activation"),
        py::arg("activation_param"));
  m.def("backward_elemt", &iabn::backward_elemt, "dx (one new tensor)", py::arg("y_act"), py::arg("dy_act"),
        py::arg("var"), py::arg("count"), py::arg("sum_dy"), py::arg("sum_xhat_dy"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("activation"), py::arg("activation_param"),
        py::arg("training"));
}
