// Thin torch binding of the GOCA Sinkhorn kernel (kernels/sinkhorn.h). Checks tensors, allocates the workspace
// from torch's caching allocator (so the calls are CUDA-graph capturable) and launches on the current stream.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <vector>

#include "sinkhorn.h"

namespace {

goca::ScoreType score_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return goca::ScoreType::kFloat32;
    case at::kBFloat16: return goca::ScoreType::kBFloat16;
    case at::kHalf: return goca::ScoreType::kFloat16;
    default: TORCH_CHECK(false, "scores must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return goca::ScoreType::kFloat32;  // unreachable
}

void check_scores(const at::Tensor& sr, const at::Tensor& sf) {
  TORCH_CHECK(sr.is_cuda() && sf.is_cuda(), "scores must be CUDA tensors");
  TORCH_CHECK(sr.device() == sf.device(), "RGB and flow scores are on different devices");
  TORCH_CHECK(sr.dim() == 2 && sr.sizes() == sf.sizes(), "scores must be two B×K matrices of the same shape, got ",
              sr.sizes(), " and ", sf.sizes());
  TORCH_CHECK(sr.scalar_type() == sf.scalar_type(), "RGB and flow scores have different dtypes");
  TORCH_CHECK(sr.size(0) >= 1 && sr.size(1) >= 1, "scores must not be empty");
  for (const at::Tensor* t : {&sr, &sf})
    TORCH_CHECK(t->stride(1) == 1 || t->size(1) == 1, "scores need unit stride along K (any row stride)");
  score_type(sr);
}

void check(const std::string& error) { TORCH_CHECK(error.empty(), "GOCA Sinkhorn kernel: ", error); }

// Workspace for one goca_codes call: [colmax, colacc, potentials, row maxima, per-block partials].
std::vector<at::Tensor> new_state(const at::Tensor& sr, const at::Tensor& sf, int64_t ctas, int64_t variant) {
  check_scores(sr, sf);
  const c10::cuda::CUDAGuard guard(sr.device());  // occupancy queries and function attributes are per device
  const int B = static_cast<int>(sr.size(0)), K = static_cast<int>(sr.size(1));
  std::string error;
  const int blocks = goca::plan_ctas(sr.get_device(), B, K, score_type(sr), static_cast<int>(variant),
                                       static_cast<int>(ctas), &error);
  check(error);
  const auto opts = sr.options().dtype(at::kFloat);
  return {at::empty({static_cast<int64_t>(goca::colmax_size(K))}, opts),
          at::empty({static_cast<int64_t>(goca::colacc_size(K))}, opts),
          at::empty({static_cast<int64_t>(goca::pot_size(K))}, opts),
          at::empty({static_cast<int64_t>(goca::rowmax_size(B))}, opts),
          at::empty({2, blocks, static_cast<int64_t>(goca::colmax_size(K))}, opts)};
}

// Runs sweeps [first, first + count) of the plan (goca_fast.sweep_plan: [kind, sample pass, init pass] per sweep,
// [α_rgb, α_flow, β_rgb, β_flow, offset] per pass); codes_* receive the last codes_*.size(0) rows' codes.
void sweeps(const at::Tensor& sr, const at::Tensor& sf, at::Tensor& codes_r, at::Tensor& codes_f,
            const std::vector<at::Tensor>& state, const std::vector<int64_t>& plan,
            const std::vector<double>& passes, int64_t variant, int64_t first, int64_t count) {
  check_scores(sr, sf);
  const int B = static_cast<int>(sr.size(0)), K = static_cast<int>(sr.size(1));
  for (const at::Tensor* c : {&codes_r, &codes_f}) {
    TORCH_CHECK(c->device() == sr.device() && c->scalar_type() == at::kFloat && c->is_contiguous() &&
                    c->dim() == 2 && c->size(1) == K && c->size(0) == codes_r.size(0),
                "codes must be contiguous float32 keep×K tensors on the scores' device");
  }
  TORCH_CHECK(state.size() == 5, "state must come from new_state");
  const size_t sizes[4] = {goca::colmax_size(K), goca::colacc_size(K), goca::pot_size(K), goca::rowmax_size(B)};
  for (size_t i = 0; i < 4; ++i)
    TORCH_CHECK(state[i].numel() == static_cast<int64_t>(sizes[i]), "state does not match these scores");
  for (const at::Tensor& t : state)
    TORCH_CHECK(t.device() == sr.device() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "state must come from new_state");
  TORCH_CHECK(state[4].dim() == 3 && state[4].size(0) == 2 && state[4].size(2) == static_cast<int64_t>(sizes[0]),
              "state does not match these scores");

  TORCH_CHECK(plan.size() % 3 == 0 && passes.size() % 5 == 0, "plan must have 3 entries per sweep, 5 per pass");
  const std::vector<int> plan32(plan.begin(), plan.end());
  const std::vector<float> passes32(passes.begin(), passes.end());

  const c10::cuda::CUDAGuard guard(sr.device());
  goca::Problem p{};
  p.scores[0] = sr.data_ptr();
  p.scores[1] = sf.data_ptr();
  p.row_stride[0] = sr.stride(0);
  p.row_stride[1] = sf.stride(0);
  p.type = score_type(sr);
  p.B = B, p.K = K, p.keep = static_cast<int>(codes_r.size(0));
  p.plan = plan32.data(), p.sweeps = static_cast<int>(plan32.size() / 3);
  p.pass_coefficients = passes32.data(), p.passes = static_cast<int>(passes32.size() / 5);
  p.variant = static_cast<int>(variant);
  p.codes[0] = codes_r.data_ptr<float>();
  p.codes[1] = codes_f.data_ptr<float>();
  goca::Workspace w{state[0].data_ptr<float>(), state[1].data_ptr<float>(), state[2].data_ptr<float>(),
                    state[3].data_ptr<float>(), state[4].data_ptr<float>(), static_cast<int>(state[4].size(1))};
  check(goca::run_sweeps(p, w, static_cast<int>(first), static_cast<int>(count), sr.get_device(),
                         c10::cuda::getCurrentCUDAStream(sr.get_device()).stream()));
}

int64_t max_k(int64_t device) {
  std::string error;
  const int k = goca::max_k(static_cast<int>(device), &error);
  check(error);
  return k;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GOCA prior-guided Sinkhorn assignment (kernels/sinkhorn*.cu)";
  m.def("new_state", &new_state, "workspace for one goca_codes call (ctas=0: one block per SM; variant 1 or 2)");
  m.def("sweeps", &sweeps, "run sweeps [first, first+count) of a goca_fast.sweep_plan plan on the current stream");
  m.def("max_k", &max_k, "largest K the kernel supports on this device");
}
