// Decode kernel (1-32 tokens) for the packed 2:4 format on the sparse tensor cores (mma.sp, sm_80+).
//
// out[T, N] = x[T, K] @ W^T with W the masked weight, stored as pack.py describes: values [N, K/2]
// (two kept values per group of 4 permuted columns) and 2-bit in-group indices, 8 groups per int32
// word. The warp-level sparse MMA m16n8k32 takes exactly that: 16 rows x 16 kept values of the
// weight (the A operand), their 2-bit indices (the metadata operand) and a dense 32 x 8 block of
// activations (B: 32 input columns x 8 tokens). So the only CUDA-core work per kept value is moving
// bytes: the tensor core does the selection, the products and the fp32 accumulation.
//
// Column mapping. An MMA's 32 logical input columns (8 groups of 4) may be any 8 groups of the
// row, as long as A, the metadata and B agree. Each thread loads 16 contiguous bytes of a row
// (4 groups); the 4 threads of a quad cover 64 contiguous columns ("chunk", 16 groups), and one
// chunk feeds two MMAs (j = 0, 1). Logical group G (0..7) of MMA j is actual group
//     a(G, j) = (G % 4) * 4 + 2 * j + G / 4
// of the chunk, which puts each thread's A registers in place with no data movement. The staged
// activations (B) and the metadata words follow the same mapping; the metadata needs a few shifts.
//
// Activations. Each CTA first stages x[t, perm[col]] for its K range into shared memory, already
// in B-fragment order (one 16-byte shared load per thread and MMA), so the permutation costs one
// gather per column and CTA instead of one per kept value, and the weight stream is read once with
// 16-byte loads. The first weight loads are issued before the staging, so the two overlap.
//
// Direct mode (DIRECT, with xfrag only): the B fragments are read from the staged buffer in global
// memory (L1-cached; every warp of the CTA reads the same slots) right where the MMAs use them,
// instead of being copied into shared memory first: no copy, no barrier, no shared memory, so
// split-K is not bounded by the shared-memory size.
//
// Programmatic dependent launch (Hopper; launches with `pdl`). Every CTA first issues its weight
// loads, which depend on no earlier kernel, then waits for the previous kernel in the stream to
// finish (griddepcontrol.wait) before it touches x, the staged fragments, the workspace or the
// output, and at once lets the next kernel launch (griddepcontrol.launch_dependents). So a decode
// kernel launched with `pdl` after another one streams its first weights while that one finishes:
// the ramp of one overlaps the tail of the other. Without the launch attribute both instructions
// do nothing.
//
// Grouped launch. One launch may run up to kMaxGroup problems that share x (q, k and v; gate and up):
// blockIdx.x counts the row tiles of all of them, problem after problem, and each CTA reads its
// problem's weights, permutation, workspace and output. Several small GEMMs then fill the GPU as one
// larger one, with one launch (and one ramp and tail) instead of several.
//
// Split-K. blockIdx.y splits the 64-column chunks; partials go to a fp32 workspace and the last CTA
// of each row tile (an atomic ticket) sums them in split order, writes the output and resets its
// counter: one launch, deterministic, no memset, graph-capturable.
//
// Cluster reduction (Hopper; launches with `cluster`, 2..kMaxClusterSplits splits). The splits of a row
// tile run as one thread-block cluster: each keeps its partials in shared memory, and after a cluster
// barrier each sums its share of the tile's outputs over all splits through distributed shared memory.
// The workspace path's tail (partials to L2, a fence, an atomic ticket, the last CTA reading them back:
// several dependent L2 round trips after the last MMA) becomes two cluster barriers and on-chip loads.
// Same summation order, so both paths give the same bits.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "sp24_mma.h"

