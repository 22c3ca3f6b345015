// PyTorch binding of the sparse-tensor-core decode kernel (sp24_mma.cu). Host checks only: no
// synchronisation and no allocation, so the call can be captured in a CUDA graph.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace esparse_sp24 {
cudaError_t sp24_mma_launch(const void* x, const int32_t* perm, const void* vals, const uint32_t* meta,
                            void* out, float* ws, int* counters, int n, int k, int t, int ldx, int ldo,
                            int splits, int warps, int depth, int meta_variant, int meta_rows_aligned,
                            bool bf16, const void* xfrag, bool direct, bool pdl, cudaStream_t stream,
                            size_t* smem_out);
cudaError_t sp24_stage_launch(const void* x, const int32_t* perm, void* xfrag, int k, int t, int ldx,
                              bool pdl, cudaStream_t stream);
int sp24_effective_splits(int k, int splits);
}  // namespace esparse_sp24

namespace {

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

// out[T, N] = x[T, K] @ W^T for the packed weight (values [N, K/2], meta int32 [N, K/32], perm int32 [K]
// or None). ws: fp32 [>= splits*T*N] and counters: int32 [>= row tiles], zero, when splits > 1.
// meta_rows_aligned > 0: meta is instead uint8 in the sm90 layout (pack.py's meta_to_sm90), padded to
// that many rows (a multiple of 64, >= N) and to K rounded up to 128 columns. pdl: launch as a
// programmatic dependent launch (compute capability 9.0+; sp24_mma.cu's header).
void sp24_mma(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm, const torch::Tensor& values,
              const torch::Tensor& meta, torch::Tensor& out, const torch::Tensor& ws,
              const torch::Tensor& counters, int64_t splits, int64_t warps, int64_t depth,
              int64_t meta_variant, const c10::optional<torch::Tensor>& xfrag, bool direct,
              int64_t meta_rows_aligned, bool pdl) {
  check_cuda(x, "x");
  check_cuda(values, "values");
  check_cuda(meta, "meta");
  check_cuda(out, "out");
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2 && out.dim() == 2, "2-D tensors expected");
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "values must be float16 or bfloat16");
  TORCH_CHECK(x.scalar_type() == dtype && out.scalar_type() == dtype, "x, values and out must share a dtype");
  const int64_t n = values.size(0), kh = values.size(1), k = 2 * kh, t = x.size(0);
  TORCH_CHECK(k % 64 == 0, "in_features must be a multiple of 64, got ", k);
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " features, the weight ", k);
  TORCH_CHECK(t >= 1 && t <= 16, "the decode kernel takes 1..16 tokens, got ", t);
  TORCH_CHECK(values.is_contiguous() && meta.is_contiguous(), "values and meta must be contiguous");
  if (meta_rows_aligned == 0) {
    TORCH_CHECK(meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.size(0) == n && meta.size(1) == k / 32,
                "meta must be int32 [N, K/32]");
  } else {
    TORCH_CHECK(meta_rows_aligned % 64 == 0 && meta_rows_aligned >= n && meta_rows_aligned < (int64_t(1) << 24),
                "meta_rows_aligned must be a multiple of 64 and >= N, got ", meta_rows_aligned);
    TORCH_CHECK(meta.scalar_type() == at::kByte && meta.numel() >= meta_rows_aligned * ((k + 127) / 128) * 16,
                "sm90 meta must be uint8 with >= rows_aligned * ceil(K/128) * 16 bytes");
  }
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "x and out need unit stride along features");
  TORCH_CHECK(out.size(0) == t && out.size(1) == n, "out must be [T, N]");
  TORCH_CHECK(warps >= 1 && warps <= 8, "warps must be 1..8");
  TORCH_CHECK(depth == 4 || depth == 8, "depth must be 4 or 8");
  TORCH_CHECK(splits >= 1, "splits must be >= 1");
  TORCH_CHECK(meta_variant == 0 || meta_variant == 1, "meta_variant must be 0 or 1");
  const int32_t* perm_ptr = nullptr;
  if (perm.has_value() && perm->defined()) {
    check_cuda(*perm, "perm");
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->numel() == k && perm->is_contiguous(),
                "perm must be contiguous int32 [K]");
    perm_ptr = perm->data_ptr<int32_t>();
  }
  const int eff = esparse_sp24::sp24_effective_splits((int)k, (int)splits);
  float* ws_ptr = nullptr;
  int* cnt_ptr = nullptr;
  if (eff > 1) {
    check_cuda(ws, "ws");
    check_cuda(counters, "counters");
    const int64_t tile_rows = 16 * warps;
    TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.numel() >= eff * t * n, "ws too small");
    TORCH_CHECK(counters.scalar_type() == at::kInt && counters.numel() >= (n + tile_rows - 1) / tile_rows,
                "counters too small");
    ws_ptr = ws.data_ptr<float>();
    cnt_ptr = counters.data_ptr<int>();
  }
  const void* xfrag_ptr = nullptr;
  if (xfrag.has_value() && xfrag->defined()) {
    check_cuda(*xfrag, "xfrag");
    TORCH_CHECK(xfrag->scalar_type() == dtype && xfrag->is_contiguous() && xfrag->numel() >= t * k,
                "xfrag must be a contiguous buffer of >= T*K elements of the weight dtype");
    xfrag_ptr = xfrag->data_ptr();
  }
  TORCH_CHECK(!direct || xfrag_ptr != nullptr, "direct B-fragment reads need the staged xfrag buffer");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  cudaError_t err = esparse_sp24::sp24_mma_launch(
      x.data_ptr(), perm_ptr, values.data_ptr(), static_cast<const uint32_t*>(meta.data_ptr()),
      out.data_ptr(), ws_ptr, cnt_ptr, (int)n, (int)k, (int)t, (int)x.stride(0), (int)out.stride(0),
      (int)splits, (int)warps, (int)depth, (int)meta_variant, (int)meta_rows_aligned, dtype == at::kBFloat16,
      xfrag_ptr, direct, pdl, stream, nullptr);
  TORCH_CHECK(err == cudaSuccess, "sp24_mma launch failed: ", cudaGetErrorString(err));
}

