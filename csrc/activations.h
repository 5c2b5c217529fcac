// InPlace-ABN activation functors (specs/inplace_abn.md §1.4, §1.8), shared by the CPU and CUDA kernels.
//
// For every activation phi: forward y -> z, inverse z -> y, and the derivative dphi/dy written in terms of
// the output z. The branch is decided on the sign of z (equal to the sign of y). The ELU inverse is guarded:
// when z + alpha <= 0 (saturated, log1p would give -inf) the derivative is 0 and the inverse is clamped to a
// finite value, so sum(xhat * dy) never sees -inf * 0 = NaN.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <limits>

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace iabn {

enum class Activation : int { LeakyReLU = 0, ELU = 1, Identity = 2 };

template <typename T>
C10_HOST_DEVICE inline T elu_saturated_input() {
  // log(machine epsilon): the most negative pre-activation whose ELU output is still distinct from -alpha.
  return std::numeric_limits<T>::digits == 24 ? T(-15.942385) : T(-36.043653);
}

struct Identity {
  template <typename T>
  C10_HOST_DEVICE static inline T forward(T y, T) { return y; }
  template <typename T>
  C10_HOST_DEVICE static inline T inverse(T z, T) { return z; }
  template <typename T>
  C10_HOST_DEVICE static inline T derivative(T, T) { return T(1); }
};

struct LeakyReLU {
  template <typename T>
  C10_HOST_DEVICE static inline T forward(T y, T slope) { return y >= T(0) ? y : y * slope; }
  template <typename T>
  C10_HOST_DEVICE static inline T inverse(T z, T slope) { return z >= T(0) ? z : z / slope; }
  template <typename T>
  C10_HOST_DEVICE static inline T derivative(T z, T slope) { return z >= T(0) ? T(1) : slope; }
};

struct ELU {
  template <typename T>
  C10_HOST_DEVICE static inline T forward(T y, T alpha) { return y >= T(0) ? y : alpha * ::expm1(y); }
  template <typename T>
  C10_HOST_DEVICE static inline T inverse(T z, T alpha) {
    if (z >= T(0)) return z;
    return z + alpha > T(0) ? ::log1p(z / alpha) : elu_saturated_input<T>();
  }
  template <typename T>
  C10_HOST_DEVICE static inline T derivative(T z, T alpha) {
    if (z >= T(0)) return T(1);
    return z + alpha > T(0) ? z + alpha : T(0);
  }
};

#if !defined(__CUDACC__)
// Vectorised (at::vec) versions of the same functors for the CPU kernels; lane-wise identical to the above.
template <typename T>
using Vec = at::vec::Vectorized<T>;

struct VecIdentity {
  template <typename T>
  static inline Vec<T> forward(const Vec<T>& y, const Vec<T>&) { return y; }
  template <typename T>
  static inline Vec<T> inverse(const Vec<T>& z, const Vec<T>&) { return z; }
  template <typename T>
  static inline Vec<T> derivative(const Vec<T>&, const Vec<T>&) { return Vec<T>(T(1)); }
};

struct VecLeakyReLU {
  template <typename T>
  static inline Vec<T> forward(const Vec<T>& y, const Vec<T>& slope) {
    return Vec<T>::blendv(y * slope, y, y >= Vec<T>(T(0)));
  }
  template <typename T>
  static inline Vec<T> inverse(const Vec<T>& z, const Vec<T>& slope) {
    return Vec<T>::blendv(z / slope, z, z >= Vec<T>(T(0)));
  }
  template <typename T>
  static inline Vec<T> derivative(const Vec<T>& z, const Vec<T>& slope) {
    return Vec<T>::blendv(slope, Vec<T>(T(1)), z >= Vec<T>(T(0)));
  }
};

struct VecELU {
  template <typename T>
  static inline Vec<T> forward(const Vec<T>& y, const Vec<T>& alpha) {
    return Vec<T>::blendv(alpha * y.expm1(), y, y >= Vec<T>(T(0)));
  }
  template <typename T>
  static inline Vec<T> inverse(const Vec<T>& z, const Vec<T>& alpha) {
    const Vec<T> zero(T(0));
    const Vec<T> neg = Vec<T>::blendv(Vec<T>(elu_saturated_input<T>()), (z / alpha).log1p(), (z + alpha) > zero);
    return Vec<T>::blendv(neg, z, z >= zero);
  }
  template <typename T>
  static inline Vec<T> derivative(const Vec<T>& z, const Vec<T>& alpha) {
    const Vec<T> zero(T(0));
    const Vec<T> neg = Vec<T>::blendv(zero, z + alpha, (z + alpha) > zero);
    return Vec<T>::blendv(neg, Vec<T>(T(1)), z >= zero);
  }
};
#endif

}  // namespace iabn
