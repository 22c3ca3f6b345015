// Prefill path for 2:4 layers on Hopper: CUTLASS's sparse warpgroup GEMM (wgmma.sp), behind a
// plain C ABI that esparse_kernels.cutlass_sp24 loads with ctypes. No torch headers: the library
// only sees device pointers and the caller's stream, so it is built once per machine and CUDA
// version, not per torch build, and a launch is graph-capturable (no allocation, no sync).
//
// Problem, in CUTLASS's names: D[M, N] = A[M, K] * B[K, N] with
//   A = the 2:4 weight, out_features x in_features, K-contiguous (compressed by CUTLASS's own
//       compressor from the masked dense weight, so its metadata layout is CUTLASS's, not pack.py's);
//   B = the activations x[tokens, in_features] row-major, i.e. K-contiguous ("column-major B");
//   D = y[tokens, out_features] row-major, i.e. column-major M x N.
//
// Each translation unit is compiled with one ESP_UNIT value so that the units build in parallel:
//   ESP_UNIT = 100 * dtype + config for a GEMM instantiation, ESP_UNIT = -1 for the dispatcher
//   (layouts, compressor, the extern "C" entry points).
// All configurations share the tile K of 128, hence one compressed layout per dtype
// (Sm90GemmSparseConfig depends on the element type and min(tile K, 128) only; checked below).

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

#ifndef ESP_UNIT
#error "compile with -DESP_UNIT=<100*dtype+config> or -DESP_UNIT=-1 (dispatcher)"
#endif

