// What both kernel variants share (sinkhorn_v1.cu, sinkhorn_v2.cu) and what the host side (sinkhorn.cu) needs to
// launch them: launch arguments, thread configurations, numeric helpers, and the two phases every sweep has in
// common — potentials from the previous sweep's statistics, and the deterministic grid-wide reduction of the
// column statistics at its end.
//
// Layout (both variants): one block per SM owns a contiguous chunk of rows and every sweep walks it (forward on
// even sweeps, backward on odd ones, so the rows read last are read first again while they are still in L2). Lane l
// of warp w owns prototypes k = (w·KPT + j)·32 + l (j < KPT) for the whole launch: a warp reads 32 consecutive
// scores per load and the j-offsets are compile-time constants. A block's column statistics live in its registers;
// a row's statistics are block reductions. In the fused launch the first rows of every chunk stay resident in
// shared memory after sweep 0, so later sweeps read only the rest from L2/HBM.
//
// Numerical safety without a log-domain fallback: every exponent is taken relative to a maximum, so
//   sample step: terms 2^(y − max_k y) ≤ 1 and the row sum ≥ 1;
//   first prototype step of a pass: per-column online log-sum-exp (running column maximum), sum ≥ 1;
//   later prototype steps: the previous one left every column with mass 1 (total K); the sample step divides each
//   row by its mass ≤ K, so every column keeps mass ≥ 1/K, a sum of terms ≤ 1.
// Hence the kernel is finite for any finite scores and ε (the official iterate overflows for ε ≲ 0.011).
#pragma once

#include "sinkhorn.h"

#include <cooperative_groups.h>
#include <cuda_fp16.h>