namespace esparse_sp24 {

struct Params {
  const uint16_t* x;       // [T, ldx] fp16/bf16 bits
  const int32_t* perm;     // [K] or nullptr
  const uint8_t* vals;     // [N, K/2] fp16/bf16 (row stride K bytes)
  const uint32_t* meta;    // [N, K/32] (pack.py's rows) or the sm90 layout (meta_rows_aligned > 0)
  uint16_t* out;           // [T, ldo]
  float* ws;               // [splits, T, N] fp32 partials (splits > 1)
  int* counters;           // [row tiles], zero between launches
  int n, k, t, ldx, ldo;
  int nchunks;             // K / 64
  int chunks_per_split;
  int splits;
  int meta_variant;        // 0: quad threads 0/1 hold k-halves of rows g and g+8; 1: rows g / g+8
  int meta_rows_aligned;   // 0: meta in pack.py's row-major words; > 0: CUTLASS's sm90 tensor-E layout
                           // (pack.py's meta_to_sm90) padded to this many rows
  int pdl;                 // launched as a programmatic dependent launch (see the header)
  int cluster;             // the splits of a row tile are one thread-block cluster (see the header)
  const uint4* xfrag;      // x already in B-fragment order for all of K (sp24_stage_kernel), or nullptr
};

struct GroupParams {
  Params prob[kMaxGroup];
  int tile_end[kMaxGroup];  // row tiles of problems 0..i together
  int count;
};

template <bool BF16>
__device__ __forceinline__ void mma_sp(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       const uint4& b, uint32_t e) {
  if constexpr (BF16) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e));
  } else {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e));
  }
}

// Streamed once per call: skip L1, ask L2 for whole 256-byte lines (the next loads of the row).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 load_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// 16 bytes global -> shared without passing through registers (sm_80+); cp_async_wait_all() waits for
// this thread's copies (a barrier must follow before other threads read them)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// Metadata nibbles of one row pair of words (w.x: chunk groups 0..7, w.y: groups 8..15), shifted
// right by `shift` (0 or 4 bits): byte j (j = 0, 1) of the result holds the nibbles of groups
// 2j + shift/4 and 2j + shift/4 + 4 of w.x; byte j of `hi` the same groups of w.y.
__device__ __forceinline__ void meta_bytes(uint2 w, uint32_t shift, uint32_t& lo, uint32_t& hi) {
  const uint32_t m0 = (w.x >> shift) & 0x0F0F0F0Fu;
  const uint32_t m1 = (w.y >> shift) & 0x0F0F0F0Fu;
  lo = m0 | (m0 >> 12);
  hi = m1 | (m1 >> 12);
}