namespace esp {

using ProblemShape = Shape<int, int, int, int>;

// The tuner's candidates. Tile M runs over out_features, tile N over tokens; K is fixed at 128.
// Cooperative kernels split a tile's M between two consumer warpgroups (tile M >= 128);
// ping-pong kernels give each warpgroup a whole tile and overlap one's epilogue with the other's
// main loop.
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// Persistent tile scheduler (the default) or stream-K, which splits the last wave's K loops over the
// idle multiprocessors (it needs a workspace; the adapter zeroes it on the stream).
using Persistent = cutlass::gemm::PersistentScheduler;
using StreamK = cutlass::gemm::StreamKScheduler;

template <int Config> struct ConfigTraits;
template <> struct ConfigTraits<0> {  // the CUTLASS example's shape
  using Tile = Shape<_128, _128, _128>; using Cluster = Shape<_1, _2, _1>;
  using Schedule = Coop; using EpiSchedule = CoopEpi; using Scheduler = Persistent;
  static constexpr const char* name = "coop_128x128x128_c1x2";
};
template <> struct ConfigTraits<1> {
  using Tile = Shape<_256, _128, _128>; using Cluster = Shape<_1, _2, _1>;
  using Schedule = Coop; using EpiSchedule = CoopEpi; using Scheduler = Persistent;
  static constexpr const char* name = "coop_256x128x128_c1x2";
};
template <> struct ConfigTraits<2> {
  using Tile = Shape<_128, _128, _128>; using Cluster = Shape<_2, _1, _1>;
  using Schedule = Coop; using EpiSchedule = CoopEpi; using Scheduler = Persistent;
  static constexpr const char* name = "coop_128x128x128_c2x1";
};
template <> struct ConfigTraits<3> {
  using Tile = Shape<_64, _128, _128>; using Cluster = Shape<_1, _2, _1>;
  using Schedule = Ping; using EpiSchedule = PingEpi; using Scheduler = Persistent;
  static constexpr const char* name = "ping_64x128x128_c1x2";
};
template <> struct ConfigTraits<4> {
  using Tile = Shape<_256, _128, _128>; using Cluster = Shape<_2, _1, _1>;
  using Schedule = Coop; using EpiSchedule = CoopEpi; using Scheduler = Persistent;
  static constexpr const char* name = "coop_256x128x128_c2x1";
};
template <> struct ConfigTraits<5> {
  using Tile = Shape<_256, _128, _128>; using Cluster = Shape<_1, _1, _1>;
  using Schedule = Coop; using EpiSchedule = CoopEpi; using Scheduler = Persistent;
  static constexpr const char* name = "coop_256x128x128_c1x1";
};
template <> struct ConfigTraits<6> {
  using Tile = Shape<_256, _128, _128>; using Cluster = Shape<_1, _2, _1>;
  using Schedule = Coop; using EpiSchedule = CoopEpi; using Scheduler = StreamK;
  static constexpr const char* name = "coop_256x128x128_c1x2_streamk";
};
template <> struct ConfigTraits<7> {
  using Tile = Shape<_128, _128, _128>; using Cluster = Shape<_1, _2, _1>;
  using Schedule = Ping; using EpiSchedule = PingEpi; using Scheduler = Persistent;
  static constexpr const char* name = "ping_128x128x128_c1x2";
};
constexpr int kNumConfigs = 8;

template <int Dtype> struct DtypeTraits;
template <> struct DtypeTraits<0> { using Element = cutlass::half_t; };
template <> struct DtypeTraits<1> { using Element = cutlass::bfloat16_t; };

template <int Dtype, int Config>
struct SparseGemm {
  using Element = typename DtypeTraits<Dtype>::Element;
  using Traits = ConfigTraits<Config>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      typename Traits::Tile, typename Traits::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto,
      float, float,
      void, cutlass::layout::ColumnMajor, kAlign,      // no C operand (beta = 0)
      Element, cutlass::layout::ColumnMajor, kAlign,   // D = y[tokens, out] row-major
      typename Traits::EpiSchedule>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,      // A: weight, K-contiguous
      Element, cutlass::layout::ColumnMajor, kAlign,   // B: x[tokens, in], K-contiguous
      float,
      typename Traits::Tile, typename Traits::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Traits::Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue,
                                                      typename Traits::Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename Mainloop::SparseConfig;
};

// The compressed layout every configuration of a dtype shares (config 0's).
template <int Dtype> using SharedSparseConfig = typename SparseGemm<Dtype, 0>::SparseConfig;

template <int Dtype>
using CompressorUtility = cutlass::transform::kernel::StructuredSparseCompressorUtility<
    ProblemShape, typename DtypeTraits<Dtype>::Element, cutlass::layout::RowMajor,
    SharedSparseConfig<Dtype>>;

template <int Dtype>
using Compressor = cutlass::transform::device::TransformUniversalAdapter<
    cutlass::transform::kernel::StructuredSparseCompressor<
        ProblemShape, typename DtypeTraits<Dtype>::Element, cutlass::layout::RowMajor,
        SharedSparseConfig<Dtype>, cutlass::arch::Sm90>>;

using StrideRowMajor = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;

// Arguments of one GEMM launch, shared by the workspace query and the run.
template <int Dtype, int Config>
typename SparseGemm<Dtype, Config>::Gemm::Arguments gemm_arguments(
    int M, int N, int K, const void* a_comp, const void* e, const void* b, void* d,
    int sm_count) {
  using G = SparseGemm<Dtype, Config>;
  using Gemm = typename G::Gemm;
  using Element = typename G::Element;
  using Mainloop = typename G::Mainloop;
  using ElementE = typename Mainloop::ElementE;
  static_assert(std::is_same_v<typename G::SparseConfig, SharedSparseConfig<Dtype>>,
                "every configuration must share one compressed layout");
  ProblemShape problem{M, N, K, 1};
  auto stride_b = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideB{},
                                                   cute::make_shape(N, K, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideD{},
                                                   cute::make_shape(M, N, 1));
  auto layout_a = G::SparseConfig::fill_layoutA(problem);
  auto layout_e = G::SparseConfig::fill_layoutE(problem);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = 0;
  hw_info.sm_count = sm_count;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {static_cast<const Element*>(a_comp), layout_a, static_cast<const Element*>(b), stride_b,
       static_cast<const ElementE*>(e), layout_e},
      {{1.0f, 0.0f}, nullptr, stride_d, static_cast<Element*>(d), stride_d},
      hw_info};
  return args;
}

