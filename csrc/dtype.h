// The floating dtypes kernels read and write, as a torch-free tag passed from the glue to CPU and CUDA kernels.
#pragma once

namespace blockops {

enum class DType { kF32, kF16, kBF16 };

}  // namespace blockops
