// PyTorch binding of the sparse-tensor-core decode kernel (sp24_mma.cu). Host checks only: no
// synchronisation and no allocation, so the call can be captured in a CUDA graph.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "sp24_mma.h"

namespace {

// Check messages are built here with std::to_string and handed to TORCH_CHECK as one std::string, which
// c10 passes through without an ostream. Streaming an integer from this extension crashed on the device
// image (run S2, H100: SIGSEGV in basic_ostream::_M_insert<long>, resolved inside this .so, while a
// failed check built its message), so no number here goes through std::ostream.
inline void append_part(std::string& out, const char* part) { out += part; }
inline void append_part(std::string& out, const std::string& part) { out += part; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append_part(std::string& out, T part) {
  out += std::to_string(part);
}
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
}
#define ESP_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))

void check_cuda(const torch::Tensor& t, const char* name) {
  ESP_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

const int32_t* perm_pointer(const c10::optional<torch::Tensor>& perm, int64_t k) {
  if (!perm.has_value() || !perm->defined()) return nullptr;
  check_cuda(*perm, "perm");
  ESP_CHECK(perm->scalar_type() == at::kInt && perm->numel() == k && perm->is_contiguous(),
              "perm must be contiguous int32 [K]");
  return perm->data_ptr<int32_t>();
}

// outs[i][T, N_i] = x[T, K] @ W_i^T for up to 3 packed weights sharing x (one grouped launch): values_i
// [N_i, K/2], metas_i int32 [N_i, K/32] (or, with meta_rows_aligned_i > 0, uint8 in the sm90 layout of
// pack.py's meta_to_sm90, padded to that many rows, a multiple of 64 >= N_i, and to K rounded up to 128
// columns), perms_i int32 [K] or None. outs_i may be column slices of one buffer (row stride ldo).
// ws: fp32 [>= splits*T*sum(N_i)] and counters: int32 [>= sum of row tiles], zero, when splits > 1.
// xfrags_i: x staged for perms_i (sp24_stage), or None. pdl: launch as a programmatic dependent launch
// (compute capability 9.0+; sp24_mma.cu's header). cluster: the splits of a row tile reduce through
// distributed shared memory as one thread-block cluster (9.0+, 2..8 effective splits; ws and counters
// unused).
void sp24_mma(const torch::Tensor& x, const std::vector<c10::optional<torch::Tensor>>& perms,
              const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& metas,
              const std::vector<torch::Tensor>& outs, const torch::Tensor& ws, const torch::Tensor& counters,
              int64_t splits, int64_t warps, int64_t depth, int64_t meta_variant,
              const std::vector<c10::optional<torch::Tensor>>& xfrags, bool direct,
              const std::vector<int64_t>& meta_rows_aligned, bool pdl, bool cluster) {
  const size_t count = values.size();
  ESP_CHECK(count >= 1 && count <= (size_t)esparse_sp24::kMaxGroup, "a launch takes 1..",
              esparse_sp24::kMaxGroup, " weights, got ", count);
  ESP_CHECK(perms.size() == count && metas.size() == count && outs.size() == count && xfrags.size() == count &&
                  meta_rows_aligned.size() == count,
              "perms, values, metas, outs, xfrags and meta_rows_aligned need one entry per weight");
  check_cuda(x, "x");
  ESP_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with unit stride along features");
  const auto dtype = x.scalar_type();
  ESP_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "x must be float16 or bfloat16");
  const int64_t k = x.size(1), t = x.size(0);
  ESP_CHECK(k % 64 == 0, "in_features must be a multiple of 64, got ", k);
  ESP_CHECK(t >= 1 && t <= esparse_sp24::kMaxTokens, "the decode kernel takes 1..", esparse_sp24::kMaxTokens,
            " tokens, got ", t);
  ESP_CHECK(warps >= 1 && warps <= 8, "warps must be 1..8");
  ESP_CHECK(depth == 4 || depth == 8, "depth must be 4 or 8");
  ESP_CHECK(splits >= 1, "splits must be >= 1");
  ESP_CHECK(meta_variant == 0 || meta_variant == 1, "meta_variant must be 0 or 1");
  const int eff = esparse_sp24::sp24_effective_splits((int)k, (int)splits);
  ESP_CHECK(!cluster || (eff >= 2 && eff <= esparse_sp24::kMaxClusterSplits), "the cluster reduction takes 2..",
            esparse_sp24::kMaxClusterSplits, " effective splits, got ", eff);
  if (cluster) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, (int)x.device().index());
    ESP_CHECK(major >= 9, "the cluster reduction needs compute capability 9.0, the device has ", major, ".x");
  }
  const bool workspace = eff > 1 && !cluster;  // the cluster reduction needs no partials in global memory
  const int64_t tile_rows = 16 * warps;
  esparse_sp24::Problem probs[esparse_sp24::kMaxGroup] = {};
  int64_t rows_before = 0, tiles_before = 0;
  for (size_t i = 0; i < count; ++i) {
    const torch::Tensor& vals = values[i];
    const torch::Tensor& meta = metas[i];
    const torch::Tensor& out = outs[i];
    check_cuda(vals, "values");
    check_cuda(meta, "meta");
    check_cuda(out, "out");
    ESP_CHECK(vals.dim() == 2 && out.dim() == 2, "values and out must be 2-D");
    ESP_CHECK(vals.scalar_type() == dtype && out.scalar_type() == dtype, "x, values and out must share a dtype");
    const int64_t n = vals.size(0);
    ESP_CHECK(2 * vals.size(1) == k, "x has ", k, " features, weight ", i, " has ", 2 * vals.size(1));
    ESP_CHECK(vals.is_contiguous() && meta.is_contiguous(), "values and meta must be contiguous");
    const int64_t aligned = meta_rows_aligned[i];
    if (aligned == 0) {
      ESP_CHECK(meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.size(0) == n && meta.size(1) == k / 32,
                  "meta must be int32 [N, K/32]");
    } else {
      ESP_CHECK(aligned % 64 == 0 && aligned >= n && aligned < (int64_t(1) << 24),
                  "meta_rows_aligned must be a multiple of 64 and >= N, got ", aligned);
      ESP_CHECK(meta.scalar_type() == at::kByte && meta.numel() >= aligned * ((k + 127) / 128) * 16,
                  "sm90 meta must be uint8 with >= rows_aligned * ceil(K/128) * 16 bytes");
    }
    ESP_CHECK(out.stride(1) == 1 && out.size(0) == t && out.size(1) == n,
                "out must be [T, N] with unit stride along features");
    esparse_sp24::Problem& q = probs[i];
    q.perm = perm_pointer(perms[i], k);
    q.vals = vals.data_ptr();
    q.meta = static_cast<const uint32_t*>(meta.data_ptr());
    q.out = out.data_ptr();
    q.n = (int)n;
    q.ldo = (int)out.stride(0);
    q.meta_rows_aligned = (int)aligned;
    if (xfrags[i].has_value() && xfrags[i]->defined()) {
      const torch::Tensor& xf = *xfrags[i];
      check_cuda(xf, "xfrag");
      ESP_CHECK(xf.scalar_type() == dtype && xf.is_contiguous() && xf.numel() >= t * k,
                  "xfrag must be a contiguous buffer of >= T*K elements of the weight dtype");
      q.xfrag = xf.data_ptr();
    }
    ESP_CHECK(!direct || q.xfrag != nullptr, "direct B-fragment reads need the staged xfrag buffer");
    if (workspace) {
      check_cuda(ws, "ws");
      check_cuda(counters, "counters");
      ESP_CHECK(ws.scalar_type() == at::kFloat && counters.scalar_type() == at::kInt, "ws float32, counters int32");
      q.ws = ws.data_ptr<float>() + eff * t * rows_before;
      q.counters = counters.data_ptr<int>() + tiles_before;
    }
    rows_before += n;
    tiles_before += (n + tile_rows - 1) / tile_rows;
  }
  if (workspace) {
    ESP_CHECK(ws.numel() >= eff * t * rows_before, "ws too small: need ", eff * t * rows_before, " floats");
    ESP_CHECK(counters.numel() >= tiles_before, "counters too small: need ", tiles_before);
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  cudaError_t err = esparse_sp24::sp24_mma_launch(
      x.data_ptr(), probs, (int)count, (int)k, (int)t, (int)x.stride(0), (int)splits, (int)warps, (int)depth,
      (int)meta_variant, dtype == at::kBFloat16, direct, pdl, cluster, stream);
  ESP_CHECK(err == cudaSuccess, "sp24_mma launch failed: ", cudaGetErrorString(err));
}

