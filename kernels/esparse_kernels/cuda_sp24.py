"""CUDA C++ decode kernel (1-32 tokens) on the sparse tensor cores, as a PyTorch extension.

The kernel (``csrc/sp24_mma.cu``) feeds the packed format of pack.py, unchanged, to the warp-level
``mma.sp`` m16n8k32 instruction: 16 weight rows x 16 kept values (A), their 2-bit in-group indices
(the metadata operand) and a 32-column x 8-token block of activations (B). The tensor core does the
index selection, the products and the fp32 accumulation, so the CUDA cores only move bytes: 16-byte
loads of values, 8-byte loads of metadata words, a few shifts to put the metadata in the operand's
order. Each CTA first stages x[t, perm[col]] for its K range in shared memory, already in operand
order, so the channel permutation costs one gather per column and CTA (not per kept value). Split-K
partials are summed by the last CTA of each row tile (atomic ticket, deterministic, one launch).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into
``$ESPARSE_KERNEL_BUILD_DIR`` (default ``~/.cache/esparse_kernels/<torch>-<cuda>-sm<cc>``); sources
are compiled for the local GPU only. ``emulate`` is a pure-PyTorch model of the kernel's data
movement (the same index arithmetic, fragment layouts as the PTX ISA documents them), used by the
CPU tests to check the mapping without a GPU.

Metadata operand layout: the PTX ISA gives it as a figure; two readings of it are implemented
(``meta_variant`` 0 and 1) and ``meta_variant()`` picks, once per process, the one the device
computes correctly (a small check against the reference; it synchronises, so it runs when a
workspace is built, never in the hot path).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from esparse.errors import ConfigError

from .pack import Packed24, sm90_meta_shape

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("sp24_binding.cpp", "sp24_mma.cu")  # + sp24_mma.h, their shared interface
MAX_TOKENS = 32  # csrc/sp24_mma.h's kMaxTokens: up to four token tiles of 8
CHUNK = 64  # input columns per chunk (two MMAs)
DEPTHS = (4, 8)
MAX_SMEM = 200 * 1024  # staged activations per CTA we allow the tuner to ask for
MAX_CLUSTER_SPLITS = 8  # csrc/sp24_mma.h's kMaxClusterSplits (the portable cluster size)

_EXT = None
_EXT_ERROR: str | None = None
_META_VARIANT: int | None = None


def build_dir() -> Path:
    env = os.environ.get("ESPARSE_KERNEL_BUILD_DIR")
    if env:
        return Path(env)
    cc = "".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "cpu"
    tag = f"{torch.__version__}-cu{torch.version.cuda}-sm{cc}".replace("+", "_")
    return Path.home() / ".cache" / "esparse_kernels" / tag


def load_extension(verbose: bool = False):
    """Compile (first call) and import the extension; raises ConfigError when it cannot be built."""
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return _EXT
    if _EXT_ERROR is not None:
        raise ConfigError(_EXT_ERROR)
    if not torch.cuda.is_available():
        _EXT_ERROR = "the CUDA decode kernel needs a CUDA device (torch.cuda.is_available() is False)"
        raise ConfigError(_EXT_ERROR)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        _EXT_ERROR = f"mma.sp needs compute capability >= 8.0, the device has {major}.{minor}"
        raise ConfigError(_EXT_ERROR)
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # compile for this GPU only
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    # torch rebuilds when a source or a flag changes, not a header: the header's digest is a flag
    header_tag = "-DESPARSE_SP24_HEADER=" + hashlib.sha1((CSRC / "sp24_mma.h").read_bytes()).hexdigest()[:12]
    try:
        _EXT = load(name="esparse_sp24_cuda", sources=[str(CSRC / s) for s in SOURCES],
                    extra_cuda_cflags=["-O3", "-std=c++17", header_tag], extra_cflags=["-O3", header_tag],
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(out), verbose=verbose)
    except Exception as exc:  # compiler missing or failing: the backend is unavailable, not fatal
        _EXT_ERROR = f"building the CUDA decode kernel failed: {type(exc).__name__}: {exc}"[:2000]
        raise ConfigError(_EXT_ERROR) from exc
    return _EXT


def available() -> bool:
    try:
        load_extension()
        meta_variant()
    except ConfigError:
        return False
    return True


def supports_shape(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    return in_features % CHUNK == 0 and out_features >= 1 and dtype in (torch.float16, torch.bfloat16)


def effective_splits(in_features: int, split_k: int) -> int:
    """Split-K factor the kernel launches (no empty split): ceil(chunks / ceil(chunks / split_k))."""
    chunks = in_features // CHUNK
    per = -(-chunks // max(1, split_k))
    return -(-chunks // per)


def smem_bytes(in_features: int, split_k: int, tokens: int) -> int:
    chunks = in_features // CHUNK
    per = -(-chunks // max(1, split_k))
    return per * CHUNK * tokens * 2


def fits_shared_memory(config: "CudaConfig", in_features: int, tokens: int) -> bool:
    """Whether a configuration can run `tokens` rows: `direct` stages nothing in shared memory, the
    other modes stage each CTA's K range of x (smem_bytes), at most MAX_SMEM."""
    return config.direct or smem_bytes(in_features, config.split_k, tokens) <= MAX_SMEM


