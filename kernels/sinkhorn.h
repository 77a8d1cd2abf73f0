// GOCA assignment (the official prior-guided Sinkhorn iterate, see goca_fast/assign.py) as a CUDA kernel: both streams, the prior, cycles 1 and 2, any number of iterations.
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
// The schedule (which kind each sweep is, which passes it uses, the pass coefficients) is made by
// goca_fast/sweep_plan.py and handed to the launch; the kernel only reads it. The CPU model of the kernel in the
// tests walks the same plan.
//
// Single process: one cooperative launch runs every sweep (grid-wide syncs between them). With a process group:
// one launch per sweep, and the column statistics are all-reduced between launches (see Stats).
//
// Two variants of the kernel exist (Problem::variant): 1, the first design (sinkhorn_v1.cu), and 2, the default
// (sinkhorn_v2.cu: shuffle-based block reductions, one combined (max, sum) reduction per sample step, next row's
// loads overlapped with the current row's reductions). Both compute the same thing; they differ in speed and in
// the order of floating-point sums.
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
// (goca_fast.sweep_plan.STATS_*; kMaxSum after init and bridge sweeps, kSum after middle sweeps.)
enum class Stats : int { kNone = 0, kSum = 1, kMaxSum = 2 };

enum class SweepKind : int {  // goca_fast.sweep_plan.INIT etc.
  kInit = 0,    // sweep 0: first prototype step of pass 0 (column log-sum-exp, no sample step)
  kMiddle = 1,  // sample step + next prototype step of the same pass
  kBridge = 2,  // last sample step of pass p (gives the prior offsets) + first prototype step of pass p+1
  kLast = 3,    // last sample step of the last pass, writes the codes of the kept rows
};

constexpr int kMaxPasses = 3;   // pass 0 (no prior) + up to 2 guided cycles
constexpr int kMaxSweeps = 128; // the plan travels in the launch parameters (goca_fast.sweep_plan.MAX_SWEEPS)
constexpr int kMaxK = 10240;    // prototypes per thread × threads per block of the widest configuration

// One problem: two B×K score matrices (unit column stride, any row stride), codes of the last `keep` rows, and
// the plan that says what to compute.
struct Problem {
  const void* scores[2];   // RGB, flow
  int64_t row_stride[2];   // in elements
  ScoreType type;
  int B, K, keep;
  const int* plan;                 // [kind, sample pass, init pass] per sweep (host memory)
  int sweeps;
  const float* pass_coefficients;  // [α_rgb, α_flow, β_rgb, β_flow, offset] per pass, log2 units (host memory)
  int passes;
  int variant;                     // 1 or 2
  float* codes[2];                 // keep×K each, contiguous
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

// Blocks for a problem of B×K on `device` with kernel `variant` (requested > 0 overrides the default of one block per SM); 0 with
// `error` set when it cannot run. The workspace's partial buffer is sized for this number.
int plan_ctas(int device, int B, int K, ScoreType type, int variant, int requested, std::string* error);

// Runs sweeps [first, first + count) on `stream` as one cooperative launch. Residency of rows in shared memory
// is used only when the launch covers every sweep. Returns "" or a one-line error. No host synchronisation.
std::string run_sweeps(const Problem& problem, const Workspace& workspace, int first, int count, int device,
                       cudaStream_t stream);

}  // namespace goca
