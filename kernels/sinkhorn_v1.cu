// GOCA assignment kernel, variant 1 (the first design; kept selectable until a GPU run has measured it beside v2).
// Shared layout, numerics and the sweep phases: sinkhorn_device.cuh; the math and the schedule: sinkhorn.h.
//
// R rows per step; a row's statistics are two block reductions (max, then sum), each warp's partials gathered
// through shared memory and summed serially by every thread.
#include "sinkhorn_device.cuh"

namespace goca {
namespace detail {
namespace {

// Reduces v[0..N) over the block (max or sum); every thread gets the results. One __syncthreads: the scratch is
// double-buffered, and a buffer is rewritten only after the next reduction's barrier.
template <int N, bool kMax>
__device__ __forceinline__ void block_reduce(float (&v)[N], float* scratch, int& parity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float w = __shfl_xor_sync(0xffffffffu, v[i], o);
      v[i] = kMax ? fmaxf(v[i], w) : v[i] + w;
    }
  }
  float* buf = scratch + parity * (kMaxWarps * kRedSlots);
  parity ^= 1;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) buf[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float r = buf[i];
    for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, buf[w * N + i]) : r + buf[w * N + i];
    v[i] = r;
  }
}

template <typename T, class C>  // T: float or unsigned short (16-bit scores)
__global__ void __launch_bounds__(C::kMaxThreads, 1) goca_sweeps_v1(const __grid_constant__ Args a) {
  constexpr int KPT = C::KPT, R = C::R;
  const float kInf = -neg_inf();
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
    float top[2] = {-kInf, -kInf};  // this block's max over rows of (row max + offset), init sweeps
    __syncthreads();

    const int base = kind == SweepKind::kLast ? B - a.keep : 0;
    const int n = kind == SweepKind::kLast ? a.keep : B;
    // balanced chunks: sizes differ by at most one row (at most ceil(n / ctas), the residency bound)
    const int lo = base + static_cast<int>(static_cast<int64_t>(n) * cta / a.ctas);
    const int hi = base + static_cast<int>(static_cast<int64_t>(n) * (cta + 1) / a.ctas);
    const int resident = kind == SweepKind::kLast ? 0 : min(a.resident, hi - lo);
    const int steps = (hi - lo + R - 1) / R;

    float v[R][2][KPT];  // raw scores, then logits, then exponentials of the R rows in flight

    // Scores of rows row0.. into v[r][0] (RGB) and v[r][1] (flow), as floats; resident rows come from shared memory
    // after sweep 0, which stores them. All loads are issued before any conversion (raw bits held in v).
    auto load = [&](int row0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = row0 + r, local = row - lo;
        const bool valid = row < hi, from_smem = local < resident && s > 0;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          if (from_smem) {
            const T* q = sRes + (static_cast<int64_t>(local) * 2 + m) * K + k0;
#pragma unroll
            for (int j = 0; j < KPT; ++j) v[r][m][j] = valid && j < jn ? as_bits(q[32 * j]) : 0.f;
          } else {
            const T* p = src[m] + static_cast<int64_t>(row) * a.ld[m] + k0;
#pragma unroll
            for (int j = 0; j < KPT; ++j) v[r][m][j] = valid && j < jn ? as_bits(__ldg(p + 32 * j)) : 0.f;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int local = row0 + r - lo;
        const bool store = s == 0 && local < resident && row0 + r < hi;
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int j = 0; j < KPT; ++j) {
            if (store && j < jn)
              sRes[(static_cast<int64_t>(local) * 2 + m) * K + k0 + 32 * j] = from_bits<T>(v[r][m][j]);
            v[r][m][j] = to_float(from_bits<T>(v[r][m][j]), a.bf16);
          }
      }
    };
    auto logits = [&](const PassCoef& c) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < KPT; ++j) {
          const float xr = v[r][0][j], xf = v[r][1][j];
#pragma unroll
          for (int st = 0; st < 2; ++st) v[r][st][j] = fmaf(c.alpha[st], xr, c.beta[st] * xf);
        }
    };
    auto read_rowmax = [&](int row0, float (&m)[R][2]) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int st = 0; st < 2; ++st) m[r][st] = row0 + r < hi ? a.rowmax[st * B + row0 + r] : 0.f;
    };
    // Sample step: y = (x − m) + F; per row and stream the max mx and the sum of 2^(y − mx), which stay in v.
    auto sample_step = [&](int row0, const float (&m)[R][2], float (&mx)[R][2], float (&sum)[R][2]) {
      float red[2 * R];
#pragma unroll
      for (int i = 0; i < 2 * R; ++i) red[i] = -kInf;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int st = 0; st < 2; ++st)
#pragma unroll
          for (int j = 0; j < KPT; ++j) {
            const float y = row0 + r < hi && j < jn ? (v[r][st][j] - m[r][st]) + sF[2 * (k0 + 32 * j) + st] : -kInf;
            v[r][st][j] = y;
            red[2 * r + st] = fmaxf(red[2 * r + st], y);
          }
      block_reduce<2 * R, true>(red, sRed, parity);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int st = 0; st < 2; ++st) {
          mx[r][st] = row0 + r < hi ? red[2 * r + st] : 0.f;
          red[2 * r + st] = 0.f;
        }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int st = 0; st < 2; ++st)