def cluster_fits(config: "CudaConfig", in_features: int) -> bool:
    """Whether a configuration's cluster reduction, if it asks for one, gets 2..MAX_CLUSTER_SPLITS effective
    splits over `in_features` (a cluster holds the splits of one row tile)."""
    return not config.cluster or 2 <= effective_splits(in_features, config.split_k) <= MAX_CLUSTER_SPLITS


@dataclass(frozen=True)
class CudaConfig:
    """One launch configuration of the CUDA decode kernel."""

    warps: int = 4  # 16 weight rows per warp
    split_k: int = 1
    depth: int = 4  # 64-column chunks in flight per thread
    pre: bool = False  # stage x[:, perm] in fragment order once (one extra launch) instead of per CTA
    direct: bool = False  # with pre: read the staged fragments from global memory, no shared-memory copy
    # programmatic dependent launch (compute capability 9.0+): the kernel streams its first weights
    # while the previous kernel in the stream finishes (csrc/sp24_mma.cu)
    pdl: bool = False
    # the splits of a row tile as one thread-block cluster, reducing through distributed shared memory
    # instead of a global workspace (compute capability 9.0+, 2..MAX_CLUSTER_SPLITS splits; csrc/sp24_mma.cu)
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.direct and not self.pre:
            raise ConfigError("direct=True reads the fragments that pre=True stages: it needs pre=True")
        if self.cluster and not 2 <= self.split_k <= MAX_CLUSTER_SPLITS:
            raise ConfigError(f"cluster=True reduces 2..{MAX_CLUSTER_SPLITS} splits in one cluster, "
                              f"got split_k={self.split_k}")
        if not 1 <= self.warps <= 8:
            raise ConfigError(f"warps={self.warps} must be in 1..8")
        if self.split_k < 1:
            raise ConfigError(f"split_k={self.split_k} must be >= 1")
        if self.depth not in DEPTHS:
            raise ConfigError(f"depth={self.depth} must be one of {DEPTHS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CudaConfig":
        return cls(**{k: data[k] for k in ("warps", "split_k", "depth", "pre", "direct", "pdl", "cluster") if k in data})

    @property
    def label(self) -> str:
        return f"mma_w{self.warps}_sk{self.split_k}_d{self.depth}" + ("_pre" if self.pre else "") + \
            ("_ldg" if self.direct else "") + ("_pdl" if self.pdl else "") + ("_cl" if self.cluster else "")

    @property
    def rows_per_cta(self) -> int:
        return 16 * self.warps

    def supports(self, tokens: int) -> bool:
        return 1 <= tokens <= MAX_TOKENS


class CudaWorkspace:
    """Split-K partials (fp32), zeroed ticket counters and staged inputs for one (config, shape or group
    of shapes sharing x, max tokens). ``out_features``: one weight's rows, or each grouped weight's;
    ``staged``: how many permutations the ``pre`` mode stages per call (one per distinct permutation)."""

    def __init__(self, config: CudaConfig, out_features, max_tokens: int, device, in_features: int,
                 dtype: torch.dtype = torch.float16, staged: int = 1):
        if max_tokens > MAX_TOKENS:
            raise ConfigError(f"the CUDA decode kernel takes at most {MAX_TOKENS} tokens, got {max_tokens}")
        if not fits_shared_memory(config, in_features, max_tokens):
            raise ConfigError(
                f"{config.label} stages {smem_bytes(in_features, config.split_k, max_tokens)} bytes of activations "
                f"per CTA for {in_features} features and {max_tokens} tokens, more than the {MAX_SMEM} allowed: use "
                f"a larger split_k or direct=True")
        splits = effective_splits(in_features, config.split_k)
        if not cluster_fits(config, in_features):
            raise ConfigError(f"{config.label} launches {splits} splits for {in_features} features; the cluster "
                              f"reduction takes 2..{MAX_CLUSTER_SPLITS}")
        widths = [int(out_features)] if isinstance(out_features, int) else [int(n) for n in out_features]
        if not 1 <= len(widths) <= MAX_GROUP or not 1 <= staged <= len(widths):
            raise ConfigError(f"a launch takes 1..{MAX_GROUP} weights and stages 1..weights permutations, "
                              f"got {len(widths)} weights and {staged} staged")
        tiles = sum(-(-n // config.rows_per_cta) for n in widths)
        # the cluster reduction keeps its partials on chip
        in_global = splits > 1 and not config.cluster
        self.partials = torch.empty(max(splits * max_tokens * sum(widths), 1) if in_global else 1,
                                    dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)
        self.max_tokens = max_tokens
        # x[:, perm] in fragment order for the pre mode (filled by one sp24_stage launch per call)
        self.xfrag = (torch.empty(staged * max_tokens * in_features, dtype=dtype, device=device)
                      if config.pre else None)
        self.xfrag_copies = [] if self.xfrag is None else list(self.xfrag.chunk(staged))
        self.meta_variant = meta_variant()  # resolved now: it synchronises


MAX_GROUP = 3  # weights one grouped launch runs (csrc/sp24_mma.h's kMaxGroup)


def sp24_cuda_group_matmul(x: torch.Tensor, packs: list[Packed24], config: CudaConfig, workspace: CudaWorkspace,
                           outs: list[torch.Tensor], metas_sm90: list | None = None) -> list[torch.Tensor]:
    """outs[i][T, N_i] = x[T, K] @ W_i^T for 1-3 packed weights sharing x, in one launch (plus one staging
    launch in the ``pre`` modes, one staged copy per distinct permutation); 1 <= T <= MAX_TOKENS.

    ``outs`` may be column slices of one [T, sum(N_i)] buffer. ``metas_sm90[i]``: weight i's metadata in
    CUTLASS's sm90 layout, read instead of ``packs[i].meta`` (or None). No host synchronisation, no
    allocation.
    """
    # checked here, before the extension (whose own checks are the second line), with the values named
    if not 1 <= len(packs) <= MAX_GROUP:
        raise ConfigError(f"a launch takes 1..{MAX_GROUP} weights, got {len(packs)}")
    metas_sm90 = metas_sm90 or [None] * len(packs)
    if len(outs) != len(packs) or len(metas_sm90) != len(packs):
        raise ConfigError(f"{len(packs)} weights need as many outputs and metadata entries, got {len(outs)} and "
                          f"{len(metas_sm90)}")
    for i, packed in enumerate(packs):
        if packed.in_features != x.shape[-1]:
            raise ConfigError(f"x has {x.shape[-1]} features, weight {i} has {packed.in_features}")
    t = x.shape[0]
    if t > workspace.max_tokens:
        raise ConfigError(f"workspace sized for {workspace.max_tokens} tokens, got {t}")
    ext = load_extension()
    xfrags = [None] * len(packs)
    if config.pre:
        if workspace.xfrag is None or workspace.xfrag.dtype != x.dtype:
            raise ConfigError(f"{config.label} needs a workspace built for it with dtype {x.dtype}")
        distinct: list = []  # one staged copy per distinct permutation (by identity)
        for i, packed in enumerate(packs):
            slot = next((j for j, p in enumerate(distinct) if p is packed.perm), None)
            if slot is None:
                slot = len(distinct)
                distinct.append(packed.perm)
            if slot >= len(workspace.xfrag_copies):
                raise ConfigError(f"workspace stages {len(workspace.xfrag_copies)} permutations, the call needs more")
            xfrags[i] = workspace.xfrag_copies[slot]
        ext.sp24_stage(x, distinct, workspace.xfrag_copies[:len(distinct)], config.pdl)
    metas, aligned = [], []
    for packed, meta_sm90 in zip(packs, metas_sm90):
        if meta_sm90 is None:
            metas.append(packed.meta)
            aligned.append(0)
        else:
            metas.append(meta_sm90)
            aligned.append(sm90_meta_shape(packed.out_features, packed.in_features)[0])
    ext.sp24_mma(x, [p.perm for p in packs], [p.values for p in packs], metas, outs, workspace.partials,
                 workspace.counters, config.split_k, config.warps, config.depth, workspace.meta_variant, xfrags,
                 config.direct, aligned, config.pdl, config.cluster)
    return outs


def sp24_cuda_matmul(x: torch.Tensor, packed: Packed24, config: CudaConfig, workspace: CudaWorkspace,
                     out: torch.Tensor | None = None, meta_sm90: torch.Tensor | None = None) -> torch.Tensor:
    """out[T, N] = x[T, K] @ W^T (permutation included) with the CUDA decode kernel; 1 <= T <= MAX_TOKENS.

    ``meta_sm90``: the metadata in CUTLASS's sm90 layout (pack.meta_to_sm90), read instead of
    ``packed.meta`` (which may then be empty): the layout a layer holding the CUTLASS prefill path keeps.
    No host synchronisation; allocates only `out` when it is not given (caching allocator).
    """
    if out is None:
        out = torch.empty(x.shape[0], packed.out_features, dtype=x.dtype, device=x.device)
    sp24_cuda_group_matmul(x, [packed], config, workspace, [out], [meta_sm90])
    return out


def _check_variant(ext, variant: int, device) -> bool:
    from .pack import pack_24, random_24_weight, reference_linear, rel_frobenius_error

    gen = torch.Generator().manual_seed(7)
    w, mask, perm = random_24_weight(80, 256, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm).to(device)
    for tokens, split in ((3, 1), (11, 2)):
        x = torch.randn(tokens, 256, generator=gen).half().to(device)
        out = torch.full((tokens, 80), float("nan"), dtype=torch.float16, device=device)
        ws = torch.empty(split * tokens * 80, dtype=torch.float32, device=device)
        cnt = torch.zeros(8, dtype=torch.int32, device=device)
        ext.sp24_mma(x, [packed.perm], [packed.values], [packed.meta], [out], ws, cnt, split, 4, 4, variant, [None],
                     False, [0], False, False)
        if not rel_frobenius_error(out, reference_linear(x, packed)) < 1e-3:
            return False
    return True


def meta_variant() -> int:
    """The metadata-operand reading (0 or 1) under which the device matches the reference (cached)."""
    global _META_VARIANT, _EXT_ERROR
    if _META_VARIANT is not None:
        return _META_VARIANT
    ext = load_extension()
    device = torch.device("cuda", torch.cuda.current_device())
    for variant in (0, 1):
        if _check_variant(ext, variant, device):
            _META_VARIANT = variant
            return variant
    _EXT_ERROR = "the CUDA decode kernel matches the reference under no metadata layout (0 or 1)"
    raise ConfigError(_EXT_ERROR)


# Small row tiles give a layer enough CTAs without split-K (and its reduction); large ones reuse
# each CTA's staged activations over more rows.
CANDIDATE_WARPS = (1, 2, 4, 8)


def _hopper_feature(switch: str) -> bool:
    """A compute-capability-9.0 launch feature is tuned unless the environment variable `switch` is 0."""
    if os.environ.get(switch, "1") == "0":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def pdl_supported() -> bool:
    """Programmatic dependent launch needs compute capability 9.0 or newer; ESPARSE_PDL=0 leaves it out
    of the tuning (the A/B of docs/PERFORMANCE.md, run Q1)."""
    return _hopper_feature("ESPARSE_PDL")


def cluster_supported() -> bool:
    """Thread-block clusters need compute capability 9.0 or newer; ESPARSE_CLUSTER=0 leaves the cluster
    reduction out of the tuning (for an A/B)."""
    return _hopper_feature("ESPARSE_CLUSTER")


def cuda_candidates(out_features: int, in_features: int, tokens: int, n_sms: int = 132,
                    pdl: bool = False, cluster: bool = False) -> list[CudaConfig]:
    """Configurations worth timing: 1, 2, 4 or 8 warps (16 rows each), depth 4 or 8, split-K giving
    0.5-6 CTAs per SM, the activations gathered per CTA or staged once by a separate launch (``pre``; at 1 token too, where the
    extra launch can cost more than the per-CTA gather it saves, so the tuner decides), and
    staged fragments copied to shared memory or read from global memory where used (``direct``, which
    needs no shared memory, so its split-K is not bounded by it); with ``pdl``, each also as a
    programmatic dependent launch; with ``cluster``, those of 2..MAX_CLUSTER_SPLITS splits (the programmatic
    ones where ``pdl``) also with the cluster reduction."""
    if not (1 <= tokens <= MAX_TOKENS) or in_features % CHUNK:
        return []
    chunks = in_features // CHUNK
    out: list[CudaConfig] = []
    for warps in CANDIDATE_WARPS:
        tiles = -(-out_features // (16 * warps))
        seen = set()
        for split in (1, 2, 3, 4, 6, 8, 12, 16):
            eff = effective_splits(in_features, split)
            if eff in seen or eff > chunks:
                continue
            ctas = tiles * eff
            if ctas > 6 * n_sms or (ctas < n_sms // 2 and eff != chunks and split != 1):
                continue
            fits_smem = smem_bytes(in_features, split, tokens) <= MAX_SMEM
            seen.add(eff)
            for depth in DEPTHS:
                if fits_smem:
                    out.append(CudaConfig(warps=warps, split_k=eff, depth=depth))
                    out.append(CudaConfig(warps=warps, split_k=eff, depth=depth, pre=True))
                out.append(CudaConfig(warps=warps, split_k=eff, depth=depth, pre=True, direct=True))
    if pdl:
        out += [replace(c, pdl=True) for c in out]
    if cluster:
        out += [replace(c, cluster=True) for c in out if c.pdl == pdl and 2 <= c.split_k <= MAX_CLUSTER_SPLITS]
    return out


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch model of the kernel's data movement (for CPU tests of the index arithmetic)


def _prmt(a: int, b: int, sel: int) -> int:
    data = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 7
        out |= ((data >> (8 * nib)) & 0xFF) << (8 * i)
    return out


def _meta_bytes(w0: int, w1: int, shift: int) -> tuple[int, int]:
    m0 = (w0 >> shift) & 0x0F0F0F0F
    m1 = (w1 >> shift) & 0x0F0F0F0F
    return (m0 | (m0 >> 12)) & 0xFFFFFFFF, (m1 | (m1 >> 12)) & 0xFFFFFFFF


def _mma_sp_reference(a_regs, b_regs, e_regs, variant: int) -> torch.Tensor:
    """D[16, 8] of one m16n8k32 sparse MMA from per-lane operands, as the PTX ISA lays them out.

    a_regs[lane] = 4 pairs of values (a0a1, a2a3, a4a5, a6a7); b_regs[lane] = 8 values; e_regs[lane]
    = the metadata word; variant picks the reading of the metadata figure (see module doc).
    """
    comp = torch.zeros(16, 16, dtype=torch.float64)
    bmat = torch.zeros(32, 8, dtype=torch.float64)
    idx = torch.zeros(16, 8, 2, dtype=torch.int64)
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for r, (row, col) in enumerate(((g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8))):
            comp[row, col], comp[row, col + 1] = a_regs[lane][r]
        for e in range(8):
            bmat[2 * q + (e & 1) + 8 * (e >> 1), g] = b_regs[lane][e]
        if q < 2:  # sparsity selector 0: threads 0 and 1 of each quad
            word = e_regs[lane]
            for half in range(2):
                bits = (word >> (16 * half)) & 0xFFFF
                row = g + 8 * half if variant == 0 else g + 8 * q
                for i in range(4):
                    grp = 4 * q + i if variant == 0 else 4 * half + i
                    nib = (bits >> (4 * i)) & 0xF
                    idx[row, grp, 0], idx[row, grp, 1] = nib & 3, nib >> 2
    dense = torch.zeros(16, 32, dtype=torch.float64)
    for row in range(16):
        for grp in range(8):
            for s in range(2):
                dense[row, 4 * grp + int(idx[row, grp, s])] += comp[row, 2 * grp + s]
    return dense @ bmat


def emulate(x: torch.Tensor, packed: Packed24, config: CudaConfig, variant: int = 0,
            meta_sm90: torch.Tensor | None = None) -> torch.Tensor:
    """out[T, N] computed by replaying the kernel's loads, staging, metadata shifts and MMAs (slow;
    small shapes only). Mirrors csrc/sp24_mma.cu step for step, in float64; with ``meta_sm90`` the
    metadata comes from that layout through the kernel's sm90 loads and byte permutes."""
    n, k = packed.shape
    t_count = x.shape[0]
    if k % CHUNK or not 1 <= t_count <= MAX_TOKENS:
        raise ConfigError(f"emulate needs K % 64 == 0 and 1..{MAX_TOKENS} tokens, got K={k} and {t_count} tokens")
    vals = packed.values.to(torch.float64).cpu()
    meta = packed.meta.cpu().to(torch.int64) & 0xFFFFFFFF
    e32 = None
    if meta_sm90 is not None:
        e32 = meta_sm90.cpu().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        kstride = sm90_meta_shape(n, k)[0] * 4
    perm = None if packed.perm is None else packed.perm.cpu().to(torch.int64)
    xd = x.to(torch.float64).cpu()
    nchunks = k // CHUNK
    cps = -(-nchunks // config.split_k)
    splits = -(-nchunks // cps)
    tile_rows = 16 * config.warps
    partial = torch.zeros(splits, t_count, n, dtype=torch.float64)
    nt_count = 4 if t_count > 16 else (2 if t_count > 8 else 1)  # the kernel's token tiles of 8
    for split in range(splits):
        c_begin = split * cps
        nc = min(cps, nchunks - c_begin)
        # staging: xs[((c*2 + j)*T + t)*4 + tq][e] = x[t, perm[col]]
        xs = torch.zeros(nc * 2 * t_count * 4, 8, dtype=torch.float64)
        for i in range(nc * CHUNK):
            c, a, pos = i >> 6, (i & 63) >> 2, i & 3
            g = ((a & 1) << 2) | (a >> 2)
            j = (a >> 1) & 1
            kk = 4 * g + pos
            tq, e = (kk & 7) >> 1, ((kk >> 3) << 1) | (kk & 1)
            col = c_begin * CHUNK + i
            src = int(perm[col]) if perm is not None else col
            for t in range(t_count):
                xs[((c * 2 + j) * t_count + t) * 4 + tq, e] = xd[t, src]
        for tile in range(-(-n // tile_rows)):
            for warp in range(config.warps):
                row0 = tile * tile_rows + warp * 16
                if row0 >= n:
                    continue
                acc = torch.zeros(nt_count, 16, 8, dtype=torch.float64)
                for c in range(nc):
                    chunk = c_begin + c
                    a_lane, e_lane = [], []
                    for lane in range(32):
                        gid, tig = lane >> 2, lane & 3
                        ra, rb = min(row0 + gid, n - 1), min(row0 + gid + 8, n - 1)
                        h = tig & 1
                        rx = (rb if h else ra) if variant == 1 else ra
                        ry = rx if variant == 1 else rb
                        sx, sy = (0, 4) if variant == 1 else (4 * h, 4 * h)
                        va = vals[ra, 32 * chunk + 8 * tig: 32 * chunk + 8 * tig + 8].view(4, 2)
                        vb = vals[rb, 32 * chunk + 8 * tig: 32 * chunk + 8 * tig + 8].view(4, 2)
                        if e32 is None:
                            w0 = (int(meta[rx, 2 * chunk]), int(meta[rx, 2 * chunk + 1]))
                            w1 = (int(meta[ry, 2 * chunk]), int(meta[ry, 2 * chunk + 1]))
                        else:  # the kernel's sm90 loads: two 8-byte loads, then byte permutes
                            q = (row0 >> 6) * 256 + ((row0 & 63) >> 4) * 64 + gid * 4 + (chunk >> 1) * kstride \
                                + (chunk & 1) * 2
                            ex, ey = (int(e32[q]), int(e32[q + 1])), (int(e32[q + 32]), int(e32[q + 33]))
                            lo = (_prmt(ex[0], ey[0], 0x5410), _prmt(ex[1], ey[1], 0x5410))
                            hi = (_prmt(ex[0], ey[0], 0x7632), _prmt(ex[1], ey[1], 0x7632))
                            w0 = (hi if h else lo) if variant == 1 else lo
                            w1 = w0 if variant == 1 else hi
                        x0, x1 = _meta_bytes(w0[0], w0[1], sx)
                        y0, y1 = _meta_bytes(w1[0], w1[1], sy)
                        lx, ly = _prmt(x0, x1, 0x5140), _prmt(y0, y1, 0x5140)
                        e_lane.append((_prmt(lx, ly, 0x5410), _prmt(lx, ly, 0x7632)))
                        a_lane.append((va, vb))
                    for j in range(2):
                        a_regs = [(va[2 * j].tolist(), vb[2 * j].tolist(), va[2 * j + 1].tolist(),
                                   vb[2 * j + 1].tolist()) for va, vb in a_lane]
                        e_regs = [e[j] for e in e_lane]
                        for nt in range(nt_count):
                            b_regs = []
                            for lane in range(32):
                                t = min(nt * 8 + (lane >> 2), t_count - 1)
                                b_regs.append(xs[((c * 2 + j) * t_count + t) * 4 + (lane & 3)].tolist())
                            acc[nt] += _mma_sp_reference(a_regs, b_regs, e_regs, variant)
                for nt in range(nt_count):
                    for r in range(16):
                        for col in range(8):
                            t, row = nt * 8 + col, row0 + r
                            if t < t_count and row < n:
                                partial[split, t, row] = acc[nt, r, col]
    return partial.sum(dim=0)


def emulate_stage(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The pre mode's staged activations [K/64 * 2 * T * 4, 8] as csrc's sp24_stage_kernel writes them
    (slot ((c*2 + j)*T + t)*4 + tq, element e), by the forward mapping from fragment to column."""
    t_count, k = x.shape
    slots = (k // CHUNK) * 2 * t_count * 4
    out = torch.empty(slots, 8, dtype=x.dtype)
    for q in range(slots):
        tq, rest = q & 3, q >> 2
        t, cj = rest % t_count, rest // t_count
        j, c = cj & 1, cj >> 1
        for e in range(8):
            kk = 2 * tq + (e & 1) + 8 * (e >> 1)
            g = kk >> 2
            a = (g & 3) * 4 + 2 * j + (g >> 2)
            col = c * CHUNK + 4 * a + (kk & 3)
            out[q, e] = x[t, int(perm[col]) if perm is not None else col]
    return out


def staged_by_columns(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The same slots filled the way the decode kernel stages them per CTA (inverse mapping, column to
    fragment); equal to emulate_stage when the two mappings agree."""
    t_count, k = x.shape
    out = torch.empty((k // CHUNK) * 2 * t_count * 4, 8, dtype=x.dtype)
    for i in range(k):
        c, a, pos = i >> 6, (i & 63) >> 2, i & 3
        g = ((a & 1) << 2) | (a >> 2)
        j = (a >> 1) & 1
        kk = 4 * g + pos
        tq, e = (kk & 7) >> 1, ((kk >> 3) << 1) | (kk & 1)
        for t in range(t_count):
            out[((c * 2 + j) * t_count + t) * 4 + tq, e] = x[t, int(perm[i]) if perm is not None else i]
    return out


def roofline_us(out_features: int, in_features: int, tokens: int, bytes_per_s: float = 4.15e12) -> float:
    """Memory-bound time of one call at the given bandwidth: packed weight + activations + output."""
    packed = out_features * in_features * 2 * 0.5625
    return (packed + 2 * tokens * (in_features + out_features)) / bytes_per_s * 1e6


__all__ = [
    "CudaConfig", "CudaWorkspace", "sp24_cuda_matmul", "sp24_cuda_group_matmul", "MAX_GROUP", "cuda_candidates", "available", "load_extension",
    "meta_variant", "effective_splits", "smem_bytes", "emulate", "emulate_stage", "staged_by_columns", "pdl_supported",
    "supports_shape", "roofline_us",
]