__device__ __forceinline__ void wait_for_previous_grid_and_release_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t comp(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ uint16_t to_bits(float v, bool bf16) {
  if (bf16) {
    __nv_bfloat16 h = __float2bfloat16_rn(v);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __half h = __float2half_rn(v);
  return *reinterpret_cast<uint16_t*>(&h);
}

template <bool BF16, int NT, int D, bool DIRECT>
__global__ void __launch_bounds__(256) sp24_mma_kernel(const __grid_constant__ GroupParams g) {
  extern __shared__ uint4 xs[];  // [chunks][2][T][4] uint4 = B fragments
  __shared__ int s_last;
  int which = 0;  // this CTA's problem
#pragma unroll
  for (int i = 1; i < kMaxGroup; ++i) which += (i < g.count && (int)blockIdx.x >= g.tile_end[i - 1]) ? 1 : 0;
  const Params& p = g.prob[which];
  const int tile = (int)blockIdx.x - (which > 0 ? g.tile_end[which - 1] : 0);  // row tile within it
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const int T = p.t;
  const int c_begin = blockIdx.y * p.chunks_per_split;
  const int nc = min(p.chunks_per_split, p.nchunks - c_begin);
  const int tile_rows = 16 * nwarps;
  const int row0 = tile * tile_rows + warp * 16;
  // rows past N read row N-1 (valid data and valid metadata); their results are never stored
  const int ra = min(row0 + gid, p.n - 1);
  const int rb = min(row0 + gid + 8, p.n - 1);
  const int mwords = p.k >> 5;
  const uint8_t* pa = p.vals + (size_t)ra * p.k + (size_t)c_begin * 64 + tig * 16;
  const uint8_t* pb = p.vals + (size_t)rb * p.k + (size_t)c_begin * 64 + tig * 16;
  // Metadata: with sparsity selector 0, quad threads 0 and 1 supply the MMA's metadata. Variant 0:
  // thread h holds logical groups 4h..4h+3 of row g (bits 0-15) and of row g+8 (bits 16-31).
  // Variant 1: thread h holds all 8 logical groups of row g + 8h. Threads 2, 3 mirror 0, 1.
  const uint32_t h = (uint32_t)(tig & 1);
  const bool by_rows = p.meta_variant == 1;
  const int rx = by_rows ? (h ? rb : ra) : ra;
  const int ry = by_rows ? rx : rb;
  const uint32_t sx = by_rows ? 0u : 4u * h;
  const uint32_t sy = by_rows ? 4u : 4u * h;
  const uint32_t* mx = p.meta + (size_t)rx * mwords + (size_t)c_begin * 2;
  const uint32_t* my = p.meta + (size_t)ry * mwords + (size_t)c_begin * 2;
  // sm90 layout (pack.py): the 32-bit word at 4*gid + (16-column word j of the 128-column atom:
  // 2*(j/2) + 32*(j%2)) holds word j of rows row0+gid (low half) and row0+gid+8 (high half). Rows
  // past N are padding there, so no clamp. A chunk (64 columns, words 4cc..4cc+3 of its atom) is two
  // 8-byte loads: (words 0, 2) and (words 1, 3) of both rows.
  const bool sm90 = p.meta_rows_aligned > 0;
  const uint32_t* me = p.meta + (size_t)(row0 >> 6) * 256 + ((row0 & 63) >> 4) * 64 + gid * 4;
  const size_t me_kstride = (size_t)p.meta_rows_aligned * 4;  // 32-bit words per 128 columns
  auto load_meta = [&](int c, uint2& wx, uint2& wy) {  // c: chunk index within this split
    if (sm90) {
      const int cg = c_begin + c;
      const uint32_t* q = me + (size_t)(cg >> 1) * me_kstride + (cg & 1) * 2;
      wx = load_stream8(q);
      wy = load_stream8(q + 32);
    } else {
      wx = load_stream8(mx + c * 2);
      wy = load_stream8(my + c * 2);
    }
  };
  // the sm90 pairs as pack.py's row words: w0 of row rx, w1 of row ry (what meta_bytes expects)
  auto meta_rows = [&](const uint2& ex, const uint2& ey, uint2& w0, uint2& w1) {
    if (!sm90) {
      w0 = ex;
      w1 = ey;
      return;
    }
    const uint2 a = make_uint2(prmt(ex.x, ey.x, 0x5410), prmt(ex.y, ey.y, 0x5410));  // row row0+gid
    const uint2 b = make_uint2(prmt(ex.x, ey.x, 0x7632), prmt(ex.y, ey.y, 0x7632));  // row row0+gid+8
    w0 = by_rows ? (h ? b : a) : a;
    w1 = by_rows ? w0 : b;
  };

  uint4 va[D], vb[D];
  uint2 wx[D], wy[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d < nc) {
      va[d] = load_stream16(pa + d * 64);
      vb[d] = load_stream16(pb + d * 64);
      load_meta(d, wx[d], wy[d]);
    }
  }
  // everything below reads what earlier kernels wrote (x, xfrag) or writes what they may still read
  wait_for_previous_grid_and_release_next();

  // Stage x[t, perm[col]] for this split's columns in B-fragment order. Column col of chunk c is in
  // actual group a = (col % 64) / 4 at position pos; logical group G = (a & 1) * 4 + (a >> 2) of
  // MMA j = (a >> 1) & 1; logical k = 4G + pos sits in thread tig = (k & 7) >> 1, element
  // e = (k >> 3) * 2 + (k & 1) of that thread's 8 halves. The gathers go in batches of SU columns
  // x ST tokens per thread, all loads of a batch in flight together (a dependent load per column
  // and token would cost one L2 round trip each, which dominated the first version).
  if constexpr (DIRECT) {
    // B fragments are read from p.xfrag in the main loop
  } else if (p.xfrag != nullptr) {
    // x was put in fragment order by sp24_stage_kernel: this split's slice is contiguous. Asynchronous
    // 16-byte copies (through L2, no registers), all of a thread's in flight together: copied through
    // registers four at a time, the slice took one L2 round trip per four slots and thread, which grew
    // with the token count (run U1)
    const uint4* src = p.xfrag + (size_t)c_begin * 2 * T * 4;
    const int slots = nc * 2 * T * 4;
    for (int q = threadIdx.x; q < slots; q += blockDim.x) cp_async16(xs + q, src + q);
    cp_async_wait_all();
  } else {
    constexpr int SU = NT == 1 ? 8 : 2, ST = NT == 1 ? 2 : 8;  // 16 gathers in flight
    uint16_t* xsh = reinterpret_cast<uint16_t*>(xs);
    const int ncols = nc * 64;
    const int col0 = c_begin * 64;
    const int stride = blockDim.x;
    for (int i0 = threadIdx.x; i0 < ncols; i0 += SU * stride) {
      int src[SU], base[SU];
#pragma unroll
      for (int u = 0; u < SU; ++u) {
        const int i = min(i0 + u * stride, ncols - 1);  // past the end: redo the last column
        const int c = i >> 6;
        const int a = (i & 63) >> 2;
        const int pos = i & 3;
        const int g = ((a & 1) << 2) | (a >> 2);
        const int j = (a >> 1) & 1;
        const int kk = 4 * g + pos;
        const int tq = (kk & 7) >> 1;
        const int e = ((kk >> 3) << 1) | (kk & 1);
        src[u] = p.perm ? __ldg(p.perm + col0 + i) : col0 + i;
        base[u] = ((c * 2 + j) * T) * 32 + tq * 8 + e;  // in halves: slot ((c*2+j)*T+t)*4+tq
      }
      for (int t0 = 0; t0 < T; t0 += ST) {
        uint16_t v[SU][ST];
#pragma unroll
        for (int u = 0; u < SU; ++u) {
#pragma unroll
          for (int tt = 0; tt < ST; ++tt) {
            if (t0 + tt < T) v[u][tt] = __ldg(p.x + (size_t)(t0 + tt) * p.ldx + src[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < SU; ++u) {
#pragma unroll
          for (int tt = 0; tt < ST; ++tt) {
            if (t0 + tt < T) xsh[base[u] + (t0 + tt) * 32] = v[u][tt];
          }
        }
      }
    }
  }
  if constexpr (!DIRECT) __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
  }
  // B fragment of token t: lanes of tokens >= T read token T-1 instead (column n of the MMA's
  // result depends on column n of B only, and those columns are never stored)
  const uint4* const bbase = DIRECT ? p.xfrag + (size_t)c_begin * 2 * T * 4 : xs;
  const uint4* xq[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xq[nt] = bbase + min(nt * 8 + gid, T - 1) * 4 + tig;
  const int slot_t = 4 * T;  // uint4 slots per (chunk, j)

  // one chunk: two MMAs (j = 0, 1) per token tile
  auto consume = [&](int c, const uint4& a4, const uint4& b4, const uint2& m0, const uint2& m1) {
    uint2 w0, w1;
    meta_rows(m0, m1, w0, w1);
    uint4 bf[2][NT];  // direct mode: all B fragments of the chunk first, so that their loads overlap
    if constexpr (DIRECT) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) bf[j][nt] = __ldg(xq[nt] + (c * 2 + j) * slot_t);
      }
    }
    uint32_t x0, x1, y0, y1;
    meta_bytes(w0, sx, x0, x1);
    meta_bytes(w1, sy, y0, y1);
    const uint32_t lx = prmt(x0, x1, 0x5140);  // [x0.b0, x1.b0, x0.b1, x1.b1]
    const uint32_t ly = prmt(y0, y1, 0x5140);
    const uint32_t e[2] = {prmt(lx, ly, 0x5410), prmt(lx, ly, 0x7632)};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t a0 = comp(a4, 2 * j), a1 = comp(b4, 2 * j);
      const uint32_t a2 = comp(a4, 2 * j + 1), a3 = comp(b4, 2 * j + 1);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (DIRECT) {
          mma_sp<BF16>(acc[nt], a0, a1, a2, a3, bf[j][nt], e[j]);
        } else {
          const uint4 b = xq[nt][(c * 2 + j) * slot_t];
          mma_sp<BF16>(acc[nt], a0, a1, a2, a3, b, e[j]);
        }
      }
    }
  };

  // steady state: every reload is in range; then the last (< 2D) chunks with guards
  int c0 = 0;
  const uint8_t* qa = pa + D * 64;  // running pointers to the chunks being reloaded
  const uint8_t* qb = pb + D * 64;
  for (; c0 + 2 * D <= nc; c0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      consume(c0 + d, va[d], vb[d], wx[d], wy[d]);
      va[d] = load_stream16(qa + d * 64);
      vb[d] = load_stream16(qb + d * 64);
      load_meta(c0 + D + d, wx[d], wy[d]);
    }
    qa += D * 64;
    qb += D * 64;
  }
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (c0 + d < nc) {
      consume(c0 + d, va[d], vb[d], wx[d], wy[d]);
      if (c0 + d + D < nc) {
        va[d] = load_stream16(pa + (c0 + d + D) * 64);
        vb[d] = load_stream16(pb + (c0 + d + D) * 64);
        load_meta(c0 + d + D, wx[d], wy[d]);
      }
    }
  }
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (c0 + D + d < nc) consume(c0 + D + d, va[d], vb[d], wx[d], wy[d]);
  }

  // accumulator fragment: acc[nt][0..1] -> row gid, tokens nt*8 + 2*tig + {0,1}; [2..3] -> row gid+8
  const int rows[2] = {row0 + gid, row0 + gid + 8};
  if (p.splits == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = rows[i >> 1];
        const int t = nt * 8 + 2 * tig + (i & 1);
        if (r < p.n && t < T) p.out[(size_t)t * p.ldo + r] = to_bits(acc[nt][i], BF16);
      }
    }
    return;
  }
  const int tile0 = tile * tile_rows;
  const int outputs = tile_rows * T;
  if (p.cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // This split's partials stay in its shared memory ([T][tile_rows + pad] floats, over the staged x once every
    // warp is done with it); after a cluster barrier, split s sums outputs [s*per, (s+1)*per) of all splits
    // by distributed shared-memory loads, in the workspace path's order (bit-identical results), and a
    // second barrier keeps every partial in place until all are read. No workspace, no ticket, no L2
    // round trips.
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    float* red = reinterpret_cast<float*>(xs);
    // token rows padded by 4 floats: a quad's four lanes (tokens 2*tig + ...) then store to distinct banks
    const int red_stride = tile_rows + kClusterRowPad;
    if constexpr (!DIRECT) __syncthreads();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = nt * 8 + 2 * tig + (i & 1);
        if (t < T) red[t * red_stride + warp * 16 + gid + 8 * (i >> 1)] = acc[nt][i];
      }
    }
    cluster.sync();
    const int per = (outputs + p.splits - 1) / p.splits;
    const int begin = (int)cluster.block_rank() * per;
    const int end = min(begin + per, outputs);
    for (int idx = begin + threadIdx.x; idx < end; idx += blockDim.x) {
      float* const mine = red + (idx / tile_rows) * red_stride + idx % tile_rows;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int sp = 0;
      for (; sp + 4 <= p.splits; sp += 4) {
        const float v0 = *cluster.map_shared_rank(mine, sp);
        const float v1 = *cluster.map_shared_rank(mine, sp + 1);
        const float v2 = *cluster.map_shared_rank(mine, sp + 2);
        const float v3 = *cluster.map_shared_rank(mine, sp + 3);
        s0 += v0;
        s1 += v1;
        s2 += v2;
        s3 += v3;
      }
      for (; sp < p.splits; ++sp) s0 += *cluster.map_shared_rank(mine, sp);
      const int r = tile0 + idx % tile_rows;
      if (r < p.n) p.out[(size_t)(idx / tile_rows) * p.ldo + r] = to_bits((s0 + s1) + (s2 + s3), BF16);
    }
    cluster.sync();
