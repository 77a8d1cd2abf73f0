// GOCA assignment kernel: see sinkhorn.h for the math and the sweep schedule.
//
// Layout: one block per SM owns a contiguous chunk of rows and every sweep walks it (forward on even sweeps,
// backward on odd ones, so the rows read last are read first again while they are still in L2). Lane l of warp w
// owns prototypes k = (w·KPT + j)·32 + l (j < KPT) for the whole launch: a warp reads 32 consecutive scores per load
// and the j-offsets are compile-time constants (no per-prototype address registers). A block's column statistics
// live in its registers and a row's statistics are block reductions; R rows at a time keep enough loads in flight.
// In the fused launch the first rows of every chunk stay resident in shared memory after sweep 0, so later sweeps
// read only the rest from L2/HBM.
//
// Numerical safety without a log-domain fallback: every exponent is taken relative to a maximum, so
//   sample step: terms 2^(y − max_k y) ≤ 1 and the row sum ≥ 1;
//   first prototype step of a pass: per-column online log-sum-exp (running column maximum), sum ≥ 1;
//   later prototype steps: the previous one left every column with mass 1 (total K); the sample step divides each
//   row by its mass ≤ K, so every column keeps mass ≥ 1/K, a sum of terms ≤ 1.
// Hence the kernel is finite for any finite scores and ε (the official iterate overflows for ε ≲ 0.011).
#include "sinkhorn.h"

#include <algorithm>
#include <mutex>
#include <set>
#include <utility>

#include <cooperative_groups.h>
#include <cuda_fp16.h>

namespace cg = cooperative_groups;

namespace goca {
namespace {

constexpr int kMaxWarps = 32;
constexpr int kRedSlots = 8;                               // values per block reduction (R · 2 streams)
constexpr int kRedFloats = 2 * kMaxWarps * kRedSlots;      // double-buffered reduction scratch
constexpr int kReservedSmemPerBlock = 1024;                // the driver's per-block shared-memory reservation

// KPT prototypes per thread, R rows per step, maximum threads per block (register budget of __launch_bounds__).
template <int KPT_, int R_, int MaxThreads_>
struct Config {
  static constexpr int KPT = KPT_, R = R_, kMaxThreads = MaxThreads_;
  static_assert(R * 2 <= kRedSlots, "block reductions carry R rows × 2 streams");
};
// R·KPT ≤ 8 except for Wide: more would spill (ptxas -v); 768 threads × 2 rows × 4 prototypes keep ~48 KB of fp32
// loads in flight per SM at K=3000.
using Narrow = Config<4, 2, 768>;    // K ≤ 3072
using Medium = Config<8, 1, 768>;    // K ≤ 6144
using Wide = Config<20, 1, 512>;     // K ≤ 10240 (= kMaxK)

struct PassCoef {
  float alpha[2], beta[2];  // logits of stream st: alpha[st]·S_rgb + beta[st]·S_flow (log2 units)
  float offset;             // prior offset of stream st: offset · h(other stream of the previous pass)
};

struct Args {
  const void* scores[2];
  int64_t ld[2];
  float* codes[2];
  float* colmax;
  float* colacc;
  float* pot;
  float* rowmax;
  float* partial;
  int B, K, keep, iterations, cycles, first, count, ctas, resident;
  bool bf16;  // 16-bit scores are bfloat16 (else float16)
  PassCoef pass[kMaxPasses];
};

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Scores arrive as float or as 16-bit words (bfloat16 or float16, one kernel for both: the flag is uniform).
// Loaded words are first held as raw bits in a float register, so that issuing every load before converting
// needs one register per value.
__device__ __forceinline__ float as_bits(float v) { return v; }
__device__ __forceinline__ float as_bits(unsigned short v) { return __uint_as_float(v); }
template <typename T>
__device__ __forceinline__ T from_bits(float b);
template <>
__device__ __forceinline__ float from_bits<float>(float b) { return b; }
template <>
__device__ __forceinline__ unsigned short from_bits<unsigned short>(float b) {
  return static_cast<unsigned short>(__float_as_uint(b));
}
__device__ __forceinline__ float to_float(float v, bool) { return v; }
__device__ __forceinline__ float to_float(unsigned short v, bool bf16) {
  return bf16 ? __uint_as_float(static_cast<unsigned>(v) << 16) : __half2float(__ushort_as_half(v));
}

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
__global__ void __launch_bounds__(C::kMaxThreads, 1) goca_sweeps(const __grid_constant__ Args a) {
  constexpr int KPT = C::KPT, R = C::R;
  const float kInf = __int_as_float(0x7f800000);
  extern __shared__ __align__(16) float smem[];
  const int K = a.K, B = a.B, nt = blockDim.x, tid = threadIdx.x, cta = blockIdx.x;
  const int E = 2 * K + 2;  // column statistics: 2K prototypes + one global maximum per stream
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
    const SweepKind kind = sweep_kind(s, a.iterations, a.cycles);
    const bool init_stats = kind == SweepKind::kInit || kind == SweepKind::kBridge;
    const PassCoef rc = a.pass[s == 0 ? 0 : (s - 1) / a.iterations];      // pass of this sweep's sample step
    const PassCoef ic = a.pass[min(s / a.iterations, a.cycles)];          // pass of its first prototype step

    // Potentials of the sample step's pass, from the previous sweep's (all-reduced) column statistics.
    if (kind != SweepKind::kInit) {
      const bool after_init = stats_after(s - 1, a.iterations, a.cycles) == Stats::kMaxSum;
      for (int e = tid; e < 2 * K; e += nt) {  // global entry e = st·K + k
        const float f = after_init ? a.colmax[2 * K + e / K] - a.colmax[e] : a.pot[e];
        sF[2 * (e % K) + e / K] = f - lg2(a.colacc[e]);
      }
    }
    if (init_stats)
      for (int e = tid; e < 2 * K; e += nt) sMx[e] = -kInf;
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

    // This block's column statistics -> partial[0][cta] (sums) and partial[1][cta] (maxima, init sweeps).
    float* psum = a.partial + static_cast<size_t>(cta) * E;
    float* pmax = a.partial + static_cast<size_t>(a.ctas + cta) * E;
#pragma unroll
    for (int st = 0; st < 2; ++st)
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        const int k = k0 + 32 * j;
        if (j < jn) {
          psum[st * K + k] = acc[st][j];
          if (init_stats) pmax[st * K + k] = sMx[2 * k + st];
        }
      }
    if (init_stats && tid == 0) {
      pmax[2 * K] = top[0];
      pmax[2 * K + 1] = top[1];
    }
    grid.sync();