// x[t, perm[col]] for all of K in the decode kernel's B-fragment order, into xfrag (>= T*K elements).
void sp24_stage(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm, torch::Tensor& xfrag, bool pdl) {
  check_cuda(x, "x");
  check_cuda(xfrag, "xfrag");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with unit stride along features");
  const int64_t t = x.size(0), k = x.size(1);
  TORCH_CHECK(k % 64 == 0 && t >= 1 && t <= 16, "sp24_stage needs K % 64 == 0 and 1..16 tokens");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be float16 or bfloat16");
  TORCH_CHECK(xfrag.scalar_type() == x.scalar_type() && xfrag.is_contiguous() && xfrag.numel() >= t * k,
              "xfrag must be a contiguous buffer of >= T*K elements of x's dtype");
  const int32_t* perm_ptr = nullptr;
  if (perm.has_value() && perm->defined()) {
    check_cuda(*perm, "perm");
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->numel() == k && perm->is_contiguous(),
                "perm must be contiguous int32 [K]");
    perm_ptr = perm->data_ptr<int32_t>();
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  cudaError_t err = esparse_sp24::sp24_stage_launch(x.data_ptr(), perm_ptr, xfrag.data_ptr(), (int)k, (int)t,
                                                    (int)x.stride(0), pdl, stream);
  TORCH_CHECK(err == cudaSuccess, "sp24_stage launch failed: ", cudaGetErrorString(err));
}

int64_t effective_splits(int64_t k, int64_t splits) {
  return esparse_sp24::sp24_effective_splits((int)k, (int)splits);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sp24_mma", &sp24_mma, "2:4 decode on sparse tensor cores (mma.sp)");
  m.def("sp24_stage", &sp24_stage, "x[:, perm] in the decode kernel's fragment order (for the pre mode)");
  m.def("effective_splits", &effective_splits, "split-K factor actually launched for K and a requested split");
}