#pragma unroll
          for (int j = 0; j < KPT; ++j) {
            v[r][st][j] = ex2(v[r][st][j] - mx[r][st]);
            red[2 * r + st] += v[r][st][j];
          }
      block_reduce<2 * R, false>(red, sRed, parity);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int st = 0; st < 2; ++st) sum[r][st] = red[2 * r + st];
    };
    // First prototype step of a pass on logits in v with per-row offsets o: stores the row maxima and folds
    // z = x + o into the running column log-sum-exp (sMx: maximum, acc: sum relative to it).
    auto init_step = [&](int row0, const float (&o)[R][2]) {
      float red[2 * R];
#pragma unroll
      for (int i = 0; i < 2 * R; ++i) red[i] = -kInf;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int st = 0; st < 2; ++st)
#pragma unroll
          for (int j = 0; j < KPT; ++j)
            if (row0 + r < hi && j < jn) red[2 * r + st] = fmaxf(red[2 * r + st], v[r][st][j]);
      block_reduce<2 * R, true>(red, sRed, parity);
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (row0 + r < hi) {
#pragma unroll
          for (int st = 0; st < 2; ++st) {
            if (tid == 0) a.rowmax[st * B + row0 + r] = red[2 * r + st];
            top[st] = fmaxf(top[st], red[2 * r + st] + o[r][st]);
          }
        }
#pragma unroll
      for (int st = 0; st < 2; ++st)
#pragma unroll
        for (int j = 0; j < KPT; ++j) {
          if (j >= jn) continue;
          float* mxp = sMx + 2 * (k0 + 32 * j) + st;
          float z[R], zmax = -kInf;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            z[r] = row0 + r < hi ? v[r][st][j] + o[r][st] : -kInf;
            zmax = fmaxf(zmax, z[r]);
          }
          const float old = *mxp, mnew = fmaxf(old, zmax);
          float sum = acc[st][j] * ex2(old - mnew);
#pragma unroll
          for (int r = 0; r < R; ++r) sum += ex2(z[r] - mnew);
          acc[st][j] = sum;
          *mxp = mnew;
        }
    };

    for (int step = 0; step < steps; ++step) {
      const int row0 = lo + R * ((s & 1) ? steps - 1 - step : step);
      float m[R][2], mx[R][2], sum[R][2];
      switch (kind) {
        case SweepKind::kInit: {
          const float zero[R][2] = {};
          load(row0);
          logits(rc);
          init_step(row0, zero);
          break;
        }
        case SweepKind::kMiddle: {
          read_rowmax(row0, m);
          load(row0);
          logits(rc);
          sample_step(row0, m, mx, sum);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int st = 0; st < 2; ++st) {
              const float w = row0 + r < hi ? 1.f / sum[r][st] : 0.f;
#pragma unroll
              for (int j = 0; j < KPT; ++j) acc[st][j] = fmaf(v[r][st][j], w, acc[st][j]);
            }
          break;
        }
        case SweepKind::kBridge: {
          read_rowmax(row0, m);
          load(row0);
          logits(rc);
          sample_step(row0, m, mx, sum);
          // log2 of this row's per-sample factor in the finished pass's codes; the other stream's is the prior
          float o[R][2];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const bool valid = row0 + r < hi;
            const float h0 = -m[r][0] - mx[r][0] - lg2(sum[r][0]);
            const float h1 = -m[r][1] - mx[r][1] - lg2(sum[r][1]);
            o[r][0] = valid ? ic.offset * h1 : 0.f;
            o[r][1] = valid ? ic.offset * h0 : 0.f;
          }
          load(row0);
          logits(ic);
          init_step(row0, o);
          break;
        }
        case SweepKind::kLast: {
          read_rowmax(row0, m);
          load(row0);
          logits(rc);
          sample_step(row0, m, mx, sum);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (row0 + r >= hi) continue;
            const int64_t out_row = static_cast<int64_t>(row0 + r - base) * K;
#pragma unroll
            for (int st = 0; st < 2; ++st) {
              const float w = 1.f / sum[r][st];
#pragma unroll
              for (int j = 0; j < KPT; ++j)
                if (j < jn) __stcs(a.codes[st] + out_row + k0 + 32 * j, v[r][st][j] * w);
            }
          }
          break;
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
const void* v1_instance(WidthClass width) {
  switch (width) {
    case WidthClass::kNarrow: return reinterpret_cast<const void*>(&goca_sweeps_v1<T, V1::Narrow>);
    case WidthClass::kMedium: return reinterpret_cast<const void*>(&goca_sweeps_v1<T, V1::Medium>);
    default: return reinterpret_cast<const void*>(&goca_sweeps_v1<T, V1::Wide>);
  }
}

const void* kernel_v1(ScoreType type, WidthClass width) {
  return type == ScoreType::kFloat32 ? v1_instance<float>(width) : v1_instance<unsigned short>(width);
}

}  // namespace detail
}  // namespace goca
