// InPlace-ABN CPU kernels (specs/inplace_abn.md §5.3): at::parallel_for + at::vec::Vectorized inner loops,
// planar (NCHW) and rows (channels_last / 2-D) layouts, float and double, no full-size temporaries.
// Reductions accumulate short runs in the tensor's type and flush them into float64 per channel.
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "abn.h"

namespace iabn {
namespace {

template <typename T>
using V = at::vec::Vectorized<T>;

constexpr int64_t kFlushVectors = 64;  // vectors accumulated in the input type before a float64 flush
constexpr int64_t kFlushRows = 64;     // rows accumulated per channel in the input type (rows layout)
constexpr int64_t kGrainElements = 32768;

template <typename T>
double hsum(const V<T>& v) {
  T buf[V<T>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < V<T>::size(); ++i) s += double(buf[i]);
  return s;
}

// out0[c] = sum op0, out1[c] = sum op1 over the N x S elements of channel c; planar layout.
template <typename T, typename Op>
void reduce_planar(const T* a, const T* b, const T* k, const Geometry& g, double* out0, double* out1, Op op) {
  constexpr int64_t L = V<T>::size();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, g.N * g.S));
  at::parallel_for(0, g.C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const V<T> kc(k[c]);
      double s0 = 0, s1 = 0;
      V<T> acc0(T(0)), acc1(T(0));
      int64_t pending = 0;
      auto flush = [&]() {
        s0 += hsum(acc0);
        s1 += hsum(acc1);
        acc0 = V<T>(T(0));
        acc1 = V<T>(T(0));
        pending = 0;
      };
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t base = (n * g.C + c) * g.S;
        int64_t i = 0;
        for (; i + L <= g.S; i += L) {
          V<T> o0, o1;
          op(V<T>::loadu(a + base + i), V<T>::loadu(b + base + i), kc, o0, o1);
          acc0 += o0;
          acc1 += o1;
          if (++pending == kFlushVectors) flush();
        }
        if (i < g.S) {
          const int64_t r = g.S - i;
          V<T> o0, o1;
          op(V<T>::loadu(a + base + i, r), V<T>::loadu(b + base + i, r), kc, o0, o1);
          acc0 += V<T>::set(V<T>(T(0)), o0, r);
          acc1 += V<T>::set(V<T>(T(0)), o1, r);
          if (++pending == kFlushVectors) flush();
        }
      }
      flush();
      out0[c] = s0;
      out1[c] = s1;
    }
  });
}

// Same reduction for the rows layout: each thread keeps C-long partial sums, reduced at the end.
template <typename T, typename Op>
void reduce_rows(const T* a, const T* b, const T* k, const Geometry& g, double* out0, double* out1, Op op) {
  constexpr int64_t L = V<T>::size();
  const int64_t R = g.N * g.S, C = g.C;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R * C / kGrainElements));
  std::vector<double> part0(chunks * C, 0.0), part1(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> acc0(C), acc1(C);
    for (int64_t t = t0; t < t1; ++t) {
      double* p0 = part0.data() + t * C;
      double* p1 = part1.data() + t * C;
      std::fill(acc0.begin(), acc0.end(), T(0));
      std::fill(acc1.begin(), acc1.end(), T(0));
      int64_t pending = 0;
      auto flush = [&]() {
        for (int64_t c = 0; c < C; ++c) {
          p0[c] += double(acc0[c]);
          p1[c] += double(acc1[c]);
          acc0[c] = T(0);
          acc1[c] = T(0);
        }
        pending = 0;
      };
      const int64_t r0 = t * R / chunks, r1 = (t + 1) * R / chunks;
      for (int64_t r = r0; r < r1; ++r) {
        const T* ar = a + r * C;
        const T* br = b + r * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          V<T> o0, o1;
          op(V<T>::loadu(ar + c), V<T>::loadu(br + c), V<T>::loadu(k + c), o0, o1);
          (V<T>::loadu(acc0.data() + c) + o0).store(acc0.data() + c);
          (V<T>::loadu(acc1.data() + c) + o1).store(acc1.data() + c);
        }
        if (c < C) {
          const int64_t n = C - c;
          V<T> o0, o1;
          op(V<T>::loadu(ar + c, n), V<T>::loadu(br + c, n), V<T>::loadu(k + c, n), o0, o1);
          (V<T>::loadu(acc0.data() + c, n) + o0).store(acc0.data() + c, n);
          (V<T>::loadu(acc1.data() + c, n) + o1).store(acc1.data() + c, n);
        }
        if (++pending == kFlushRows) flush();
      }
      flush();
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s0 = 0, s1 = 0;
    for (int64_t t = 0; t < chunks; ++t) {
      s0 += part0[t * C + c];
      s1 += part1[t * C + c];
    }
    out0[c] = s0;
    out1[c] = s1;
  }
}

template <typename T, typename Op>
std::tuple<Tensor, Tensor> reduce(const Tensor& a, const Tensor& b, const Tensor& k, const Geometry& g, Op op) {
  auto opts = a.options().dtype(at::kDouble);
  Tensor s0 = at::empty({g.C}, opts), s1 = at::empty({g.C}, opts);
  const T* pa = a.const_data_ptr<T>();
  const T* pb = b.const_data_ptr<T>();
  const T* pk = k.const_data_ptr<T>();
  if (g.rows) {
    reduce_rows<T>(pa, pb, pk, g, s0.data_ptr<double>(), s1.data_ptr<double>(), op);
  } else {
    reduce_planar<T>(pa, pb, pk, g, s0.data_ptr<double>(), s1.data_ptr<double>(), op);
  }
  return {s0, s1};
}