#else
    __trap();  // clusters need compute capability 9.0; the host never launches this mode below it
#endif
    return;
  }
  float* part = p.ws + (size_t)blockIdx.y * T * p.n;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = rows[i >> 1];
      const int t = nt * 8 + 2 * tig + (i & 1);
      if (r < p.n && t < T) __stcg(part + (size_t)t * p.n + r, acc[nt][i]);
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(p.counters + tile, 1) == p.splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Sum the partials in split order (deterministic). Each thread takes RO outputs per pass and loads
  // four splits of all of them before adding (RO * 4 loads in flight): with the splits loop inside the
  // per-output loop, as first written, every output cost one L2 round trip of its own, which at 32
  // tokens (16 outputs per thread with 8 warps) made the tail grow with the token count (run U1).
  constexpr int RO = NT == 1 ? 2 : 4 * (NT / 2);  // 2, 4 or 8
  const size_t step = (size_t)T * p.n;
  for (int i0 = threadIdx.x; i0 < outputs; i0 += RO * blockDim.x) {
    const float* src[RO];
#pragma unroll
    for (int o = 0; o < RO; ++o) {
      const int idx = min(i0 + o * (int)blockDim.x, outputs - 1);  // past the end: reload the last one
      const int r = min(tile0 + idx % tile_rows, p.n - 1);
      src[o] = p.ws + (size_t)(idx / tile_rows) * p.n + r;
    }
    float s[RO][4];
#pragma unroll
    for (int o = 0; o < RO; ++o) s[o][0] = s[o][1] = s[o][2] = s[o][3] = 0.f;
    int sp = 0;
    for (; sp + 4 <= p.splits; sp += 4) {
      float v[RO][4];
#pragma unroll
      for (int o = 0; o < RO; ++o) {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[o][q] = __ldcg(src[o] + (sp + q) * step);
      }
#pragma unroll
      for (int o = 0; o < RO; ++o) {
#pragma unroll
        for (int q = 0; q < 4; ++q) s[o][q] += v[o][q];
      }
    }
    for (; sp < p.splits; ++sp) {
      float v[RO];
#pragma unroll
      for (int o = 0; o < RO; ++o) v[o] = __ldcg(src[o] + sp * step);
#pragma unroll
      for (int o = 0; o < RO; ++o) s[o][0] += v[o];
    }
#pragma unroll
    for (int o = 0; o < RO; ++o) {
      const int idx = i0 + o * (int)blockDim.x;
      const int r = tile0 + idx % tile_rows;
      if (idx < outputs && r < p.n)
        p.out[(size_t)(idx / tile_rows) * p.ldo + r] = to_bits((s[o][0] + s[o][1]) + (s[o][2] + s[o][3]), BF16);
    }
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;
}

