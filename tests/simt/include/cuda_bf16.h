// SIMT harness stand-in for <cuda_bf16.h>: __nv_bfloat16 with CUDA's conversions (see simt_types.h).
#pragma once
#include "simt_types.h"