template <int Dtype, int Config>
int gemm_run(int M, int N, int K, const void* a_comp, const void* e, const void* b, void* d,
             void* workspace, size_t workspace_bytes, int sm_count, cudaStream_t stream,
             size_t* workspace_needed) {
  using Gemm = typename SparseGemm<Dtype, Config>::Gemm;
  auto args = gemm_arguments<Dtype, Config>(M, N, K, a_comp, e, b, d, sm_count);
  size_t need = Gemm::get_workspace_size(args);
  if (workspace_needed) { *workspace_needed = need; return 0; }
  if (need > workspace_bytes) return 2;
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 3;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 4;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 5;
  return 0;
}

}  // namespace esp

// esp_gemm_<dtype>_<config>: one per GEMM unit, all declared for the dispatcher.
#define ESP_GEMM_SIGNATURE(D, C)                                                                  \
  int esp_gemm_##D##_##C(int M, int N, int K, const void* a_comp, const void* e, const void* b,   \
                         void* d, void* workspace, size_t workspace_bytes, int sm_count,           \
                         cudaStream_t stream, size_t* workspace_needed)
#define ESP_GEMM_DEFINE(D, C)                                                                     \
  ESP_GEMM_SIGNATURE(D, C) {                                                                      \
    return esp::gemm_run<D, C>(M, N, K, a_comp, e, b, d, workspace, workspace_bytes, sm_count,    \
                               stream, workspace_needed);                                         \
  }
#define ESP_EXPAND_DEFINE(D, C) ESP_GEMM_DEFINE(D, C)

#if ESP_UNIT >= 0
#if !defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#error "CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED is not defined: build with -gencode=arch=compute_90a,code=sm_90a and CUDA >= 12.2"
#endif
#if !defined(ESP_DTYPE) || !defined(ESP_CONFIG) || ESP_UNIT != 100 * ESP_DTYPE + ESP_CONFIG
#error "a GEMM unit needs -DESP_DTYPE=<d> -DESP_CONFIG=<c> with ESP_UNIT = 100 * d + c"
#endif
ESP_EXPAND_DEFINE(ESP_DTYPE, ESP_CONFIG)

#else  // the dispatcher

#define ESP_DECLARE_DTYPE(D)                                                                      \
  ESP_GEMM_SIGNATURE(D, 0); ESP_GEMM_SIGNATURE(D, 1); ESP_GEMM_SIGNATURE(D, 2);                   \
  ESP_GEMM_SIGNATURE(D, 3); ESP_GEMM_SIGNATURE(D, 4); ESP_GEMM_SIGNATURE(D, 5);                   \
  ESP_GEMM_SIGNATURE(D, 6); ESP_GEMM_SIGNATURE(D, 7);
ESP_DECLARE_DTYPE(0)
ESP_DECLARE_DTYPE(1)

// out[r, j] = x[r, perm[j]] for one block of `rows` rows: the rows are read once, coalesced, into
// shared memory, then gathered from there (a gather straight from global memory touches about one
// cache line per element, which is what makes torch.index_select along dim 1 slow).
template <typename T>
__global__ void permute_columns_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm,
                                       T* __restrict__ out, int n_rows, int K, int rows_per_block) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* rows_smem = reinterpret_cast<T*>(smem_raw);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int rows = min(rows_per_block, n_rows - static_cast<int>(row0));
  if (rows <= 0) return;
  const int64_t count = static_cast<int64_t>(rows) * K;
  const T* src = x + row0 * K;
  if ((K * sizeof(T)) % 16 == 0) {  // 16-byte vectors (rows are then 16-byte aligned too)
    const int64_t vecs = count * sizeof(T) / 16;
    const uint4* src4 = reinterpret_cast<const uint4*>(src);
    uint4* dst4 = reinterpret_cast<uint4*>(rows_smem);
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) dst4[i] = __ldg(src4 + i);
  } else {
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) rows_smem[i] = src[i];
  }
  __syncthreads();
  T* dst = out + row0 * K;
  for (int j = threadIdx.x; j < K; j += blockDim.x) {
    const int p = __ldg(perm + j);
    for (int r = 0; r < rows; ++r) dst[static_cast<int64_t>(r) * K + j] = rows_smem[r * K + p];
  }
}