// x[t, perm[col]] for all of K in B-fragment order: slot ((c*2 + j)*T + t)*4 + tq holds the 8 halves
// of thread tq for chunk c, MMA j, token t (the layout the decode kernel stages in shared memory).
// One 16-byte store per thread, its 8 gathers in flight together.
struct StageGroup {
  const int32_t* perm[kMaxGroup];  // per staged copy (nullptr: identity)
  uint4* xfrag[kMaxGroup];
};

// blockIdx.y: which copy (one per distinct permutation of a grouped launch).
__global__ void __launch_bounds__(256) sp24_stage_kernel(const uint16_t* __restrict__ x, const __grid_constant__ StageGroup sg,
                                                        int k, int t_count, int ldx) {
  wait_for_previous_grid_and_release_next();  // x comes from, xfrag may still be read by, earlier kernels
  const int32_t* perm = sg.perm[blockIdx.y];
  uint4* __restrict__ xfrag = sg.xfrag[blockIdx.y];
  const int slots = (k / 64) * 2 * t_count * 4;
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= slots) return;
  const int tq = q & 3;
  const int rest = q >> 2;
  const int t = rest % t_count;
  const int cj = rest / t_count;
  const int j = cj & 1;
  const int c = cj >> 1;
  uint16_t h[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int kk = 2 * tq + (e & 1) + 8 * (e >> 1);  // logical k of element e
    const int g = kk >> 2;                          // logical group
    const int a = (g & 3) * 4 + 2 * j + (g >> 2);   // actual group in the chunk
    const int col = c * 64 + 4 * a + (kk & 3);
    const int src = perm ? __ldg(perm + col) : col;
    h[e] = __ldg(x + (size_t)t * ldx + src);
  }
  uint4 v;
  v.x = (uint32_t)h[0] | ((uint32_t)h[1] << 16);
  v.y = (uint32_t)h[2] | ((uint32_t)h[3] << 16);
  v.z = (uint32_t)h[4] | ((uint32_t)h[5] << 16);
  v.w = (uint32_t)h[6] | ((uint32_t)h[7] << 16);
  xfrag[q] = v;
}

