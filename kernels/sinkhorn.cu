// GOCA assignment kernel, host side: device queries, launch geometry, shared-memory residency, the cooperative
// launch of either variant (sinkhorn_v1.cu, sinkhorn_v2.cu). See sinkhorn.h for the math and the schedule.
#include "sinkhorn.h"

#include <algorithm>
#include <mutex>
#include <set>
#include <utility>

#include "sinkhorn_device.cuh"

namespace goca {
namespace {

using detail::Args;
using detail::WidthClass;

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

// What a launch needs to know of a configuration: rows per step and threads per block.
struct Geometry {
  int rows_per_step = 1, threads = 32;
  const void* kernel = nullptr;
};

template <class C>
Geometry geometry_of(int K, const void* kernel) {
  const int t = (K + C::KPT - 1) / C::KPT;
  return Geometry{C::R, std::max(32, (t + 31) / 32 * 32), kernel};
}

Geometry geometry(int variant, int K, ScoreType type) {
  const WidthClass w = detail::width_class(K);
  if (variant == 1) {
    const void* k = detail::kernel_v1(type, w);
    if (w == WidthClass::kNarrow) return geometry_of<detail::V1::Narrow>(K, k);
    if (w == WidthClass::kMedium) return geometry_of<detail::V1::Medium>(K, k);
    return geometry_of<detail::V1::Wide>(K, k);
  }
  const void* k = detail::kernel_v2(type, w);
  if (w == WidthClass::kNarrow) return geometry_of<detail::V2::Narrow>(K, k);
  if (w == WidthClass::kMedium) return geometry_of<detail::V2::Medium>(K, k);
  return geometry_of<detail::V2::Wide>(K, k);
}

std::size_t base_smem(int K, int threads) {
  return sizeof(float) * (2 * static_cast<std::size_t>(K) + std::max(2 * K, 2 * threads) + detail::kRedFloats);
}

std::size_t score_bytes(ScoreType t) { return t == ScoreType::kFloat32 ? 4 : 2; }

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

// One-line reason the plan cannot run, or "".
std::string check_plan(const Problem& p) {
  if (p.sweeps < 1 || p.sweeps > kMaxSweeps) return "the plan needs 1.." + std::to_string(kMaxSweeps) + " sweeps";
  if (p.passes < 1 || p.passes > kMaxPasses) return "the plan needs 1.." + std::to_string(kMaxPasses) + " passes";
  for (int s = 0; s < p.sweeps; ++s) {
    const int kind = p.plan[3 * s], sample = p.plan[3 * s + 1], init = p.plan[3 * s + 2];
    const bool first = s == 0, last = s == p.sweeps - 1;
    if (kind < 0 || kind > static_cast<int>(SweepKind::kLast) || sample < 0 || sample >= p.passes || init < 0 ||
        init >= p.passes)
      return "sweep " + std::to_string(s) + " of the plan is malformed";
    if (first != (kind == static_cast<int>(SweepKind::kInit)) || last != (kind == static_cast<int>(SweepKind::kLast)))
      return "the plan must start with its init sweep and end with its last sweep";
  }
  return std::string();
}

}  // namespace

int max_k(int device, std::string* error) {
  const DeviceInfo& d = device_info(device);
  if (!d.error.empty()) {
    *error = d.error;
    return 0;
  }
  // base_smem(K) = 4·(4K + kRedFloats) once K ≥ threads (always true for K ≥ 32)
  const int by_smem = static_cast<int>((d.smem_block / sizeof(float) - detail::kRedFloats) / 4);
  return std::min(kMaxK, by_smem);
}

int plan_ctas(int device, int B, int K, ScoreType type, int variant, int requested, std::string* error) {
  const int kmax = max_k(device, error);
  if (kmax == 0) return 0;
  if (variant != 1 && variant != 2) {
    *error = "kernel variant must be 1 or 2, got " + std::to_string(variant);
    return 0;
  }
  if (B < 1 || K < 1 || K > kmax) {
    *error = "B=" + std::to_string(B) + ", K=" + std::to_string(K) + " outside the kernel's range (B >= 1, 1 <= K <= " +
             std::to_string(kmax) + ")";
    return 0;
  }
  const DeviceInfo& d = device_info(device);
  const Geometry g = geometry(variant, K, type);
  const int want = (B + g.rows_per_step - 1) / g.rows_per_step;
  const int ctas = std::min(requested > 0 ? requested : d.sms, want);
  if (ctas > d.sms) {  // more than one block per SM: they must all be co-resident
    int per_sm = 0;
    cudaError_t e = allow_max_smem(g.kernel, device, d.smem_block);
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, g.kernel, g.threads, base_smem(K, g.threads));
    if (e != cudaSuccess) (void)cudaGetLastError();
    if (e != cudaSuccess || per_sm * d.sms < ctas) {
      *error = "requested " + std::to_string(ctas) + " blocks, at most " + std::to_string(per_sm * d.sms) +
               " can be co-resident";
      return 0;
    }
  }
  return ctas;
}