// x[t, perms_i[col]] for all of K in the decode kernel's B-fragment order, into xfrags_i (>= T*K
// elements each), for up to 3 permutations in one launch.
void sp24_stage(const torch::Tensor& x, const std::vector<c10::optional<torch::Tensor>>& perms,
                const std::vector<torch::Tensor>& xfrags, bool pdl) {
  check_cuda(x, "x");
  ESP_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with unit stride along features");
  const int64_t t = x.size(0), k = x.size(1);
  ESP_CHECK(k % 64 == 0, "sp24_stage needs in_features % 64 == 0, got ", k);
  ESP_CHECK(t >= 1 && t <= esparse_sp24::kMaxTokens, "sp24_stage takes 1..", esparse_sp24::kMaxTokens,
            " tokens, got ", t);
  ESP_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be float16 or bfloat16");
  const size_t count = xfrags.size();
  ESP_CHECK(count >= 1 && count <= (size_t)esparse_sp24::kMaxGroup && perms.size() == count,
              "sp24_stage takes 1..", esparse_sp24::kMaxGroup, " (perm, xfrag) pairs");
  const int32_t* perm_ptrs[esparse_sp24::kMaxGroup] = {};
  void* xfrag_ptrs[esparse_sp24::kMaxGroup] = {};
  for (size_t i = 0; i < count; ++i) {
    const torch::Tensor& xf = xfrags[i];
    check_cuda(xf, "xfrag");
    ESP_CHECK(xf.scalar_type() == x.scalar_type() && xf.is_contiguous() && xf.numel() >= t * k,
                "xfrag must be a contiguous buffer of >= T*K elements of x's dtype");
    perm_ptrs[i] = perm_pointer(perms[i], k);
    xfrag_ptrs[i] = xf.data_ptr();
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  cudaError_t err = esparse_sp24::sp24_stage_launch(x.data_ptr(), perm_ptrs, xfrag_ptrs, (int)count, (int)k, (int)t,
                                                    (int)x.stride(0), pdl, stream);
  ESP_CHECK(err == cudaSuccess, "sp24_stage launch failed: ", cudaGetErrorString(err));
}

int64_t effective_splits(int64_t k, int64_t splits) {
  return esparse_sp24::sp24_effective_splits((int)k, (int)splits);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sp24_mma", &sp24_mma, "2:4 decode on sparse tensor cores (mma.sp), 1-3 weights sharing x per launch");
  m.def("sp24_stage", &sp24_stage, "x[:, perm_i] in the decode kernel's fragment order (for the pre mode), 1-3 permutations per launch");
  m.def("effective_splits", &effective_splits, "split-K factor actually launched for K and a requested split");
}
