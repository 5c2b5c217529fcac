// InPlace-ABN operators: argument checks, per-channel parameter algebra, device dispatch
// (specs/inplace_abn.md §1.2-1.6, §5.3). The full-size work is done by the *_cpu / *_cuda kernels.
#include "abn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

#include <c10/core/DeviceGuard.h>

namespace iabn {
namespace {

Activation parse_activation(const std::string& name, double param) {
  Activation act;
  if (name == "leaky_relu") {
    act = Activation::LeakyReLU;
  } else if (name == "elu") {
    act = Activation::ELU;
  } else if (name == "identity") {
    act = Activation::Identity;
  } else {
    TORCH_CHECK(false, "InPlace-ABN: unknown activation '", name, "'; choose one of leaky_relu, elu, identity");
  }
  TORCH_CHECK(act == Activation::Identity || param > 0, "InPlace-ABN: activation_param of ", name,
              " must be > 0 (the activation must be invertible), got ", param);
  return act;
}

void check_device_type(const Tensor& x) {
#ifndef WITH_CUDA
  TORCH_CHECK(!x.is_cuda(), "InPlace-ABN: x is a CUDA tensor but the extension was built without CUDA; "
              "run `make build-abn` with nvcc available (CUDA_HOME) to build the CUDA part");
#endif
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "InPlace-ABN: x must be a CPU or CUDA tensor, got device ", x.device());
  if (x.is_cpu()) {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "InPlace-ABN: x on CPU must be float32 or float64, got ", x.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kFloat8_e4m3fn,
                "InPlace-ABN: x must be floating point, got ", x.scalar_type());
  }
}

Geometry geometry(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "InPlace-ABN: ", name, " must have at least 2 dimensions (N, C, ...), got ",
              x.dim());
  Geometry g{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  if (x.is_contiguous()) {
    g.rows = g.S == 1;
  } else if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    g.rows = true;
  } else {
    TORCH_CHECK(false, "InPlace-ABN: ", name, " must be contiguous or channels_last, got strides ", x.strides(),
                " for sizes ", x.sizes(), "; call .contiguous() on it before the layer");
  }
  return g;
}

// The incoming gradient in the same memory layout as the saved output (a copy only when it differs, e.g. an
// expanded gradient from `.sum().backward()`); never written to.
Tensor like_layout(const Tensor& dz, const Tensor& z) {
  if (dz.strides() == z.strides()) return dz;
  if (z.dim() == 4 && !z.is_contiguous()) return dz.contiguous(at::MemoryFormat::ChannelsLast);
  if (z.dim() == 5 && !z.is_contiguous()) return dz.contiguous(at::MemoryFormat::ChannelsLast3d);
  return dz.contiguous();
}

at::ScalarType opmath(const Tensor& x) { return at::toOpMathType(x.scalar_type()); }

void check_channel_tensor(const Tensor& t, const char* name, const Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "InPlace-ABN: ", name, " must have shape [", x.size(1),
              "] (the channels of x), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "InPlace-ABN: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == dtype, "InPlace-ABN: ", name, " must be ", dtype, " for x of dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// gamma = |w| + eps (or 1), beta = b (or 0), in float64 (§1.1).
std::tuple<Tensor, Tensor> affine(const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                  const Tensor& x, double eps) {
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  TORCH_CHECK(has_w == has_b, "InPlace-ABN: weight and bias must be given together (affine) or both be None");
  auto opts = x.options().dtype(at::kDouble);
  if (!has_w) return {at::ones({x.size(1)}, opts), at::zeros({x.size(1)}, opts)};
  check_channel_tensor(*weight, "weight", x, opmath(x));
  check_channel_tensor(*bias, "bias", x, opmath(x));
  return {weight->to(at::kDouble).abs() + eps, bias->to(at::kDouble)};
}

// Makes x's CUDA device current for the kernels and the small ATen ops (tensors on cuda:1 while 0 is current).
struct Guard {
  explicit Guard(const Tensor& x) {
    if (x.is_cuda()) guard.reset_device(x.device());
  }
  c10::OptionalDeviceGuard guard;
};

// Host fast path for CPU tensors: the O(C) parameter algebra in plain loops instead of a dozen tiny ATen ops.
std::vector<double> host(const Tensor& t) {
  std::vector<double> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "inplace_abn_host", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = double(p[i * stride]);
  });
  return out;
}