namespace {
constexpr int kPermuteThreads = 512;
constexpr int kPermuteSmemBudget = 96 * 1024;  // two blocks per multiprocessor: one loads while one gathers
constexpr int kPermuteTargetBlocks = 256;      // about two per multiprocessor

// Rows per block: as many as fit the shared-memory budget (fewer, larger blocks amortise the perm
// reads) but no more than keeps ~256 blocks in flight, so that a few hundred tokens still fill the
// GPU (128 rows of K = 4096 in 12-row blocks ran on 11 multiprocessors only).
int permute_rows_per_block(int n_rows, int K, int elem_bytes) {
  int budget = kPermuteSmemBudget / (K * elem_bytes);
  budget = budget < 1 ? 1 : (budget > 16 ? 16 : budget);
  const int spread = (n_rows + kPermuteTargetBlocks - 1) / kPermuteTargetBlocks;
  return spread < 1 ? 1 : (spread > budget ? budget : spread);
}
}  // namespace

namespace {
using GemmFn = int (*)(int, int, int, const void*, const void*, const void*, void*, void*, size_t,
                       int, cudaStream_t, size_t*);
const GemmFn kGemms[2][esp::kNumConfigs] = {
    {esp_gemm_0_0, esp_gemm_0_1, esp_gemm_0_2, esp_gemm_0_3, esp_gemm_0_4, esp_gemm_0_5,
     esp_gemm_0_6, esp_gemm_0_7},
    {esp_gemm_1_0, esp_gemm_1_1, esp_gemm_1_2, esp_gemm_1_3, esp_gemm_1_4, esp_gemm_1_5,
     esp_gemm_1_6, esp_gemm_1_7}};
const char* const kNames[esp::kNumConfigs] = {
    esp::ConfigTraits<0>::name, esp::ConfigTraits<1>::name, esp::ConfigTraits<2>::name,
    esp::ConfigTraits<3>::name, esp::ConfigTraits<4>::name, esp::ConfigTraits<5>::name,
    esp::ConfigTraits<6>::name, esp::ConfigTraits<7>::name};

template <int Dtype>
void layout_of(int M, int K, int64_t* out) {
  esp::ProblemShape problem{M, 1, K, 1};
  auto stride_a = cutlass::make_cute_packed_stride(esp::StrideRowMajor{}, cute::make_shape(M, K, 1));
  esp::CompressorUtility<Dtype> util(problem, stride_a);
  out[0] = util.get_tensorA_m_physical();
  out[1] = util.get_tensorA_k_physical();
  out[2] = static_cast<int64_t>(util.get_compressed_tensor_A_bytes());
  out[3] = static_cast<int64_t>(util.get_tensor_E_bytes());
}

template <int Dtype>
int compress(int M, int K, const void* dense, void* a_comp, void* e, void* workspace,
             size_t workspace_bytes, int sm_count, cudaStream_t stream, size_t* workspace_needed) {
  using Element = typename esp::DtypeTraits<Dtype>::Element;
  using C = esp::Compressor<Dtype>;
  esp::ProblemShape problem{M, 1, K, 1};
  auto stride_a = cutlass::make_cute_packed_stride(esp::StrideRowMajor{}, cute::make_shape(M, K, 1));
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = 0;
  hw_info.sm_count = sm_count;
  typename C::Arguments args{problem,
                             {static_cast<const Element*>(dense), stride_a,
                              static_cast<Element*>(a_comp), e},
                             {hw_info}};
  size_t need = C::get_workspace_size(args);
  if (workspace_needed) { *workspace_needed = need; return 0; }
  if (need > workspace_bytes) return 2;
  C op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 3;
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 4;
  if (op.run(stream) != cutlass::Status::kSuccess) return 5;
  return 0;
}
}  // namespace

