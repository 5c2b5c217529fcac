// InPlace-ABN CUDA kernels (specs/inplace_abn.md §5.3): float, double, half, bfloat16 inputs with float (double
// for double) accumulation; planar (NCHW) and rows (channels_last / 2-D) layouts. Reductions run on a 2-D grid
// (channels x slices) and a combine step so small-C / large-S inputs fill the GPU; statistics use Welford with
// Chan merges; backward_reduce produces only two per-channel sums; element-wise passes are fused.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "abn.h"

namespace iabn {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsX = 32;  // channels per block in the rows layout
constexpr int kRowsY = 8;   // rows per block in the rows layout

template <typename acc_t>
struct WelfordAcc {
  acc_t mean, m2;
  int64_t n;
};

template <typename acc_t>
struct Welford {
  using Acc = WelfordAcc<acc_t>;
  __device__ Acc init() const { return {acc_t(0), acc_t(0), 0}; }
  __device__ void update(Acc& s, acc_t a, acc_t, acc_t) const {
    s.n += 1;
    const acc_t d = a - s.mean;
    s.mean += d / acc_t(s.n);
    s.m2 += d * (a - s.mean);
  }
  __device__ Acc merge(const Acc& x, const Acc& y) const {
    const int64_t n = x.n + y.n;
    if (n == 0) return x;
    const acc_t d = y.mean - x.mean;
    const acc_t fy = acc_t(y.n) / acc_t(n);
    return {x.mean + d * fy, x.m2 + y.m2 + d * d * acc_t(x.n) * fy, n};
  }
  __device__ Acc shfl_down(const Acc& s, int offset) const {
    return {__shfl_down_sync(0xffffffffu, s.mean, offset), __shfl_down_sync(0xffffffffu, s.m2, offset),
            static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(s.n), offset))};
  }
  // Shifted sums (sum(x - k), sum((x - k)^2)) expected by the operator layer.
  __device__ void finish(const Acc& s, acc_t k, acc_t& o0, acc_t& o1) const {
    const acc_t d = s.mean - k;
    o0 = acc_t(s.n) * d;
    o1 = s.m2 + acc_t(s.n) * d * d;
  }
};

template <typename acc_t>
struct PairAcc {
  acc_t s0, s1;
};

// (sum(dy), sum((y - beta) * dy)) with y = phi^-1(z), dy = g * phi'(z).
template <typename acc_t, typename Act>
struct BackwardSums {
  using Acc = PairAcc<acc_t>;
  acc_t param;
  __device__ Acc init() const { return {acc_t(0), acc_t(0)}; }
  __device__ void update(Acc& s, acc_t z, acc_t g, acc_t beta) const {
    const acc_t dy = g * Act::derivative(z, param);
    s.s0 += dy;
    s.s1 += (Act::inverse(z, param) - beta) * dy;
  }
  __device__ Acc merge(const Acc& x, const Acc& y) const { return {x.s0 + y.s0, x.s1 + y.s1}; }
  __device__ Acc shfl_down(const Acc& s, int offset) const {
    return {__shfl_down_sync(0xffffffffu, s.s0, offset), __shfl_down_sync(0xffffffffu, s.s1, offset)};
  }
  __device__ void finish(const Acc& s, acc_t, acc_t& o0, acc_t& o1) const {
    o0 = s.s0;
    o1 = s.s1;
  }
};

template <typename R>
__device__ typename R::Acc block_reduce(typename R::Acc acc, const R& r) {
  __shared__ typename R::Acc shared[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) acc = r.merge(acc, r.shfl_down(acc, offset));
  if (lane == 0) shared[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? shared[lane] : r.init();
    for (int offset = 16; offset > 0; offset /= 2) acc = r.merge(acc, r.shfl_down(acc, offset));
  }
  return acc;
}

// Planar layout: block (c, slice) reduces every G-th run of kThreads elements of channel c.
template <typename scalar_t, typename acc_t, typename R>
__global__ void reduce_planar_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                     const acc_t* __restrict__ param, int64_t N, int64_t C, int64_t S, R r,
                                     typename R::Acc* __restrict__ partial) {
  const int64_t c = blockIdx.x, G = gridDim.y, m = N * S;
  const acc_t pc = param[c];
  typename R::Acc acc = r.init();
  for (int64_t i = int64_t(blockIdx.y) * kThreads + threadIdx.x; i < m; i += G * kThreads) {
    const int64_t n = i / S, idx = (n * C + c) * S + (i - n * S);
    r.update(acc, static_cast<acc_t>(a[idx]), static_cast<acc_t>(b[idx]), pc);
  }
  acc = block_reduce(acc, r);
  if (threadIdx.x == 0) partial[c * G + blockIdx.y] = acc;
}