std::string run_sweeps(const Problem& p, const Workspace& w, int first, int count, int device, cudaStream_t stream) {
  std::string error;
  const int kmax = max_k(device, &error);
  if (kmax == 0) return error;
  if (p.variant != 1 && p.variant != 2) return "kernel variant must be 1 or 2";
  if (p.B < 1 || p.K < 1 || p.K > kmax) return "K must be in [1, " + std::to_string(kmax) + "] and B >= 1";
  if (p.keep < 1 || p.keep > p.B) return "keep must be in [1, B]";
  error = check_plan(p);
  if (!error.empty()) return error;
  if (first < 0 || count < 1 || first + count > p.sweeps)
    return "sweep range outside [0, " + std::to_string(p.sweeps) + ")";
  if (w.ctas < 1) return "workspace has no blocks";
  const DeviceInfo& d = device_info(device);

  Args a{};
  for (int st = 0; st < 2; ++st) {
    a.scores[st] = p.scores[st];
    a.ld[st] = p.row_stride[st];
    a.codes[st] = p.codes[st];
  }
  a.colmax = w.colmax, a.colacc = w.colacc, a.pot = w.pot, a.rowmax = w.rowmax, a.partial = w.partial;
  a.B = p.B, a.K = p.K, a.keep = p.keep;
  a.first = first, a.count = count, a.ctas = w.ctas, a.bf16 = p.type == ScoreType::kBFloat16;
  for (int q = 0; q < p.passes; ++q) {
    const float* c = p.pass_coefficients + 5 * q;
    a.pass[q] = detail::PassCoef{{c[0], c[1]}, {c[2], c[3]}, c[4]};
  }
  for (int s = 0; s < p.sweeps; ++s)
    a.sweep[s] = detail::SweepEntry{static_cast<signed char>(p.plan[3 * s]), static_cast<signed char>(p.plan[3 * s + 1]),
                                    static_cast<signed char>(p.plan[3 * s + 2]), 0};

  const Geometry g = geometry(p.variant, p.K, p.type);
  std::size_t smem = base_smem(p.K, g.threads);
  if (first == 0 && count == p.sweeps) {  // fused: keep as many rows resident in shared memory as fit
    const int per_sm = (w.ctas + d.sms - 1) / d.sms;
    const long budget =
        std::min<long>(d.smem_block, d.smem_sm / per_sm - detail::kReservedSmemPerBlock) - long(smem);
    const long row_bytes = 2L * p.K * long(score_bytes(p.type));
    const int chunk = (p.B + w.ctas - 1) / w.ctas;
    a.resident = budget > 0 ? static_cast<int>(std::min<long>(chunk, budget / row_bytes)) : 0;
    smem += std::size_t(a.resident) * row_bytes;
  }
  cudaError_t e = allow_max_smem(g.kernel, device, d.smem_block);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so that torch's next launch check does not report it
    return std::string("cannot raise the shared-memory limit: ") + cudaGetErrorString(e);
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(w.ctas);
  config.blockDim = dim3(g.threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  void* args[] = {&a};
  e = cudaLaunchKernelExC(&config, g.kernel, args);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("kernel launch failed: ") + cudaGetErrorString(e);
  }
  return std::string();
}

}  // namespace goca