namespace goca {
namespace detail {

namespace cg = cooperative_groups;

constexpr int kMaxWarps = 32;
constexpr int kRedSlots = 8;                               // values per block reduction and buffer, per warp
constexpr int kRedFloats = 2 * kMaxWarps * kRedSlots;      // double-buffered reduction scratch
constexpr int kReservedSmemPerBlock = 1024;                // the driver's per-block shared-memory reservation

// KPT prototypes per thread, R rows per step, maximum threads per block (register budget of __launch_bounds__),
// and whether the next row's scores are loaded while the current row is reduced (two register sets; v2).
template <int KPT_, int R_, int MaxThreads_, bool Overlap_ = false>
struct Config {
  static constexpr int KPT = KPT_, R = R_, kMaxThreads = MaxThreads_;
  static constexpr bool kOverlap = Overlap_;
  static_assert(R * 2 <= kRedSlots, "block reductions carry R rows × 2 streams");
};

// v1: R·KPT ≤ 8 except for Wide: more would spill (ptxas -v); 768 threads × 2 rows × 4 prototypes keep ~48 KB of
// fp32 loads in flight per SM at K=3000.
struct V1 {
  using Narrow = Config<4, 2, 768>;   // K ≤ 3072
  using Medium = Config<8, 1, 768>;   // K ≤ 6144
  using Wide = Config<20, 1, 512>;    // K ≤ 10240 (= kMaxK)
};
// v2: one row per step, its reductions overlapped with the next row's loads (a second register set) where it fits.
// Half v1's threads with twice the prototypes each: half the warps per row, so half the shuffles and barrier
// arrivals per row, and the registers (168 at 384 threads) for the second set. ptxas (sm_90): Narrow 128 registers,
// no spills; Medium 168 registers, 28 bytes; Wide (no registers to spare for overlap) 128, 44 bytes. Tried and
// dropped: 768 threads × 4 / × 8 with overlap (Medium spilled 148-156 bytes), 640 × 10 (124-144 bytes).
struct V2 {
  using Narrow = Config<8, 1, 384, true>;    // K ≤ 3072
  using Medium = Config<16, 1, 384, true>;   // K ≤ 6144
  using Wide = Config<20, 1, 512, false>;    // K ≤ 10240
};

enum class WidthClass : int { kNarrow = 0, kMedium = 1, kWide = 2 };

inline WidthClass width_class(int K) {
  return K <= 3072 ? WidthClass::kNarrow : K <= 6144 ? WidthClass::kMedium : WidthClass::kWide;
}

struct PassCoef {
  float alpha[2], beta[2];  // logits of stream st: alpha[st]·S_rgb + beta[st]·S_flow (log2 units)
  float offset;             // prior offset of stream st: offset · h(other stream of the previous pass)
};

struct SweepEntry {
  signed char kind, sample_pass, init_pass, unused;  // SweepKind, pass of the sample step, of the prototype step
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
  int B, K, keep, first, count, ctas, resident;
  bool bf16;  // 16-bit scores are bfloat16 (else float16)
  PassCoef pass[kMaxPasses];
  SweepEntry sweep[kMaxSweeps];  // the schedule, from goca_fast.sweep_plan: the kernel only reads it
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

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

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

__device__ __forceinline__ bool opens_pass(SweepKind kind) {  // runs a pass's first prototype step
  return kind == SweepKind::kInit || kind == SweepKind::kBridge;
}

// Start of sweep s: potentials of the sample step's pass into sF, from the previous sweep's (all-reduced) column
// statistics; running column maxima reset when this sweep opens a pass. The caller synchronises the block.
__device__ __forceinline__ void begin_sweep(const Args& a, int s, float* sF, float* sMx) {
  const int K = a.K, nt = blockDim.x, tid = threadIdx.x;
  const SweepKind kind = static_cast<SweepKind>(a.sweep[s].kind);
  if (kind != SweepKind::kInit) {
    const bool after_init = opens_pass(static_cast<SweepKind>(a.sweep[s - 1].kind));
    for (int e = tid; e < 2 * K; e += nt) {  // global entry e = st·K + k
      const float f = after_init ? a.colmax[2 * K + e / K] - a.colmax[e] : a.pot[e];
      sF[2 * (e % K) + e / K] = f - lg2(a.colacc[e]);
    }
  }
  if (opens_pass(kind))
    for (int e = tid; e < 2 * K; e += nt) sMx[e] = neg_inf();
}

// End of a sweep (not the last): this block's column statistics -> partial[0][cta] (sums) and partial[1][cta]
// (maxima, when the sweep opened a pass), one grid sync, then a deterministic reduction over blocks: block cta owns
// a slice of the entries; groups of its threads combine interleaved blocks' partials, then the groups are combined
// through shared memory in a fixed order. No atomics: the result does not depend on scheduling.
template <int KPT>
__device__ __forceinline__ void finish_sweep(const Args& a, cg::grid_group& grid, SweepKind kind,
                                             const float (&acc)[2][KPT], const float (&top)[2], int k0, int jn,
                                             const float* sF, float* sMx) {
  const int K = a.K, nt = blockDim.x, tid = threadIdx.x, cta = blockIdx.x;
  const int E = 2 * K + 2;  // column statistics: 2K prototypes + one global maximum per stream
  const bool init_stats = opens_pass(kind);
  const float kNegInf = neg_inf();
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

  const int used = init_stats ? E : 2 * K;
  const int per = (used + a.ctas - 1) / a.ctas;
  const int e_lo = min(used, cta * per), e_hi = min(used, e_lo + per);
  if (kind != SweepKind::kInit)
    for (int e = e_lo + tid; e < min(e_hi, 2 * K); e += nt) a.pot[e] = sF[2 * (e % K) + e / K];
  for (int e0 = e_lo; e0 < e_hi; e0 += nt) {
    const int width = min(nt, e_hi - e0), groups = nt / width;
    const int el = tid % width, g = tid / width, e = e0 + el;
    float mg = kNegInf, sg = 0.f;
    if (g < groups) {
      if (init_stats) {
        for (int c = g; c < a.ctas; c += groups) mg = fmaxf(mg, a.partial[static_cast<size_t>(a.ctas + c) * E + e]);
        if (e < 2 * K)
          for (int c = g; c < a.ctas; c += groups) {
            const float pm = a.partial[static_cast<size_t>(a.ctas + c) * E + e];
            if (pm != kNegInf) sg += a.partial[static_cast<size_t>(c) * E + e] * ex2(pm - mg);
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
            if (mh != kNegInf) sg += sMx[nt + h * width + el] * ex2(mh - mg);
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
}

// The kernel instance of a variant for a score type and width class (defined in sinkhorn_v1.cu / sinkhorn_v2.cu).
const void* kernel_v1(ScoreType type, WidthClass width);
const void* kernel_v2(ScoreType type, WidthClass width);

}  // namespace detail
}  // namespace goca