Tensor from_host(const std::vector<double>& v, const Tensor& like, at::ScalarType dtype) {
  Tensor t = at::empty({int64_t(v.size())}, like.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "inplace_abn_from_host", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

// gamma = |w| + eps (or 1), beta = b (or 0) on the host.
std::pair<std::vector<double>, std::vector<double>> host_affine(const std::optional<Tensor>& weight,
                                                                const std::optional<Tensor>& bias,
                                                                const Tensor& x, double eps) {
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  TORCH_CHECK(has_w == has_b, "InPlace-ABN: weight and bias must be given together (affine) or both be None");
  const int64_t C = x.size(1);
  if (!has_w) return {std::vector<double>(C, 1.0), std::vector<double>(C, 0.0)};
  check_channel_tensor(*weight, "weight", x, opmath(x));
  check_channel_tensor(*bias, "bias", x, opmath(x));
  auto gamma = host(*weight);
  for (auto& g : gamma) g = std::abs(g) + eps;
  return {gamma, host(*bias)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> statistics(const Tensor& x) {
  check_device_type(x);
  const Geometry g = geometry(x, "x");
  Guard guard(x);
  const int64_t m = g.N * g.S;
  auto count = at::full({1}, m, x.options().dtype(at::kLong));
  auto stat_opts = x.options().dtype(opmath(x));
  if (m == 0) return {at::zeros({g.C}, stat_opts), at::zeros({g.C}, stat_opts), count};
  // Shift each channel by its first element: sums of (x - k) and (x - k)^2 do not cancel catastrophically.
  Tensor first = x.select(0, 0);
  while (first.dim() > 1) first = first.select(1, 0);
  Tensor shift = first.to(opmath(x)).contiguous();
  Tensor s1, s2;
#ifdef WITH_CUDA
  if (x.is_cuda()) {
    std::tie(s1, s2) = stats_cuda(x, g, shift);
  } else
#endif
  {
    std::tie(s1, s2) = stats_cpu(x, g, shift);
    auto h1 = host(s1), h2 = host(s2), k = host(shift);
    std::vector<double> mean(g.C), var(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      const double d = h1[c] / double(m);
      mean[c] = k[c] + d;
      var[c] = std::max(h2[c] / double(m) - d * d, 0.0);
    }
    return {from_host(mean, x, opmath(x)), from_host(var, x, opmath(x)), count};
  }
  auto d1 = s1.to(at::kDouble) / double(m);
  auto mean = shift.to(at::kDouble) + d1;
  auto var = (s2.to(at::kDouble) / double(m) - d1 * d1).clamp_min(0.0);
  return {mean.to(opmath(x)), var.to(opmath(x)), count};
}

std::tuple<Tensor, Tensor, Tensor> reduce_statistics(const Tensor& all_mean, const Tensor& all_var,
                                                     const Tensor& all_count) {
  TORCH_CHECK(all_mean.dim() == 2, "InPlace-ABN: all_mean must be [world_size, C], got ", all_mean.sizes());
  TORCH_CHECK(all_var.sizes() == all_mean.sizes(), "InPlace-ABN: all_var must have the shape of all_mean ",
              all_mean.sizes(), ", got ", all_var.sizes());
  TORCH_CHECK(all_count.numel() == all_mean.size(0), "InPlace-ABN: all_count must hold one count per rank (",
              all_mean.size(0), "), got ", all_count.sizes());
  TORCH_CHECK(all_var.device() == all_mean.device() && all_count.device() == all_mean.device(),
              "InPlace-ABN: all_mean, all_var and all_count must be on the same device");
  Guard guard(all_mean);
  // Chan's parallel combination, weighted by count; ranks with count 0 contribute nothing (§5.4).
  auto n = all_count.reshape({-1, 1}).to(at::kDouble);
  auto total = n.sum();
  auto denom = total.clamp_min(1.0);
  auto mean_d = all_mean.to(at::kDouble);
  auto mean = (n * mean_d).sum(0) / denom;
  auto var = (n * (all_var.to(at::kDouble) + (mean_d - mean).pow(2))).sum(0) / denom;
  return {mean.to(all_mean.scalar_type()), var.to(all_mean.scalar_type()),
          total.to(at::kLong).reshape({1})};
}

void forward_(Tensor& x, const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
              const std::optional<Tensor>& bias, double eps, const std::string& activation, double param) {
  check_device_type(x);
  const Geometry g = geometry(x, "x");
  const Activation act = parse_activation(activation, param);
  TORCH_CHECK(eps > 0, "InPlace-ABN: eps must be > 0, got ", eps);
  check_channel_tensor(mean, "mean", x, opmath(x));
  check_channel_tensor(var, "var", x, opmath(x));
  Guard guard(x);
  if (x.is_cpu()) {
    auto [gamma, beta] = host_affine(weight, bias, x, eps);
    auto hm = host(mean), hv = host(var);
    std::vector<double> scale(g.C), shift(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      scale[c] = gamma[c] / std::sqrt(hv[c] + eps);
      shift[c] = beta[c] - hm[c] * scale[c];
    }
    if (x.numel() == 0) return;
    return forward_cpu(x, g, from_host(scale, x, opmath(x)), from_host(shift, x, opmath(x)), act, param);
  }
  auto [gamma, beta] = affine(weight, bias, x, eps);
  auto scale = gamma * (var.to(at::kDouble) + eps).rsqrt();
  auto shift = beta - mean.to(at::kDouble) * scale;
  auto p0 = scale.to(opmath(x)).contiguous();
  auto p1 = shift.to(opmath(x)).contiguous();
  if (x.numel() == 0) return;
#ifdef WITH_CUDA
  if (x.is_cuda()) return forward_cuda(x, g, p0, p1, act, param);
#endif
  forward_cpu(x, g, p0, p1, act, param);
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& y_act, const Tensor& dy_act,
                                           const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                           double eps, const std::string& activation, double param) {
  check_device_type(y_act);
  const Geometry g = geometry(y_act, "y_act");
  const Activation act = parse_activation(activation, param);
  TORCH_CHECK(eps > 0, "InPlace-ABN: eps must be > 0, got ", eps);
  TORCH_CHECK(dy_act.sizes() == y_act.sizes(), "InPlace-ABN: dy_act must have the shape of y_act ",
              y_act.sizes(), ", got ", dy_act.sizes());
  TORCH_CHECK(dy_act.device() == y_act.device() && dy_act.scalar_type() == y_act.scalar_type(),
              "InPlace-ABN: dy_act must have the device and dtype of y_act");
  Guard guard(y_act);
  if (y_act.is_cpu()) {
    auto [gamma, beta] = host_affine(weight, bias, y_act, eps);
    std::vector<double> zeros(g.C, 0.0);
    if (y_act.numel() == 0) return {from_host(zeros, y_act, opmath(y_act)), from_host(zeros, y_act, opmath(y_act))};
    auto [sum_dy, sum_ydy] =
        reduce_cpu(y_act, like_layout(dy_act, y_act), g, from_host(beta, y_act, opmath(y_act)), act, param);
    auto h0 = host(sum_dy), h1 = host(sum_ydy);
    for (int64_t c = 0; c < g.C; ++c) h1[c] /= gamma[c];
    return {from_host(h0, y_act, opmath(y_act)), from_host(h1, y_act, opmath(y_act))};
  }
  auto [gamma, beta] = affine(weight, bias, y_act, eps);
  if (y_act.numel() == 0) {
    auto z = at::zeros({g.C}, y_act.options().dtype(opmath(y_act)));
    return {z, z.clone()};
  }
  Tensor dz = like_layout(dy_act, y_act);
  auto beta_k = beta.to(opmath(y_act)).contiguous();
  Tensor sum_dy, sum_ydy;
#ifdef WITH_CUDA
  if (y_act.is_cuda()) {
    std::tie(sum_dy, sum_ydy) = reduce_cuda(y_act, dz, g, beta_k, act, param);
  } else
#endif
  {
    std::tie(sum_dy, sum_ydy) = reduce_cpu(y_act, dz, g, beta_k, act, param);
  }
  auto sum_xhat_dy = sum_ydy.to(at::kDouble) / gamma;
  return {sum_dy.to(opmath(y_act)), sum_xhat_dy.to(opmath(y_act))};
}

Tensor backward_elemt(const Tensor& y_act, const Tensor& dy_act, const Tensor& var, const Tensor& count,
                      const Tensor& sum_dy, const Tensor& sum_xhat_dy, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, double eps, const std::string& activation, double param,
                      bool training) {
  check_device_type(y_act);
  const Geometry g = geometry(y_act, "y_act");
  const Activation act = parse_activation(activation, param);
  TORCH_CHECK(eps > 0, "InPlace-ABN: eps must be > 0, got ", eps);
  TORCH_CHECK(dy_act.sizes() == y_act.sizes(), "InPlace-ABN: dy_act must have the shape of y_act ",
              y_act.sizes(), ", got ", dy_act.sizes());
  TORCH_CHECK(dy_act.device() == y_act.device() && dy_act.scalar_type() == y_act.scalar_type(),
              "InPlace-ABN: dy_act must have the device and dtype of y_act");
  check_channel_tensor(var, "var", y_act, opmath(y_act));
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kLong,
              "InPlace-ABN: count must be an int64 tensor with one element, got ", count.scalar_type(), " ",
              count.sizes());
  Guard guard(y_act);
  if (y_act.is_cpu()) {
    auto [gamma, beta] = host_affine(weight, bias, y_act, eps);
    auto hv = host(var);
    std::vector<double> k0(g.C), k1(g.C, 0.0), k2(g.C, 0.0);
    for (int64_t c = 0; c < g.C; ++c) k0[c] = gamma[c] / std::sqrt(hv[c] + eps);
    if (training) {
      check_channel_tensor(sum_dy, "sum_dy", y_act, opmath(y_act));
      check_channel_tensor(sum_xhat_dy, "sum_xhat_dy", y_act, opmath(y_act));
      TORCH_CHECK(count.is_cpu(), "InPlace-ABN: count must be on the CPU for a CPU y_act");
      const double m = std::max<double>(1.0, double(count.item<int64_t>()));
      auto h0 = host(sum_dy), h1 = host(sum_xhat_dy);
      for (int64_t c = 0; c < g.C; ++c) {
        const double mdy = h0[c] / m, mxdy = h1[c] / m;
        k1[c] = -k0[c] * mxdy / gamma[c];
        k2[c] = k0[c] * (beta[c] * mxdy / gamma[c] - mdy);
      }
    }
    if (y_act.numel() == 0) return at::empty_like(y_act);
    const auto dt = opmath(y_act);
    return backward_cpu(y_act, like_layout(dy_act, y_act), g, from_host(k0, y_act, dt), from_host(k1, y_act, dt),
                        from_host(k2, y_act, dt), act, param);
  }
  auto [gamma, beta] = affine(weight, bias, y_act, eps);
  auto a = gamma * (var.to(at::kDouble) + eps).rsqrt();
  Tensor p0 = a, p1 = at::zeros_like(a), p2 = at::zeros_like(a);
  if (training) {
    check_channel_tensor(sum_dy, "sum_dy", y_act, opmath(y_act));
    check_channel_tensor(sum_xhat_dy, "sum_xhat_dy", y_act, opmath(y_act));
    // dx = a * (dy - sum_dy/m - xhat * sum_xhat_dy/m), xhat = (y - beta) / gamma (§1.5), as p0*dy + p1*y + p2.
    auto m = count.to(y_act.device()).to(at::kDouble).clamp_min(1.0);
    auto mdy = sum_dy.to(at::kDouble) / m;
    auto mxdy = sum_xhat_dy.to(at::kDouble) / m;
    p1 = -a * mxdy / gamma;
    p2 = a * (beta * mxdy / gamma - mdy);
  }
  Tensor dx;
  if (y_act.numel() == 0) return at::empty_like(y_act);
  Tensor dz = like_layout(dy_act, y_act);
  auto k0 = p0.to(opmath(y_act)).contiguous(), k1 = p1.to(opmath(y_act)).contiguous(),
       k2 = p2.to(opmath(y_act)).contiguous();
#ifdef WITH_CUDA
  if (y_act.is_cuda()) return backward_cuda(y_act, dz, g, k0, k1, k2, act, param);
#endif
  return backward_cpu(y_act, dz, g, k0, k1, k2, act, param);
}

}  // namespace iabn