    // Deterministic reduction over blocks: block cta owns a slice of the entries; groups of its threads sum
    // interleaved blocks' partials, then the groups are combined through shared memory in a fixed order.
    const int used = init_stats ? E : 2 * K;
    const int per = (used + a.ctas - 1) / a.ctas;
    const int e_lo = min(used, cta * per), e_hi = min(used, e_lo + per);
    if (kind != SweepKind::kInit)
      for (int e = e_lo + tid; e < min(e_hi, 2 * K); e += nt) a.pot[e] = sF[2 * (e % K) + e / K];
    for (int e0 = e_lo; e0 < e_hi; e0 += nt) {
      const int width = min(nt, e_hi - e0), groups = nt / width;
      const int el = tid % width, g = tid / width, e = e0 + el;
      float mg = -kInf, sg = 0.f;
      if (g < groups) {
        if (init_stats) {
          for (int c = g; c < a.ctas; c += groups) mg = fmaxf(mg, a.partial[static_cast<size_t>(a.ctas + c) * E + e]);
          if (e < 2 * K)
            for (int c = g; c < a.ctas; c += groups) {
              const float pm = a.partial[static_cast<size_t>(a.ctas + c) * E + e];
              if (pm != -kInf) sg += a.partial[static_cast<size_t>(c) * E + e] * ex2(pm - mg);
            }
        } else {
          for (int c = g; c < a.ctas; c += groups) sg += a.partial[static_cast<size_t>(c) * E + e];
        }
      }
      if (groups > 1) {
        sMx[tid] = mg;
        sMx[nt + tid] = sg;
        __syncthreads();
        if (g == 0) {
          if (init_stats) {
            for (int h = 1; h < groups; ++h) mg = fmaxf(mg, sMx[h * width + el]);
            sg = 0.f;
            for (int h = 0; h < groups; ++h) {
              const float mh = sMx[h * width + el];
              if (mh != -kInf) sg += sMx[nt + h * width + el] * ex2(mh - mg);
            }
          } else {
            for (int h = 1; h < groups; ++h) sg += sMx[nt + h * width + el];
          }
        }
        __syncthreads();
      }
      if (g == 0) {
        if (init_stats) a.colmax[e] = mg;
        if (e < 2 * K) a.colacc[e] = sg;
      }
    }
    if (s + 1 < a.first + a.count) grid.sync();
  }
}