// Rows layout: block (kRowsX channels) x (kRowsY rows), coalesced over the contiguous channel dimension.
template <typename scalar_t, typename acc_t, typename R>
__global__ void reduce_rows_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   const acc_t* __restrict__ param, int64_t rows, int64_t C, R r,
                                   typename R::Acc* __restrict__ partial) {
  __shared__ typename R::Acc shared[kRowsY][kRowsX];
  const int64_t c = int64_t(blockIdx.x) * kRowsX + threadIdx.x, G = gridDim.y;
  typename R::Acc acc = r.init();
  if (c < C) {
    const acc_t pc = param[c];
    for (int64_t row = int64_t(blockIdx.y) * kRowsY + threadIdx.y; row < rows; row += G * kRowsY) {
      const int64_t idx = row * C + c;
      r.update(acc, static_cast<acc_t>(a[idx]), static_cast<acc_t>(b[idx]), pc);
    }
  }
  shared[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kRowsY; ++k) acc = r.merge(acc, shared[k][threadIdx.x]);
    partial[c * G + blockIdx.y] = acc;
  }
}

template <typename acc_t, typename R>
__global__ void combine_kernel(const typename R::Acc* __restrict__ partial, int64_t G, int64_t C, R r,
                               const acc_t* __restrict__ param, acc_t* __restrict__ out0,
                               acc_t* __restrict__ out1) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    typename R::Acc acc = r.init();
    for (int64_t g = 0; g < G; ++g) acc = r.merge(acc, partial[c * G + g]);
    r.finish(acc, param[c], out0[c], out1[c]);
  }
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename scalar_t, typename R>
std::tuple<Tensor, Tensor> reduce(const Tensor& a, const Tensor& b, const Tensor& param, const Geometry& geo,
                                  const R& r) {
  using acc_t = at::acc_type<scalar_t, true>;
  using Acc = typename R::Acc;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = int64_t(num_sms()) * 4;
  int64_t G;
  dim3 grid, block;
  if (geo.rows) {
    const int64_t rows = geo.N * geo.S, gx = (geo.C + kRowsX - 1) / kRowsX;
    G = std::max<int64_t>(1, std::min<int64_t>({(target_blocks + gx - 1) / gx, (rows + kRowsY - 1) / kRowsY,
                                                65535}));
    grid = dim3(unsigned(gx), unsigned(G));
    block = dim3(kRowsX, kRowsY);
  } else {
    const int64_t m = geo.N * geo.S;
    G = std::max<int64_t>(1, std::min<int64_t>({(target_blocks + geo.C - 1) / geo.C, (m + kThreads - 1) / kThreads,
                                                65535}));
    grid = dim3(unsigned(geo.C), unsigned(G));
    block = dim3(kThreads);
  }
  Tensor work = at::empty({int64_t(geo.C * G * sizeof(Acc))}, a.options().dtype(at::kByte));
  auto* partial = reinterpret_cast<Acc*>(work.data_ptr());
  if (geo.rows) {
    reduce_rows_kernel<scalar_t, acc_t, R><<<grid, block, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), param.const_data_ptr<acc_t>(),
        geo.N * geo.S, geo.C, r, partial);
  } else {
    reduce_planar_kernel<scalar_t, acc_t, R><<<grid, block, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), param.const_data_ptr<acc_t>(), geo.N, geo.C,
        geo.S, r, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto opts = a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  Tensor o0 = at::empty({geo.C}, opts), o1 = at::empty({geo.C}, opts);
  const int cblocks = int(std::min<int64_t>((geo.C + kThreads - 1) / kThreads, 1024));
  combine_kernel<acc_t, R><<<cblocks, kThreads, 0, stream>>>(partial, G, geo.C, r, param.const_data_ptr<acc_t>(),
                                                            o0.data_ptr<acc_t>(), o1.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {o0, o1};
}

