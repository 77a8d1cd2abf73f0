// GOCA assignment (spec §1.7) as a CUDA kernel: both streams, the prior, cycles 1 and 2, any number of iterations.
//
// No torch headers here: sinkhorn.cu compiles with plain nvcc; kernels/binding.cpp wraps this API for torch.
//
// Math (log2 units, per pass with logits x_bk = α·S_r,bk + β·S_f,bk, row max m_b, per-sample offset o_b):
//   plan Q_bk = 2^((x_bk − m_b) + F_k + G_b), kept as the per-prototype potential F (global) and per-row scalars;
//   no B×K intermediate is ever written, every sweep rebuilds x from the scores on the fly.
// A pass is I iterations of [prototype step (reduce over rows), sample step (reduce over prototypes)]. The kernel
// works in *sweeps* over the rows: each sweep does one sample step per row and accumulates the next prototype
// step's column statistics; one grid-wide reduction separates sweeps. The final sample step of a pass and the
// first prototype step of the next pass share a sweep, so goca_codes takes (cycles + 1)·I + 1 sweeps.
//
// Single process: one cooperative launch runs every sweep (grid-wide syncs between them). With a process group:
// one launch per sweep, and the column statistics are all-reduced between launches (see stats_after).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace goca {

enum class ScoreType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// What a sweep leaves in the column statistics for the next one (and what a distributed caller all-reduces):
//   kNone: nothing (the last sweep);
//   kSum: colacc[2K] column sums -> all-reduce SUM;
//   kMaxSum: colmax[2K+2] column maxima + per-stream global max, colacc[2K] sums relative to colmax
//            -> all-reduce MAX on colmax, rescale colacc by 2^(local − global max), all-reduce SUM on colacc.
enum class Stats : int { kNone = 0, kSum = 1, kMaxSum = 2 };

enum class SweepKind : int {
  kInit = 0,    // sweep 0: first prototype step of pass 0 (column log-sum-exp, no sample step)
  kMiddle = 1,  // sample step + next prototype step of the same pass
  kBridge = 2,  // last sample step of pass p (gives the prior offsets) + first prototype step of pass p+1
  kLast = 3,    // last sample step of the last pass, writes the codes of the kept rows
};

__host__ __device__ inline int sweep_count(int iterations, int cycles) { return (cycles + 1) * iterations + 1; }

__host__ __device__ inline SweepKind sweep_kind(int sweep, int iterations, int cycles) {
  if (sweep == 0) return SweepKind::kInit;
  if (sweep == sweep_count(iterations, cycles) - 1) return SweepKind::kLast;
  return sweep % iterations == 0 ? SweepKind::kBridge : SweepKind::kMiddle;
}

__host__ __device__ inline Stats stats_after(int sweep, int iterations, int cycles) {
  switch (sweep_kind(sweep, iterations, cycles)) {
    case SweepKind::kInit:
    case SweepKind::kBridge: return Stats::kMaxSum;
    case SweepKind::kMiddle: return Stats::kSum;
    default: return Stats::kNone;
  }
}

constexpr int kMaxPasses = 3;   // pass 0 (no prior) + up to 2 guided cycles
constexpr int kMaxK = 10240;    // prototypes per thread × threads per block of the widest configuration

// One problem: two B×K score matrices (unit column stride, any row stride), codes of the last `keep` rows.
struct Problem {
  const void* scores[2];   // RGB, flow
  int64_t row_stride[2];   // in elements
  ScoreType type;
  int B, K, keep;
  int iterations, cycles;
  double epsilon, prior_epsilon, sign;
  float* codes[2];         // keep×K each, contiguous
};

// Device buffers (float32), sizes from the *_size helpers below; none needs initialising.
struct Workspace {
  float* colmax;   // colmax_size(K)
  float* colacc;   // colacc_size(K)
  float* pot;      // 2K   prototype potentials of the current pass
  float* rowmax;   // 2B   per-row logit maxima of the current pass
  float* partial;  // partial_size(K, ctas)  per-block column statistics
  int ctas;        // blocks the workspace was sized for (from plan_ctas)
};

inline std::size_t colmax_size(int K) { return 2 * static_cast<std::size_t>(K) + 2; }
inline std::size_t colacc_size(int K) { return 2 * static_cast<std::size_t>(K); }
inline std::size_t pot_size(int K) { return 2 * static_cast<std::size_t>(K); }
inline std::size_t rowmax_size(int B) { return 2 * static_cast<std::size_t>(B); }
inline std::size_t partial_size(int K, int ctas) { return 2 * static_cast<std::size_t>(ctas) * colmax_size(K); }

// Largest K the kernel supports on `device` (shared memory bound), or 0 with `error` set.
int max_k(int device, std::string* error);

// Blocks for a problem of B×K on `device` (requested > 0 overrides the default of one block per SM); 0 with
// `error` set when it cannot run. The workspace's partial buffer is sized for this number.
int plan_ctas(int device, int B, int K, ScoreType type, int requested, std::string* error);

// Runs sweeps [first, first + count) on `stream` as one cooperative launch. Residency of rows in shared memory
// is used only when the launch covers every sweep. Returns "" or a one-line error. No host synchronisation.
std::string run_sweeps(const Problem& problem, const Workspace& workspace, int first, int count, int device,
                       cudaStream_t stream);

}  // namespace goca
