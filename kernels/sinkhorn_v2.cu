// GOCA assignment kernel, variant 2 (the default). Shared layout, numerics and sweep phases: sinkhorn_device.cuh;
// the math and the schedule: sinkhorn.h.
//
// What changed from v1, and why (benchmarks/notes/sinkhorn_kernel.md has the cost model):
//  * Block reductions: warp shuffles, then ONE value per warp through a transposed scratch (slot-major, so lane w
//    reads warp w's value without bank conflicts), then a second shuffle round inside every warp. v1 had every
//    thread read all warps' partials serially (2R values × up to 24 warps of shared loads per reduction).
//  * A sample step is one block reduction of (max, sum) pairs instead of two (max, then sum): each thread
//    exponentiates relative to its own maximum and rescales by 2^(own − row max) once the row max is known.
//    One barrier per row and stream pair instead of two.
//  * One row per step; for K ≤ 6144 the next row's scores are loaded into a second register set while the current
//    row is reduced (Config::kOverlap), so the memory latency hides behind the barriers instead of adding to them.
//    Half as many threads as v1, each with twice the prototypes (the registers for that second set; half the warps
//    per row, so half the shuffles and barrier arrivals). The widest configuration has no registers to spare.
#include "sinkhorn_device.cuh"

namespace goca {
namespace detail {
namespace {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (m, s) pairs with s a sum of 2^(· − m); m = −inf means empty (s = 0). Every lane gets the warp's pair.
__device__ __forceinline__ void warp_max_sum(float& m, float& s) {
  const float w = warp_max(m);
  s = warp_sum(m == w ? s : s * ex2(m - w));  // m == w also covers an all-empty warp (−inf == −inf)
  m = w;
}

// Scratch of one reduction: slot-major [slot][kMaxWarps]; two such buffers alternate (parity), so one barrier per
// reduction suffices: a buffer is rewritten only after the next reduction's barrier, which every thread passes only
// after reading it.
__device__ __forceinline__ float* reduction_buffer(float* scratch, int& parity) {
  float* buf = scratch + parity * (kMaxWarps * kRedSlots);
  parity ^= 1;
  return buf;
}

// Block-wide max of v[0..N); every thread gets the results.
template <int N>
__device__ __forceinline__ void block_max(float (&v)[N], float* scratch, int& parity) {
  static_assert(N <= kRedSlots, "one slot per value");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_max(v[i]);
  float* buf = reduction_buffer(scratch, parity);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) buf[i * kMaxWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_max(lane < warps ? buf[i * kMaxWarps + lane] : neg_inf());
}

// Block-wide combination of N (max, sum) pairs; every thread gets the results.
template <int N>
__device__ __forceinline__ void block_max_sum(float (&m)[N], float (&s)[N], float* scratch, int& parity) {
  static_assert(2 * N <= kRedSlots, "two slots per pair");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) warp_max_sum(m[i], s[i]);
  float* buf = reduction_buffer(scratch, parity);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      buf[(2 * i) * kMaxWarps + warp] = m[i];
      buf[(2 * i + 1) * kMaxWarps + warp] = s[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float mi = lane < warps ? buf[(2 * i) * kMaxWarps + lane] : neg_inf();
    float si = lane < warps ? buf[(2 * i + 1) * kMaxWarps + lane] : 0.f;
    warp_max_sum(mi, si);
    m[i] = mi;
    s[i] = si;
  }
}

template <typename T, class C>  // T: float or unsigned short (16-bit scores)
__global__ void __launch_bounds__(C::kMaxThreads, 1) goca_sweeps_v2(const __grid_constant__ Args a) {
  constexpr int KPT = C::KPT;
  static_assert(C::R == 1, "v2 processes one row per step");
  const float kNegInf = neg_inf();
  extern __shared__ __align__(16) float smem[];
  const int K = a.K, B = a.B, nt = blockDim.x, tid = threadIdx.x, cta = blockIdx.x;
  // Per-prototype shared arrays are interleaved [K][2] (both streams of a prototype side by side).
  float* sF = smem;                                   // [2K] potentials of the pass whose sample step runs
  float* sMx = sF + 2 * K;                            // [max(2K, 2nt)] running column maxima; reduction scratch
  float* sRed = sMx + max(2 * K, 2 * nt);             // [kRedFloats] block reductions
  T* sRes = reinterpret_cast<T*>(sRed + kRedFloats);  // [resident][2][K] resident rows (fused launch)
  const T* src[2] = {static_cast<const T*>(a.scores[0]), static_cast<const T*>(a.scores[1])};
  cg::grid_group grid = cg::this_grid();
  int parity = 0;
  const int k0 = (tid >> 5) * 32 * KPT + (tid & 31);            // this thread's prototypes: k0 + 32·j
  const int jn = k0 < K ? min(KPT, (K - k0 + 31) / 32) : 0;       // how many of them exist

  for (int s = a.first; s < a.first + a.count; ++s) {
    const SweepKind kind = static_cast<SweepKind>(a.sweep[s].kind);
    const PassCoef rc = a.pass[a.sweep[s].sample_pass];  // pass of this sweep's sample step
    const PassCoef ic = a.pass[a.sweep[s].init_pass];    // pass of its first prototype step
    begin_sweep(a, s, sF, sMx);
    float acc[2][KPT];
#pragma unroll
    for (int st = 0; st < 2; ++st)
#pragma unroll
      for (int j = 0; j < KPT; ++j) acc[st][j] = 0.f;
    float top[2] = {kNegInf, kNegInf};  // this block's max over rows of (row max + offset), init sweeps
    __syncthreads();
    // For K ≤ 3072 this thread's potentials stay in registers for the sweep (150-154 registers, no spills): no
    // shared-memory load per score, which the interleaved [K][2] layout makes a 2-way bank conflict. Wider
    // configurations spilled 56-320 bytes with it, so they read sF per score.
    constexpr bool kPotentialsInRegisters = KPT <= 8;
    float f[2][kPotentialsInRegisters ? KPT : 1];
    if constexpr (kPotentialsInRegisters) {
#pragma unroll
      for (int st = 0; st < 2; ++st)
#pragma unroll
        for (int j = 0; j < KPT; ++j) f[st][j] = kind != SweepKind::kInit && j < jn ? sF[2 * (k0 + 32 * j) + st] : 0.f;
    }
    auto potential = [&](int st, int j) -> float {
      if constexpr (kPotentialsInRegisters) return f[st][j];
      else return sF[2 * (k0 + 32 * j) + st];
    };

    const int base = kind == SweepKind::kLast ? B - a.keep : 0;
    const int n = kind == SweepKind::kLast ? a.keep : B;
    // balanced chunks: sizes differ by at most one row (at most ceil(n / ctas), the residency bound)
    const int lo = base + static_cast<int>(static_cast<int64_t>(n) * cta / a.ctas);
    const int hi = base + static_cast<int>(static_cast<int64_t>(n) * (cta + 1) / a.ctas);
    const int resident = kind == SweepKind::kLast ? 0 : min(a.resident, hi - lo);
    const int steps = hi - lo;
    auto row_at = [&](int step) { return lo + ((s & 1) ? steps - 1 - step : step); };

    // Issues the loads of a row's scores (raw bits, no conversion, so nothing waits for them yet); resident rows
    // come from shared memory after sweep 0, which stores them.
    auto issue = [&](int row, float (&x)[2][KPT]) {
      const int local = row - lo;
      const bool from_smem = local < resident && s > 0;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if (from_smem) {
          const T* q = sRes + (static_cast<int64_t>(local) * 2 + m) * K + k0;
#pragma unroll
          for (int j = 0; j < KPT; ++j) x[m][j] = j < jn ? as_bits(q[32 * j]) : 0.f;
        } else {
          const T* p = src[m] + static_cast<int64_t>(row) * a.ld[m] + k0;
#pragma unroll
          for (int j = 0; j < KPT; ++j) x[m][j] = j < jn ? as_bits(__ldg(p + 32 * j)) : 0.f;
        }
      }
    };
    // Raw bits -> scores as floats (sweep 0 also keeps resident rows in shared memory) -> logits of pass c.
    auto logits = [&](int row, const PassCoef& c, float (&x)[2][KPT]) {
      const int local = row - lo;
      const bool store = s == 0 && local < resident;
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          if (store && j < jn) sRes[(static_cast<int64_t>(local) * 2 + m) * K + k0 + 32 * j] = from_bits<T>(x[m][j]);
          x[m][j] = to_float(from_bits<T>(x[m][j]), a.bf16);
        }
        const float xr = x[0][j], xf = x[1][j];
#pragma unroll
        for (int st = 0; st < 2; ++st) x[st][j] = fmaf(c.alpha[st], xr, c.beta[st] * xf);
      }
    };
    // Sample step on the logits x of a row with row maxima mrow: y = (x − m) + F; x becomes 2^(y − M) with M the
    // row max of y, S their sum (per stream). One block reduction: each thread's sum is taken relative to its own
    // maximum and rescaled to the row's afterwards.
    auto sample_step = [&](const float (&mrow)[2], float (&x)[2][KPT], float (&M)[2], float (&S)[2]) {
      float own[2];
#pragma unroll
      for (int st = 0; st < 2; ++st) {
        own[st] = kNegInf;
#pragma unroll
        for (int j = 0; j < KPT; ++j) {
          const float y = j < jn ? (x[st][j] - mrow[st]) + potential(st, j) : kNegInf;
          x[st][j] = y;
          own[st] = fmaxf(own[st], y);
        }
        const float ref = own[st] == kNegInf ? 0.f : own[st];  // a thread without prototypes: all terms 0
        S[st] = 0.f;
#pragma unroll
        for (int j = 0; j < KPT; ++j) {
          x[st][j] = ex2(x[st][j] - ref);
          S[st] += x[st][j];
        }
        M[st] = own[st];
      }
      block_max_sum<2>(M, S, sRed, parity);
#pragma unroll
      for (int st = 0; st < 2; ++st) {
        const float scale = own[st] == kNegInf ? 0.f : ex2(own[st] - M[st]);
#pragma unroll
        for (int j = 0; j < KPT; ++j) x[st][j] *= scale;
      }
    };
    // First prototype step of a pass on the logits x of a row with offsets o: stores the row maxima and folds
    // z = x + o into the running column log-sum-exp (sMx: maximum, acc: sum relative to it).
    auto init_step = [&](int row, const float (&x)[2][KPT], const float (&o)[2]) {
      float red[2];
#pragma unroll
      for (int st = 0; st < 2; ++st) {
        red[st] = kNegInf;
#pragma unroll
        for (int j = 0; j < KPT; ++j)
          if (j < jn) red[st] = fmaxf(red[st], x[st][j]);
      }
      block_max<2>(red, sRed, parity);
#pragma unroll
      for (int st = 0; st < 2; ++st) {
        if (tid == 0) a.rowmax[st * B + row] = red[st];
        top[st] = fmaxf(top[st], red[st] + o[st]);
#pragma unroll
        for (int j = 0; j < KPT; ++j) {
          if (j >= jn) continue;
          float* mxp = sMx + 2 * (k0 + 32 * j) + st;
          const float z = x[st][j] + o[st], old = *mxp, mnew = fmaxf(old, z);
          acc[st][j] = acc[st][j] * ex2(old - mnew) + ex2(z - mnew);
          *mxp = mnew;
        }
      }
    };