template <typename acc_t, typename Act>
struct ForwardOp {
  acc_t param;
  __device__ acc_t operator()(acc_t x, acc_t, acc_t scale, acc_t shift, acc_t) const {
    return Act::forward(x * scale + shift, param);
  }
};

template <typename acc_t, typename Act>
struct BackwardOp {
  acc_t param;
  __device__ acc_t operator()(acc_t z, acc_t g, acc_t k0, acc_t k1, acc_t k2) const {
    const acc_t dy = g * Act::derivative(z, param);
    return k0 * dy + k1 * Act::inverse(z, param) + k2;
  }
};

template <typename scalar_t, typename acc_t, typename Op>
__global__ void elementwise_kernel(const scalar_t* a, const scalar_t* __restrict__ b, scalar_t* out,
                                   const acc_t* __restrict__ q0, const acc_t* __restrict__ q1,
                                   const acc_t* __restrict__ q2, int64_t total, int64_t C, int64_t S, bool rows,
                                   Op op) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = rows ? i % C : (i / S) % C;
    out[i] = static_cast<scalar_t>(op(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), q0[c], q1[c], q2[c]));
  }
}

template <typename scalar_t, typename acc_t, typename Op>
void launch_elementwise(const scalar_t* a, const scalar_t* b, scalar_t* out, const Tensor& q0, const Tensor& q1,
                        const Tensor& q2, int64_t total, const Geometry& geo, Op op) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads,
                                                                int64_t(num_sms()) * 32));
  elementwise_kernel<scalar_t, acc_t, Op><<<unsigned(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a, b, out, q0.const_data_ptr<acc_t>(), q1.const_data_ptr<acc_t>(), q2.const_data_ptr<acc_t>(), total, geo.C,
      geo.S, geo.rows, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void with_activation(Activation act, F f) {
  switch (act) {
    case Activation::LeakyReLU:
      return f(LeakyReLU{});
    case Activation::ELU:
      return f(ELU{});
    case Activation::Identity:
      return f(Identity{});
  }
}

}  // namespace

std::tuple<Tensor, Tensor> stats_cuda(const Tensor& x, const Geometry& geo, const Tensor& shift) {
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_statistics_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    out = reduce<scalar_t>(x, x, shift, geo, Welford<acc_t>{});
  });
  return out;
}

std::tuple<Tensor, Tensor> reduce_cuda(const Tensor& z, const Tensor& dz, const Geometry& geo, const Tensor& beta,
                                       Activation act, double param) {
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "inplace_abn_backward_reduce_cuda",
                                  [&] {
                                    using acc_t = at::acc_type<scalar_t, true>;
                                    with_activation(act, [&](auto A) {
                                      using Act = decltype(A);
                                      out = reduce<scalar_t>(z, dz, beta, geo,
                                                             BackwardSums<acc_t, Act>{static_cast<acc_t>(param)});
                                    });
                                  });
  return out;
}

void forward_cuda(Tensor& x, const Geometry& geo, const Tensor& p0, const Tensor& p1, Activation act,
                  double param) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    scalar_t* px = x.data_ptr<scalar_t>();
    with_activation(act, [&](auto A) {
      using Act = decltype(A);
      launch_elementwise<scalar_t, acc_t>(px, px, px, p0, p1, p0, x.numel(), geo,
                                          ForwardOp<acc_t, Act>{static_cast<acc_t>(param)});
    });
  });
}

Tensor backward_cuda(const Tensor& z, const Tensor& dz, const Geometry& geo, const Tensor& p0, const Tensor& p1,
                     const Tensor& p2, Activation act, double param) {
  Tensor dx = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "inplace_abn_backward_elemt_cuda",
                                  [&] {
                                    using acc_t = at::acc_type<scalar_t, true>;
                                    with_activation(act, [&](auto A) {
                                      using Act = decltype(A);
                                      launch_elementwise<scalar_t, acc_t>(
                                          z.const_data_ptr<scalar_t>(), dz.const_data_ptr<scalar_t>(),
                                          dx.data_ptr<scalar_t>(), p0, p1, p2, z.numel(), geo,
                                          BackwardOp<acc_t, Act>{static_cast<acc_t>(param)});
                                    });
                                  });
  return dx;
}

}  // namespace iabn
