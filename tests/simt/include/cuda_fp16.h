// SIMT harness stand-in for <cuda_fp16.h>: __half with CUDA's conversions (see simt_types.h).
#pragma once
#include "simt_types.h"