// ---------------------------------------------------------------------------------------------------- host side

struct DeviceInfo {
  int sms = 0, smem_block = 0, smem_sm = 0, cooperative = 0;
  std::string error;
};

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool filled[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  static DeviceInfo bad;
  if (device < 0 || device >= 64) {
    bad.error = "device index out of range";
    return bad;
  }
  DeviceInfo& d = cache[device];
  if (!filled[device]) {
    cudaError_t e = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.smem_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.cooperative, cudaDevAttrCooperativeLaunch, device);
    if (e != cudaSuccess) d.error = std::string("cannot query the device: ") + cudaGetErrorString(e);
    else if (!d.cooperative) d.error = "the device does not support cooperative launches";
    filled[device] = true;
  }
  return d;
}

template <class C>
int threads_for(int K) {
  const int t = (K + C::KPT - 1) / C::KPT;
  return std::max(32, (t + 31) / 32 * 32);
}

template <typename F>
auto with_config(int K, F&& f) {
  if (K <= 3072) return f(Narrow{});
  if (K <= 6144) return f(Medium{});
  return f(Wide{});
}

std::size_t base_smem(int K, int threads) {
  return sizeof(float) * (2 * static_cast<std::size_t>(K) + std::max(2 * K, 2 * threads) + kRedFloats);
}

std::size_t score_bytes(ScoreType t) { return t == ScoreType::kFloat32 ? 4 : 2; }

template <class C>
const void* kernel_for(ScoreType t) {
  switch (t) {
    case ScoreType::kFloat32: return reinterpret_cast<const void*>(&goca_sweeps<float, C>);
    default: return reinterpret_cast<const void*>(&goca_sweeps<unsigned short, C>);
  }
}

// Lets the kernel use the device's whole opt-in shared memory; once per (device, kernel).
cudaError_t allow_max_smem(const void* kernel, int device, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<int, const void*>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({device, kernel})) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.insert({device, kernel});
  return e;
}

// The pass coefficients of goca_codes in log2 units (same recursion as goca_fast.assign.goca_codes).
void pass_coefficients(const Problem& p, PassCoef* out) {
  const double l2e = 1.4426950408889634;
  double alpha[2] = {1.0 / p.epsilon, 0.0}, beta[2] = {0.0, 1.0 / p.epsilon}, offset = 0.0;
  const double denom = p.epsilon + p.prior_epsilon, a = p.sign * p.prior_epsilon / denom;
  for (int q = 0; q <= p.cycles; ++q) {
    if (q > 0) {
      const double ar = 1.0 / denom + a * alpha[1], br = a * beta[1];
      const double af = a * alpha[0], bf = 1.0 / denom + a * beta[0];
      alpha[0] = ar, beta[0] = br, alpha[1] = af, beta[1] = bf, offset = a;
    }
    for (int st = 0; st < 2; ++st) {
      out[q].alpha[st] = static_cast<float>(alpha[st] * l2e);
      out[q].beta[st] = static_cast<float>(beta[st] * l2e);
    }
    out[q].offset = static_cast<float>(offset);
  }
}

}  // namespace

int max_k(int device, std::string* error) {
  const DeviceInfo& d = device_info(device);
  if (!d.error.empty()) {
    *error = d.error;
    return 0;
  }
  // base_smem(K) = 4·(4K + kRedFloats) once K ≥ threads (always true for K ≥ 32)
  const int by_smem = static_cast<int>((d.smem_block / sizeof(float) - kRedFloats) / 4);
  return std::min(kMaxK, by_smem);
}

