// Host interface of the decode kernel (sp24_mma.cu), shared with its PyTorch binding.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace esparse_sp24 {

constexpr int kMaxGroup = 3;   // problems one grouped launch may run (q, k, v)
constexpr int kMaxTokens = 32;  // rows of x one launch takes (four token tiles of 8)
constexpr int kMaxClusterSplits = 8;  // the portable thread-block cluster size: splits one cluster may reduce
constexpr int kClusterRowPad = 4;     // floats after each token row of the cluster partials (bank spread)

// One problem of a launch: a packed weight, its permutation and where its results go.
struct Problem {
  const int32_t* perm;     // [K] or nullptr
  const void* vals;        // [N, K/2] fp16/bf16
  const uint32_t* meta;    // pack.py's [N, K/32] words, or the sm90 layout (meta_rows_aligned > 0)
  void* out;               // [T, ldo], columns 0..N-1 written
  float* ws;               // [splits, T, N] fp32 partials (splits > 1)
  int* counters;           // [row tiles], zero between launches
  int n, ldo;
  int meta_rows_aligned;   // 0: rows layout; > 0: sm90 layout padded to this many rows
  const void* xfrag;       // x staged in fragment order for this problem's permutation, or nullptr
};

cudaError_t sp24_mma_launch(const void* x, const Problem* probs, int count, int k, int t, int ldx, int splits,
                            int warps, int depth, int meta_variant, bool bf16, bool direct, bool pdl, bool cluster,
                            cudaStream_t stream);
cudaError_t sp24_stage_launch(const void* x, const int32_t* const* perms, void* const* xfrags, int count, int k,
                              int t, int ldx, bool pdl, cudaStream_t stream);
int sp24_effective_splits(int k, int splits);

}  // namespace esparse_sp24