// A launch, with the programmatic-stream-serialization attribute when `pdl` (see the header).
// With cluster_y > 1, thread-block clusters of (1, cluster_y, 1) CTAs (the splits of one row tile).
template <typename Kernel, typename... Args>
static cudaError_t launch_kernel(Kernel kern, dim3 grid, int threads, size_t smem, cudaStream_t stream, bool pdl,
                                 int cluster_y, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster_y > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1;
    attr[n].val.clusterDim.y = cluster_y;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kern, args...);
}

// A failed call's error is also cleared from the runtime's last-error state, so that it cannot surface
// at some later, unrelated launch (the caller reports the returned one).
static cudaError_t failed(cudaError_t err) {
  (void)cudaGetLastError();
  return err;
}

template <bool BF16, int NT, int D, bool DIRECT>
static cudaError_t launch_one(const GroupParams& g, dim3 grid, int threads, size_t smem, cudaStream_t stream) {
  auto kern = sp24_mma_kernel<BF16, NT, D, DIRECT>;
  static bool configured = false;  // raise the dynamic shared-memory limit once per instantiation
  static int binary_version = 0;   // the compiled architecture (the cluster path exists from 9.0)
  if (!configured) {
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           optin - 1024);
    if (err != cudaSuccess) return failed(err);
    cudaFuncAttributes attrs = {};
    err = cudaFuncGetAttributes(&attrs, kern);
    if (err != cudaSuccess) return failed(err);
    binary_version = attrs.binaryVersion;
    configured = true;
  }
  // built for an older architecture (a TORCH_CUDA_ARCH_LIST below 9.0 run on Hopper), the kernel holds
  // no cluster path: refuse rather than reach its trap
  if (g.prob[0].cluster && binary_version < 90) return cudaErrorInvalidDeviceFunction;
  const cudaError_t err = launch_kernel(kern, grid, threads, smem, stream, g.prob[0].pdl != 0,
                                        g.prob[0].cluster ? (int)grid.y : 1, g);
  if (err != cudaSuccess) return failed(err);
  return cudaGetLastError();
}