int plan_ctas(int device, int B, int K, ScoreType type, int requested, std::string* error) {
  const int kmax = max_k(device, error);
  if (kmax == 0) return 0;
  if (B < 1 || K < 1 || K > kmax) {
    *error = "B=" + std::to_string(B) + ", K=" + std::to_string(K) + " outside the kernel's range (B >= 1, 1 <= K <= " +
             std::to_string(kmax) + ")";
    return 0;
  }
  const DeviceInfo& d = device_info(device);
  return with_config(K, [&](auto cfg) -> int {
    using C = decltype(cfg);
    const int want = (B + C::R - 1) / C::R;
    int ctas = std::min(requested > 0 ? requested : d.sms, want);
    if (ctas > d.sms) {  // more than one block per SM: they must all be co-resident
      const void* kernel = kernel_for<C>(type);
      const int threads = threads_for<C>(K);
      int per_sm = 0;
      cudaError_t e = allow_max_smem(kernel, device, d.smem_block);
      if (e == cudaSuccess)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, base_smem(K, threads));
      if (e != cudaSuccess) (void)cudaGetLastError();
      if (e != cudaSuccess || per_sm * d.sms < ctas) {
        *error = "requested " + std::to_string(ctas) + " blocks, at most " + std::to_string(per_sm * d.sms) +
                 " can be co-resident";
        return 0;
      }
    }
    return ctas;
  });
}

std::string run_sweeps(const Problem& p, const Workspace& w, int first, int count, int device, cudaStream_t stream) {
  std::string error;
  const int kmax = max_k(device, &error);
  if (kmax == 0) return error;
  const int n = sweep_count(p.iterations, p.cycles);
  if (p.B < 1 || p.K < 1 || p.K > kmax) return "K must be in [1, " + std::to_string(kmax) + "] and B >= 1";
  if (p.keep < 1 || p.keep > p.B) return "keep must be in [1, B]";
  if (p.iterations < 1 || p.cycles < 1 || p.cycles > kMaxPasses - 1) return "iterations >= 1 and cycles in {1, 2}";
  if (!(p.epsilon > 0.0)) return "epsilon must be > 0";
  if (first < 0 || count < 1 || first + count > n) return "sweep range outside [0, " + std::to_string(n) + ")";
  if (w.ctas < 1) return "workspace has no blocks";
  const DeviceInfo& d = device_info(device);

  Args a{};
  for (int st = 0; st < 2; ++st) {
    a.scores[st] = p.scores[st];
    a.ld[st] = p.row_stride[st];
    a.codes[st] = p.codes[st];
  }
  a.colmax = w.colmax, a.colacc = w.colacc, a.pot = w.pot, a.rowmax = w.rowmax, a.partial = w.partial;
  a.B = p.B, a.K = p.K, a.keep = p.keep, a.iterations = p.iterations, a.cycles = p.cycles;
  a.first = first, a.count = count, a.ctas = w.ctas, a.bf16 = p.type == ScoreType::kBFloat16;
  pass_coefficients(p, a.pass);

  return with_config(p.K, [&](auto cfg) -> std::string {
    using C = decltype(cfg);
    const int threads = threads_for<C>(p.K);
    std::size_t smem = base_smem(p.K, threads);
    if (first == 0 && count == n) {  // fused: keep as many rows resident in shared memory as fit
      const int per_sm = (w.ctas + d.sms - 1) / d.sms;
      const long budget = std::min<long>(d.smem_block, d.smem_sm / per_sm - kReservedSmemPerBlock) - long(smem);
      const long row_bytes = 2L * p.K * long(score_bytes(p.type));
      const int chunk = (p.B + w.ctas - 1) / w.ctas;
      a.resident = budget > 0 ? static_cast<int>(std::min<long>(chunk, budget / row_bytes)) : 0;
      smem += std::size_t(a.resident) * row_bytes;
    }
    const void* kernel = kernel_for<C>(p.type);
    cudaError_t e = allow_max_smem(kernel, device, d.smem_block);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: clear it so that torch's next launch check does not report it
      return std::string("cannot raise the shared-memory limit: ") + cudaGetErrorString(e);
    }
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(w.ctas);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    void* args[] = {&a};
    e = cudaLaunchKernelExC(&config, kernel, args);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return std::string("kernel launch failed: ") + cudaGetErrorString(e);
    }
    return std::string();
  });
}

}  // namespace goca
