// at::ScalarType <-> DType for the torch-facing glue. Call only after the op's dtype checks.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "dtype.h"

namespace blockops {

inline DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_INTERNAL_ASSERT(false, "a dtype check let an unsupported dtype through: ", s);
  }
}

inline at::ScalarType scalar_type_of(DType t) {
  switch (t) {
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

}  // namespace blockops