// token tiles of 8: 1 (1-8 tokens), 2 (9-16) or 4 (17-32; at 17-24 tokens the fourth tile repeats
// the last token and is not stored: one instantiation less to compile, its cost not measured apart)
template <bool BF16, bool DIRECT, int NT>
static cudaError_t launch_depth(const GroupParams& g, dim3 grid, int threads, size_t smem, int depth,
                                cudaStream_t stream) {
  return depth == 8 ? launch_one<BF16, NT, 8, DIRECT>(g, grid, threads, smem, stream)
                    : launch_one<BF16, NT, 4, DIRECT>(g, grid, threads, smem, stream);
}

template <bool BF16, bool DIRECT>
static cudaError_t launch_tiles(const GroupParams& g, dim3 grid, int threads, size_t smem, int depth, int t,
                                cudaStream_t stream) {
  if (t > 16) return launch_depth<BF16, DIRECT, 4>(g, grid, threads, smem, depth, stream);
  if (t > 8) return launch_depth<BF16, DIRECT, 2>(g, grid, threads, smem, depth, stream);
  return launch_depth<BF16, DIRECT, 1>(g, grid, threads, smem, depth, stream);
}

// Returns cudaSuccess or the launch error. Requirements (checked by the caller): 1 <= count <= kMaxGroup
// problems sharing x (so K and T), K % 64 == 0, 1 <= T <= 32, splits >= 1, warps in {1..8}, depth in
// {4, 8}; each problem's ws holds splits*T*N floats and its counters ceil(N / (16*warps)) zeroed ints
// when splits > 1 and not `cluster`; `direct` only with every problem's xfrag; `cluster` only on compute
// capability 9.0+ with 2..kMaxClusterSplits effective splits (else cudaErrorInvalidValue).
cudaError_t sp24_mma_launch(const void* x, const Problem* probs, int count, int k, int t, int ldx, int splits,
                            int warps, int depth, int meta_variant, bool bf16, bool direct, bool pdl, bool cluster,
                            cudaStream_t stream) {
  if (count < 1 || count > kMaxGroup) return cudaErrorInvalidValue;
  const int eff = sp24_effective_splits(k, splits);
  if (cluster && (eff < 2 || eff > kMaxClusterSplits)) return cudaErrorInvalidValue;
  GroupParams g = {};
  g.count = count;
  const int tile_rows = 16 * warps;
  const int nchunks = k / 64;
  const int cps = (nchunks + splits - 1) / splits;
  int tiles = 0;
  for (int i = 0; i < count; ++i) {
    const Problem& q = probs[i];
    Params& p = g.prob[i];
    if (direct && q.xfrag == nullptr) return cudaErrorInvalidValue;
    p.xfrag = static_cast<const uint4*>(q.xfrag);
    p.x = static_cast<const uint16_t*>(x);
    p.perm = q.perm;
    p.vals = static_cast<const uint8_t*>(q.vals);
    p.meta = q.meta;
    p.out = static_cast<uint16_t*>(q.out);
    p.ws = q.ws;
    p.counters = q.counters;
    p.n = q.n;
    p.k = k;
    p.t = t;
    p.ldx = ldx;
    p.ldo = q.ldo;
    p.nchunks = nchunks;
    p.chunks_per_split = cps;
    p.splits = (nchunks + cps - 1) / cps;  // no empty split
    p.meta_variant = meta_variant;
    p.meta_rows_aligned = q.meta_rows_aligned;
    p.pdl = pdl ? 1 : 0;
    p.cluster = cluster ? 1 : 0;
    tiles += (q.n + tile_rows - 1) / tile_rows;
    g.tile_end[i] = tiles;
  }
  dim3 grid(tiles, g.prob[0].splits);
  const size_t staged = direct ? 0 : (size_t)cps * 64 * t * 2;
  // the cluster reduction's partials, over the staged x
  const size_t partials = cluster ? (size_t)(tile_rows + kClusterRowPad) * t * 4 : 0;
  const size_t smem = staged > partials ? staged : partials;
  const int threads = 32 * warps;
  if (bf16) return direct ? launch_tiles<true, true>(g, grid, threads, smem, depth, t, stream)
                          : launch_tiles<true, false>(g, grid, threads, smem, depth, t, stream);
  return direct ? launch_tiles<false, true>(g, grid, threads, smem, depth, t, stream)
                : launch_tiles<false, false>(g, grid, threads, smem, depth, t, stream);
}

// x[:, perm_i] in fragment order into xfrag_i for each of `count` (perm, xfrag) pairs, one launch.
cudaError_t sp24_stage_launch(const void* x, const int32_t* const* perms, void* const* xfrags, int count, int k,
                              int t, int ldx, bool pdl, cudaStream_t stream) {
  if (count < 1 || count > kMaxGroup) return cudaErrorInvalidValue;
  StageGroup sg = {};
  for (int i = 0; i < count; ++i) {
    sg.perm[i] = perms[i];
    sg.xfrag[i] = static_cast<uint4*>(xfrags[i]);
  }
  const int slots = (k / 64) * 2 * t * 4;
  const cudaError_t err = launch_kernel(sp24_stage_kernel, dim3((slots + 255) / 256, count), 256, 0, stream, pdl, 1,
                                        static_cast<const uint16_t*>(x), sg, k, t, ldx);
  if (err != cudaSuccess) return failed(err);
  return cudaGetLastError();
}

int sp24_effective_splits(int k, int splits) {
  const int nchunks = k / 64;
  const int cps = (nchunks + splits - 1) / splits;
  return (nchunks + cps - 1) / cps;
}

}  // namespace esparse_sp24