extern "C" {

int esp_sp24_sm90_num_configs() { return esp::kNumConfigs; }

const char* esp_sp24_sm90_config_name(int config) {
  return (config >= 0 && config < esp::kNumConfigs) ? kNames[config] : nullptr;
}

// out[4] = {A rows (physical), A columns (physical), compressed A bytes, metadata bytes}
int esp_sp24_sm90_layout(int dtype, int M, int K, int64_t* out) {
  if (dtype == 0) { layout_of<0>(M, K, out); return 0; }
  if (dtype == 1) { layout_of<1>(M, K, out); return 0; }
  return 1;
}

// Fills a_comp and e from the masked dense weight (M x K row-major, 2:4 along K). With
// workspace_needed non-null it only writes the workspace size.
int esp_sp24_sm90_compress(int dtype, int M, int K, const void* dense, void* a_comp, void* e,
                           void* workspace, size_t workspace_bytes, int sm_count,
                           cudaStream_t stream, size_t* workspace_needed) {
  if (dtype == 0)
    return compress<0>(M, K, dense, a_comp, e, workspace, workspace_bytes, sm_count, stream,
                       workspace_needed);
  if (dtype == 1)
    return compress<1>(M, K, dense, a_comp, e, workspace, workspace_bytes, sm_count, stream,
                       workspace_needed);
  return 1;
}

// y[N, M] = x[N, K] @ W[M, K]^T with W given as (a_comp, e). Return codes: 0 ok, 1 bad dtype or
// config, 2 workspace too small, 3 shape not supported, 4 initialisation failed, 5 launch failed.
int esp_sp24_sm90_gemm(int dtype, int config, int M, int N, int K, const void* a_comp,
                       const void* e, const void* b, void* d, void* workspace,
                       size_t workspace_bytes, int sm_count, cudaStream_t stream,
                       size_t* workspace_needed) {
  if (dtype < 0 || dtype > 1 || config < 0 || config >= esp::kNumConfigs) return 1;
  return kGemms[dtype][config](M, N, K, a_comp, e, b, d, workspace, workspace_bytes, sm_count,
                               stream, workspace_needed);
}

// out[n_rows, K] = x[:, perm] (both row-major, 2-byte elements); perm is int32 with values in
// [0, K). Return codes: 0 ok, 1 bad element size, 5 launch failed.
int esp_permute_columns(int elem_bytes, int n_rows, int K, const void* x, const int32_t* perm,
                        void* out, cudaStream_t stream) {
  if (elem_bytes != 2) return 1;
  if (n_rows <= 0) return 0;
  const int rows = permute_rows_per_block(n_rows, K, elem_bytes);
  const size_t smem = static_cast<size_t>(rows) * K * elem_bytes;
  auto kernel = permute_columns_kernel<uint16_t>;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess)
    return 5;
  const int blocks = (n_rows + rows - 1) / rows;
  kernel<<<blocks, kPermuteThreads, smem, stream>>>(static_cast<const uint16_t*>(x), perm,
                                                    static_cast<uint16_t*>(out), n_rows, K, rows);
  return cudaGetLastError() == cudaSuccess ? 0 : 5;
}

// The prefill layer's whole call in one host call (the eager forward pays the host time of every
// call, and short prompts are host-bound): with perm non-null, b_perm = b[:, perm] first, then
// d = W @ b_perm^T; without, d = W @ b^T. Return codes as esp_permute_columns and esp_sp24_sm90_gemm.
int esp_sp24_sm90_gemm_permuted(int dtype, int config, int M, int N, int K, const void* a_comp,
                                const void* e, const void* b, const int32_t* perm, void* b_perm,
                                void* d, void* workspace, size_t workspace_bytes, int sm_count,
                                cudaStream_t stream) {
  if (dtype < 0 || dtype > 1 || config < 0 || config >= esp::kNumConfigs) return 1;
  if (perm != nullptr) {
    const int code = esp_permute_columns(2, N, K, b, perm, b_perm, stream);
    if (code != 0) return code;
    b = b_perm;
  }
  return kGemms[dtype][config](M, N, K, a_comp, e, b, d, workspace, workspace_bytes, sm_count,
                               stream, nullptr);
}

}  // extern "C"
#endif