    float cur[2][KPT], next[2][KPT];  // the row being reduced; the next row's scores in flight (kOverlap)
    if (C::kOverlap && steps > 0) issue(row_at(0), cur);
    for (int step = 0; step < steps; ++step) {
      const int row = row_at(step);
      float mrow[2] = {0.f, 0.f};
      if (kind != SweepKind::kInit) {
        mrow[0] = a.rowmax[row];
        mrow[1] = a.rowmax[B + row];
      }
      if (!C::kOverlap) issue(row, cur);
      if (C::kOverlap && step + 1 < steps) issue(row_at(step + 1), next);
      logits(row, rc, cur);  // an init sweep's sample pass is its init pass (0)
      float M[2], S[2];
      switch (kind) {
        case SweepKind::kInit: {
          const float zero[2] = {0.f, 0.f};
          init_step(row, cur, zero);
          break;
        }
        case SweepKind::kMiddle: {
          sample_step(mrow, cur, M, S);
#pragma unroll
          for (int st = 0; st < 2; ++st) {
            const float w = 1.f / S[st];
#pragma unroll
            for (int j = 0; j < KPT; ++j) acc[st][j] = fmaf(cur[st][j], w, acc[st][j]);
          }
          break;
        }
        case SweepKind::kBridge: {
          sample_step(mrow, cur, M, S);
          // log2 of this row's per-sample factor in the finished pass's codes; the other stream's is the prior
          const float h0 = -mrow[0] - M[0] - lg2(S[0]), h1 = -mrow[1] - M[1] - lg2(S[1]);
          const float o[2] = {ic.offset * h1, ic.offset * h0};
          issue(row, cur);  // the raw scores again (L1 or shared memory): the logits of the next pass
          logits(row, ic, cur);
          init_step(row, cur, o);
          break;
        }
        case SweepKind::kLast: {
          sample_step(mrow, cur, M, S);
          const int64_t out_row = static_cast<int64_t>(row - base) * K;
#pragma unroll
          for (int st = 0; st < 2; ++st) {
            const float w = 1.f / S[st];
#pragma unroll
            for (int j = 0; j < KPT; ++j)
              if (j < jn) __stcs(a.codes[st] + out_row + k0 + 32 * j, cur[st][j] * w);
          }
          break;
        }
      }
      if (step + 1 < steps) {
        if (C::kOverlap) {
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int j = 0; j < KPT; ++j) cur[m][j] = next[m][j];
        }
      }
    }
    if (kind == SweepKind::kLast) continue;  // the final sweep: nothing to reduce
    finish_sweep<KPT>(a, grid, kind, acc, top, k0, jn, sF, sMx);
    if (s + 1 < a.first + a.count) grid.sync();
  }
}

}  // namespace

template <typename T>
const void* v2_instance(WidthClass width) {
  switch (width) {
    case WidthClass::kNarrow: return reinterpret_cast<const void*>(&goca_sweeps_v2<T, V2::Narrow>);
    case WidthClass::kMedium: return reinterpret_cast<const void*>(&goca_sweeps_v2<T, V2::Medium>);
    default: return reinterpret_cast<const void*>(&goca_sweeps_v2<T, V2::Wide>);
  }
}

const void* kernel_v2(ScoreType type, WidthClass width) {
  return type == ScoreType::kFloat32 ? v2_instance<float>(width) : v2_instance<unsigned short>(width);
}

}  // namespace detail
}  // namespace goca
