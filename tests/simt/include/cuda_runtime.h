// SIMT harness stand-in for <cuda_runtime.h> (see simt.h).
#pragma once
#include "simt.h"