// out = op(a, b, q0[c], q1[c], q2[c]) element-wise; out may alias a.
template <typename T, typename Op>
void elementwise(const T* a, const T* b, T* out, const T* q0, const T* q1, const T* q2, const Geometry& g,
                 Op op) {
  constexpr int64_t L = V<T>::size();
  if (g.rows) {
    const int64_t R = g.N * g.S, C = g.C;
    at::parallel_for(0, R, std::max<int64_t>(1, kGrainElements / C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          op(V<T>::loadu(a + base + c), V<T>::loadu(b + base + c), V<T>::loadu(q0 + c), V<T>::loadu(q1 + c),
             V<T>::loadu(q2 + c))
              .store(out + base + c);
        }
        if (c < C) {
          const int64_t n = C - c;
          op(V<T>::loadu(a + base + c, n), V<T>::loadu(b + base + c, n), V<T>::loadu(q0 + c, n),
             V<T>::loadu(q1 + c, n), V<T>::loadu(q2 + c, n))
              .store(out + base + c, n);
        }
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrainElements / g.S), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % g.C, base = p * g.S;
      const V<T> v0(q0[c]), v1(q1[c]), v2(q2[c]);
      int64_t i = 0;
      for (; i + L <= g.S; i += L) {
        op(V<T>::loadu(a + base + i), V<T>::loadu(b + base + i), v0, v1, v2).store(out + base + i);
      }
      if (i < g.S) {
        const int64_t n = g.S - i;
        op(V<T>::loadu(a + base + i, n), V<T>::loadu(b + base + i, n), v0, v1, v2).store(out + base + i, n);
      }
    }
  });
}

template <typename F>
void with_activation(Activation act, F f) {
  switch (act) {
    case Activation::LeakyReLU:
      return f(VecLeakyReLU{});
    case Activation::ELU:
      return f(VecELU{});
    case Activation::Identity:
      return f(VecIdentity{});
  }
}

}  // namespace

std::tuple<Tensor, Tensor> stats_cpu(const Tensor& x, const Geometry& g, const Tensor& shift) {
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "inplace_abn_statistics_cpu", [&] {
    out = reduce<scalar_t>(x, x, shift, g,
                           [](const V<scalar_t>& a, const V<scalar_t>&, const V<scalar_t>& k, V<scalar_t>& o0,
                              V<scalar_t>& o1) {
                             const V<scalar_t> d = a - k;
                             o0 = d;
                             o1 = d * d;
                           });
  });
  return out;
}

std::tuple<Tensor, Tensor> reduce_cpu(const Tensor& z, const Tensor& dz, const Geometry& g, const Tensor& beta,
                                      Activation act, double param) {
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "inplace_abn_backward_reduce_cpu", [&] {
    const V<scalar_t> p(static_cast<scalar_t>(param));
    with_activation(act, [&](auto A) {
      using Act = decltype(A);
      out = reduce<scalar_t>(z, dz, beta, g,
                             [p](const V<scalar_t>& zv, const V<scalar_t>& gv, const V<scalar_t>& bv,
                                 V<scalar_t>& o0, V<scalar_t>& o1) {
                               const V<scalar_t> dy = gv * Act::derivative(zv, p);
                               o0 = dy;
                               o1 = (Act::inverse(zv, p) - bv) * dy;
                             });
    });
  });
  return out;
}

void forward_cpu(Tensor& x, const Geometry& g, const Tensor& p0, const Tensor& p1, Activation act, double param) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "inplace_abn_forward_cpu", [&] {
    const V<scalar_t> p(static_cast<scalar_t>(param));
    scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* q0 = p0.const_data_ptr<scalar_t>();
    const scalar_t* q1 = p1.const_data_ptr<scalar_t>();
    with_activation(act, [&](auto A) {
      using Act = decltype(A);
      elementwise<scalar_t>(px, px, px, q0, q1, q0, g,
                            [p](const V<scalar_t>& xv, const V<scalar_t>&, const V<scalar_t>& s,
                                const V<scalar_t>& t, const V<scalar_t>&) {
                              return Act::forward(at::vec::fmadd(xv, s, t), p);
                            });
    });
  });
}

Tensor backward_cpu(const Tensor& z, const Tensor& dz, const Geometry& g, const Tensor& p0, const Tensor& p1,
                    const Tensor& p2, Activation act, double param) {
  Tensor dx = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "inplace_abn_backward_elemt_cpu", [&] {
    const V<scalar_t> p(static_cast<scalar_t>(param));
    with_activation(act, [&](auto A) {
      using Act = decltype(A);
      elementwise<scalar_t>(z.const_data_ptr<scalar_t>(), dz.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                            p0.const_data_ptr<scalar_t>(), p1.const_data_ptr<scalar_t>(),
                            p2.const_data_ptr<scalar_t>(), g,
                            [p](const V<scalar_t>& zv, const V<scalar_t>& gv, const V<scalar_t>& k0,
                                const V<scalar_t>& k1, const V<scalar_t>& k2) {
                              const V<scalar_t> dy = gv * Act::derivative(zv, p);
                              return at::vec::fmadd(k0, dy, at::vec::fmadd(k1, Act::inverse(zv, p), k2));
                            });
    });
  });
  return dx;
}

}  // namespace iabn
