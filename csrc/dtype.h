// The floating dtypes kernels read and write, as a torch-free tag passed from the glue to CPU and CUDA kernels.
#pragma once

namespace blockops {

// kF64 is CPU-only and only for the ops that take it (gradcheck at tiny sizes); the CUDA glue refuses it.
enum class DType { kF32, kF16, kBF16, kF64 };

}  // namespace blockops
