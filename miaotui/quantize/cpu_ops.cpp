// The operators miaotui's CPU kernels register as torch.ops.miaotui_cpu.* (fake shapes in cpu_kernels.py).
#include "cpu_common.h"

TORCH_LIBRARY(miaotui_cpu, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor sz, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor w, Tensor sz, int group_size) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int8_dequantize(Tensor q, Tensor scale) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui_cpu, CPU, m) {
  m.impl("int4_mm", &miaotui_cpu::int4_mm);
  m.impl("int4_dequantize", &miaotui_cpu::int4_dequantize);
  m.impl("int8_mm", &miaotui_cpu::int8_mm);
  m.impl("int8_dequantize", &miaotui_cpu::int8_dequantize);
  m.impl("w8a8_mm", &miaotui_cpu::w8a8_mm);
}
