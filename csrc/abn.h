// InPlace-ABN operators and kernel entry points (specs/inplace_abn.md §5.3).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <torch/types.h>

#include "activations.h"

namespace iabn {

using at::Tensor;

// View of x as N x C x S. rows == false: planar (NCHW-contiguous, element (n, c, s) at (n*C + c)*S + s).
// rows == true: channels-last or S == 1 (element (r, c) at r*C + c with r over the N*S rows).
struct Geometry {
  int64_t N, C, S;
  bool rows;
};

// Kernels. The per-channel parameter tensors have x's "opmath" dtype (float for float/half/bfloat16, double
// for double) and live on x's device; the reductions return per-channel sums in the accumulation dtype.
//   stats:   (sum(x - k), sum((x - k)^2)) with the per-channel shift k.
//   reduce:  (sum(dy), sum((y - beta) * dy)) with y = phi^-1(z), dy = g * phi'(z).
//   forward: x <- phi(x * p0 + p1), in place.
//   backward: out = p0 * dy + p1 * y + p2.
std::tuple<Tensor, Tensor> stats_cpu(const Tensor& x, const Geometry& g, const Tensor& shift);
std::tuple<Tensor, Tensor> reduce_cpu(const Tensor& z, const Tensor& dz, const Geometry& g, const Tensor& beta,
                                      Activation act, double param);
void forward_cpu(Tensor& x, const Geometry& g, const Tensor& p0, const Tensor& p1, Activation act, double param);
Tensor backward_cpu(const Tensor& z, const Tensor& dz, const Geometry& g, const Tensor& p0, const Tensor& p1,
                    const Tensor& p2, Activation act, double param);

#ifdef WITH_CUDA
std::tuple<Tensor, Tensor> stats_cuda(const Tensor& x, const Geometry& g, const Tensor& shift);
std::tuple<Tensor, Tensor> reduce_cuda(const Tensor& z, const Tensor& dz, const Geometry& g, const Tensor& beta,
                                       Activation act, double param);
void forward_cuda(Tensor& x, const Geometry& g, const Tensor& p0, const Tensor& p1, Activation act, double param);
Tensor backward_cuda(const Tensor& z, const Tensor& dz, const Geometry& g, const Tensor& p0, const Tensor& p1,
                     const Tensor& p2, Activation act, double param);
#endif

// Operators (bound to Python).
std::tuple<Tensor, Tensor, Tensor> statistics(const Tensor& x);
std::tuple<Tensor, Tensor, Tensor> reduce_statistics(const Tensor& all_mean, const Tensor& all_var,
                                                     const Tensor& all_count);
void forward_(Tensor& x, const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
              const std::optional<Tensor>& bias, double eps, const std::string& activation, double param);
std::tuple<Tensor, Tensor> backward_reduce(const Tensor& y_act, const Tensor& dy_act,
                                           const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                           double eps, const std::string& activation, double param);
Tensor backward_elemt(const Tensor& y_act, const Tensor& dy_act, const Tensor& var, const Tensor& count,
                      const Tensor& sum_dy, const Tensor& sum_xhat_dy, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, double eps, const std::string& activation, double param,
                      bool training);

}  // namespace iabn
