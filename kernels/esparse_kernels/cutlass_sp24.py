"""Prefill path on Hopper's sparse tensor cores: CUTLASS's sparse warpgroup GEMM (``wgmma.sp``).

The CUDA decode kernel (cuda_sp24) uses the warp-level ``mma.sp``, which on Hopper runs at a fraction
of the warpgroup instructions' rate; many-token GEMMs are compute-bound, so they need ``wgmma.sp``
with TMA-fed shared memory, which is what CUTLASS 3's sparse collective builds. ``csrc/
sp24_sm90_cutlass.cu`` instantiates it for fp16 and bf16 with eight tile/cluster/schedule
configurations (the tuner picks per shape and token bucket), plus the channel-permutation gather, and
exports a C ABI; this module compiles it with ``nvcc`` (one translation unit per instantiation, in
parallel), loads it with ctypes and runs it on the caller's stream. No torch headers are involved, so
the library does not depend on the torch build, and a launch is graph-capturable: no allocation, no
synchronisation (workspace and outputs come from the caller).

Inputs: the CUTLASS headers of the ``nvidia-cutlass`` wheel (``pip install --no-deps
nvidia-cutlass==4.2.0.0``: its Python dependencies, cuda-python and scipy among them, are not needed,
so it is not in the locked environments) or ``$ESPARSE_CUTLASS_DIR`` (a CUTLASS source tree), ``nvcc`` 12.2+ (``$CUDA_HOME/bin`` or ``PATH``), a compute-capability 9.0 GPU (the
sm_90a code runs there only). ``$ESPARSE_CUTLASS_LIB`` names a prebuilt library to load instead.

Weight layout: CUTLASS's compressor turns the masked dense weight (permuted column order) into its
compressed values and its own metadata layout. The compressed values are the kept values in column
order, which is exactly pack.py's ``values`` when no padding is needed, so ``CutlassWeight`` then
shares that tensor and adds only CUTLASS's metadata (1/16 of the dense bytes). That metadata is
pack.py's 16-bit words in another order (``pack.meta_to_sm90``, checked on every weight), which the
CUDA decode kernel and the Triton decompression also read, so a layer can keep it as its only copy.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from esparse.errors import ConfigError

from .pack import Packed24, meta_from_sm90, unpack_24_permuted

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "sp24_sm90_cutlass.cu"
LIB_NAME = "libesparse_sp24_sm90.so"
NUM_CONFIGS = 8
DTYPES = {torch.float16: 0, torch.bfloat16: 1}
# one translation unit per (dtype, configuration) and the dispatcher (-1): see the source's header
UNITS = tuple(100 * d + c for d in DTYPES.values() for c in range(NUM_CONFIGS)) + (-1,)


def unit_defines(unit: int) -> list[str]:
    if unit < 0:
        return [f"-DESP_UNIT={unit}"]
    return [f"-DESP_UNIT={unit}", f"-DESP_DTYPE={unit // 100}", f"-DESP_CONFIG={unit % 100}"]
NVCC_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
              "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC")
# The tiles are 128 tokens wide, so at few tokens they run mostly empty; but a call is memory-bound
# up to some hundred tokens even so, and stream-K spreads a few tiles over every SM, so the tuner times
# CUTLASS from 16 tokens (where the two overlap, 16-32 tokens, the tuner decides).
MIN_TOKENS = 16
RETURN_CODES = {1: "bad dtype or configuration", 2: "workspace too small", 3: "shape not supported",
                4: "initialisation failed", 5: "launch failed"}

_LIB = None
_LIB_ERROR: str | None = None


def cutlass_source_dir() -> Path:
    """The CUTLASS source tree (with include/ and tools/util/include/)."""
    env = os.environ.get("ESPARSE_CUTLASS_DIR")
    if env:
        root = Path(env)
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or spec.origin is None:
            raise ConfigError("the CUTLASS prefill kernel needs the CUTLASS headers: pip install --no-deps "
                              "nvidia-cutlass==4.2.0.0 (only its headers are used), or set ESPARSE_CUTLASS_DIR "
                              "to a CUTLASS source tree")
        root = Path(spec.origin).parent / "source"
    if not (root / "include" / "cutlass" / "cutlass.h").is_file():
        raise ConfigError(f"no CUTLASS headers under {root} (expected include/cutlass/cutlass.h)")
    return root


def find_nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = ([str(Path(home) / "bin" / "nvcc")] if home else []) + [shutil.which("nvcc") or ""]
    for path in candidates:
        if path and Path(path).is_file():
            return path
    raise ConfigError("the CUTLASS prefill kernel is compiled with nvcc, found neither $CUDA_HOME/bin/nvcc "
                      "nor nvcc on PATH")


def compile_commands(nvcc: str, cutlass_dir: Path, obj_dir: Path, lib_path: Path) -> tuple[list, list]:
    """(one compile command per unit, the link command): the whole build, kept here so it is recorded."""
    inc = [f"-I{cutlass_dir / 'include'}", f"-I{cutlass_dir / 'tools' / 'util' / 'include'}"]
    compiles = [[nvcc, *NVCC_FLAGS, *inc, *unit_defines(u), "-c", str(SOURCE), "-o", str(obj_dir / f"u{u}.o")]
                for u in UNITS]
    link = [nvcc, "-shared", "-gencode=arch=compute_90a,code=sm_90a", *(str(obj_dir / f"u{u}.o") for u in UNITS),
            "-o", str(lib_path)]
    return compiles, link


def _build_key(nvcc: str, cutlass_dir: Path) -> str:
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(version.encode())
    h.update(" ".join(NVCC_FLAGS).encode())
    h.update(str(cutlass_dir.resolve()).encode())
    return h.hexdigest()[:16]


def default_build_dir() -> Path:
    env = os.environ.get("ESPARSE_KERNEL_BUILD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "esparse_kernels"


def build_library(out_dir: Path | None = None, jobs: int | None = None, log=None) -> Path:
    """Compile the library (cached by source, flags, nvcc version and CUTLASS path); returns its path.

    The units compile in parallel into a temporary directory; the library appears under its final name
    only when every unit and the link succeeded.
    """
    nvcc, cutlass_dir = find_nvcc(), cutlass_source_dir()
    out = (out_dir or default_build_dir()) / f"cutlass_sp24-{_build_key(nvcc, cutlass_dir)}"
    lib = out / LIB_NAME
    if lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        compiles, link = compile_commands(nvcc, cutlass_dir, Path(tmp), Path(tmp) / LIB_NAME)
        if log:
            log(f"compiling {len(compiles)} CUTLASS units with {nvcc} ({jobs or os.cpu_count()} jobs)")

        def run(cmd):
            return subprocess.run(cmd, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            results = list(pool.map(run, compiles))
        results.append(run(link))
        for cmd, res in zip(compiles + [link], results):
            if res.returncode != 0:
                raise ConfigError(f"building the CUTLASS prefill kernel failed ({' '.join(cmd[-4:])}):\n"
                                  f"{(res.stderr or res.stdout)[-3000:]}")
        os.replace(Path(tmp) / LIB_NAME, lib)
    return lib


def _bind(lib) -> None:
    c_int, c_ptr, c_size = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    lib.esp_sp24_sm90_num_configs.restype = c_int
    lib.esp_sp24_sm90_config_name.argtypes = [c_int]
    lib.esp_sp24_sm90_config_name.restype = ctypes.c_char_p
    lib.esp_sp24_sm90_layout.argtypes = [c_int, c_int, c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.esp_sp24_sm90_layout.restype = c_int
    lib.esp_sp24_sm90_compress.argtypes = [c_int, c_int, c_int, c_ptr, c_ptr, c_ptr, c_ptr, c_size, c_int, c_ptr,
                                           ctypes.POINTER(c_size)]
    lib.esp_sp24_sm90_compress.restype = c_int
    lib.esp_sp24_sm90_gemm.argtypes = [c_int, c_int, c_int, c_int, c_int, c_ptr, c_ptr, c_ptr, c_ptr, c_ptr, c_size,
                                       c_int, c_ptr, ctypes.POINTER(c_size)]
    lib.esp_sp24_sm90_gemm.restype = c_int
    lib.esp_permute_columns.argtypes = [c_int, c_int, c_int, c_ptr, c_ptr, c_ptr, c_ptr]
    lib.esp_permute_columns.restype = c_int
    lib.esp_sp24_sm90_gemm_permuted.argtypes = [c_int, c_int, c_int, c_int, c_int, c_ptr, c_ptr, c_ptr, c_ptr, c_ptr,
                                                c_ptr, c_ptr, c_size, c_int, c_ptr]
    lib.esp_sp24_sm90_gemm_permuted.restype = c_int


def load_library(log=None):
    """Build (first call) and load the library; raises ConfigError when it cannot run here."""
    global _LIB, _LIB_ERROR
    if _LIB is not None:
        return _LIB
    if _LIB_ERROR is not None:
        raise ConfigError(_LIB_ERROR)
    try:
        if not torch.cuda.is_available():
            raise ConfigError("the CUTLASS prefill kernel needs a CUDA device (torch.cuda.is_available() is False)")
        cap = torch.cuda.get_device_capability()
        if cap != (9, 0):
            raise ConfigError(f"the CUTLASS prefill kernel is built for sm_90a (compute capability 9.0), "
                              f"the device has {cap[0]}.{cap[1]}")
        prebuilt = os.environ.get("ESPARSE_CUTLASS_LIB")
        path = Path(prebuilt) if prebuilt else build_library(log=log)
        if not path.is_file():
            raise ConfigError(f"ESPARSE_CUTLASS_LIB={prebuilt} is not a file")
        lib = ctypes.CDLL(str(path))
        _bind(lib)
        if lib.esp_sp24_sm90_num_configs() != NUM_CONFIGS:
            raise ConfigError(f"{path} has {lib.esp_sp24_sm90_num_configs()} configurations, expected {NUM_CONFIGS}")
    except ConfigError as exc:
        _LIB_ERROR = str(exc)
        raise
    except OSError as exc:
        _LIB_ERROR = f"loading the CUTLASS prefill kernel failed: {exc}"
        raise ConfigError(_LIB_ERROR) from exc
    _LIB = lib
    return lib


def available() -> bool:
    try:
        load_library()
    except ConfigError:
        return False
    return True


def supports_shape(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """16-byte aligned rows of the output and of both operands (TMA), one dtype the library has."""
    return dtype in DTYPES and out_features % 8 == 0 and in_features % 64 == 0


def _check(code: int, what: str) -> None:
    if code != 0:
        raise ConfigError(f"CUTLASS {what} returned {code}: {RETURN_CODES.get(code, 'unknown error')}")


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _stream_ptr(device: torch.device) -> int:
    """The current stream of the tensors' device (not of the current device), as a raw handle: the
    eager prefill calls this per layer, and building a torch.cuda.Stream object costs microseconds."""
    return torch._C._cuda_getCurrentRawStream(_device_index(device))


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = _device_index(device)
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@dataclass(frozen=True)
class CutlassConfig:
    """One of the library's tile/schedule instantiations (csrc/sp24_sm90_cutlass.cu, ConfigTraits)."""

    index: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index < NUM_CONFIGS:
            raise ConfigError(f"CUTLASS configuration index {self.index} must be in 0..{NUM_CONFIGS - 1}")

    @property
    def label(self) -> str:
        name = _LIB.esp_sp24_sm90_config_name(self.index).decode() if _LIB is not None else str(self.index)
        return f"cutlass_{name}"

    def to_dict(self) -> dict:
        return {"index": self.index}

    @classmethod
    def from_dict(cls, data: dict) -> "CutlassConfig":
        return cls(int(data.get("index", 0)))


def cutlass_candidates(out_features: int, in_features: int, tokens: int, dtype: torch.dtype) -> list[CutlassConfig]:
    if tokens < MIN_TOKENS or not supports_shape(out_features, in_features, dtype):
        return []
    return [CutlassConfig(i) for i in range(NUM_CONFIGS)]


class CutlassWeight:
    """A 2:4 weight in CUTLASS's compressed layout: values (shared with pack.py's when identical) and
    CUTLASS's metadata, made once on the device by CUTLASS's compressor (this synchronises)."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                 shares_values: bool):
        self.values, self.meta, self.shape, self.dtype = values, meta, shape, dtype
        self.shares_values = shares_values

    @classmethod
    def from_packed(cls, packed: Packed24) -> "CutlassWeight":
        lib = load_library()
        n, k = packed.shape
        dtype = packed.values.dtype
        if not supports_shape(n, k, dtype):
            raise ConfigError(f"the CUTLASS prefill kernel does not take a {n}x{k} {dtype} weight "
                              "(needs out_features % 8 == 0, in_features % 64 == 0, fp16 or bf16)")
        device = packed.values.device
        layout = (ctypes.c_int64 * 4)()
        _check(lib.esp_sp24_sm90_layout(DTYPES[dtype], n, k, layout), "layout")
        rows, cols, a_bytes, e_bytes = (int(v) for v in layout)
        # CUTLASS's compressor reads the kept positions off the non-zeros; a kept value that is exactly
        # zero gets a placeholder so that the positions (and the compressed values) are pack.py's
        kept = torch.where(packed.values == 0, torch.finfo(dtype).tiny, packed.values)
        dense = unpack_24_permuted(Packed24(kept, packed.meta, None, packed.shape)).contiguous()
        a_comp = torch.empty(a_bytes // dense.element_size(), dtype=dtype, device=device)
        meta = torch.empty(e_bytes, dtype=torch.uint8, device=device)
        need = ctypes.c_size_t(0)
        args = (DTYPES[dtype], n, k, dense.data_ptr(), a_comp.data_ptr(), meta.data_ptr())
        _check(lib.esp_sp24_sm90_compress(*args, None, 0, _sm_count(device), _stream_ptr(device), ctypes.byref(need)),
               "compressor workspace query")
        workspace = torch.empty(max(need.value, 1), dtype=torch.uint8, device=device)
        _check(lib.esp_sp24_sm90_compress(*args, workspace.data_ptr(), need.value, _sm_count(device), _stream_ptr(device),
                                          None), "compressor")
        del dense, workspace
        values = a_comp.view(rows, cols)
        if not torch.equal(values[:n, : k // 2], kept):
            raise ConfigError(f"CUTLASS's compressed values of the {n}x{k} weight are not the packed format's "
                              "kept values in column order: the compressor's layout changed")
        if not torch.equal(meta_from_sm90(meta, n, k), packed.meta):
            raise ConfigError(f"CUTLASS's metadata of the {n}x{k} weight is not pack.meta_to_sm90 of the packed "
                              "metadata: the compressor's layout changed, and the decode kernel could not share it")
        shares = values.shape == packed.values.shape
        if not shares:  # padded to the tile: keep CUTLASS's copy, with the placeholders zeroed again
            values[:n, : k // 2].masked_fill_(kept.ne(packed.values), 0)
        return cls(packed.values if shares else values, meta, (n, k), dtype, shares)

    def nbytes(self, count_shared: bool = True) -> int:
        own = self.meta.numel()
        if count_shared or not self.shares_values:
            own += self.values.numel() * self.values.element_size()
        return own


def workspace_bytes(weight: CutlassWeight, config: CutlassConfig, tokens: int) -> int:
    lib = load_library()
    n, k = weight.shape
    need = ctypes.c_size_t(0)
    _check(lib.esp_sp24_sm90_gemm(DTYPES[weight.dtype], config.index, n, tokens, k, None, None, None, None, None, 0,
                                  _sm_count(weight.meta.device), None, ctypes.byref(need)), "workspace query")
    return need.value


def permute_columns(x: torch.Tensor, perm: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x[:, perm] for a contiguous 2-D fp16/bf16 x and an int32 perm (the library's shared-memory
    gather: rows staged with 16-byte loads, gathered from shared memory, written coalesced)."""
    lib = load_library()
    t, k = x.shape
    if x.element_size() != 2 or not x.is_contiguous() or perm.dtype != torch.int32 or perm.shape != (k,):
        raise ConfigError(f"permute_columns needs a contiguous 2-byte [T, K] input and an int32 [K] perm, got "
                          f"{x.dtype} {list(x.shape)} and {perm.dtype} {list(perm.shape)}")
    if out is None:
        out = torch.empty_like(x)
    _check(lib.esp_permute_columns(2, t, k, x.data_ptr(), perm.data_ptr(), out.data_ptr(), _stream_ptr(x.device)),
           "permutation gather")
    return out


class PreparedGemm:
    """One layer's prefill GEMM (with its permutation gather, if any) with what is fixed per layer bound
    once: dtype and configuration codes, the weight's, metadata's and permutation's addresses, the
    multiprocessor count. A call is then one host call into the library: the eager prefill pays the host
    time of every layer call, and short prompts are host-bound (esparse_kernels.hostcost). The layer's
    tensors must stay where they are (SparseLinear's never move)."""

    def __init__(self, weight: CutlassWeight, config: CutlassConfig, perm: torch.Tensor | None = None):
        lib = load_library()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        device = weight.meta.device
        if perm is not None and (perm.dtype != torch.int32 or perm.shape != (self.in_features,)
                                 or perm.device != device):
            raise ConfigError(f"the permutation must be int32 [{self.in_features}] on {device}, got "
                              f"{perm.dtype} {list(perm.shape)} on {perm.device}")
        self._fn = lib.esp_sp24_sm90_gemm_permuted
        self._codes = (DTYPES[weight.dtype], config.index, self.out_features)
        self._weight = (weight.values.data_ptr(), weight.meta.data_ptr())
        self._perm = None if perm is None else perm.data_ptr()
        self._keep = (weight, perm)  # the addresses above stay valid while this object lives
        self._sm_count = _sm_count(device)
        self._device_index = _device_index(device)
        self.permuted = perm is not None

    def __call__(self, x: torch.Tensor, out: torch.Tensor, x_perm: torch.Tensor | None = None,
                 workspace: torch.Tensor | None = None) -> torch.Tensor:
        """out[T, N] = x[T, K] @ W^T (x gathered into x_perm first when the layer is permuted); x, out and
        x_perm contiguous, of the layer's dtype and device: the caller guarantees it (no checks here)."""
        ws_ptr, ws_len = (workspace.data_ptr(), workspace.numel()) if workspace is not None else (None, 0)
        code = self._fn(*self._codes, x.shape[0], self.in_features, *self._weight, x.data_ptr(), self._perm,
                        None if x_perm is None else x_perm.data_ptr(), out.data_ptr(), ws_ptr, ws_len, self._sm_count,
                        torch._C._cuda_getCurrentRawStream(self._device_index))
        if code:
            _check(code, "GEMM")
        return out


def sp24_cutlass_matmul(x: torch.Tensor, weight: CutlassWeight, config: CutlassConfig, perm: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, x_perm: torch.Tensor | None = None,
                        workspace: torch.Tensor | None = None) -> torch.Tensor:
    """out[T, N] = x[T, K] @ W^T; with ``perm`` (int32), x[:, perm] is gathered first by
    permute_columns (into ``x_perm`` when given). No host synchronisation; ``workspace`` (uint8, at least workspace_bytes) is needed only
    when that is non-zero. Checks its arguments; SparseLinear holds a PreparedGemm instead."""
    n, k = weight.shape
    t = x.shape[0]
    if x.dtype != weight.dtype or x.shape[1] != k or not x.is_contiguous():
        raise ConfigError(f"CUTLASS GEMM needs a contiguous [T, {k}] {weight.dtype} input, got "
                          f"{list(x.shape)} {x.dtype}")
    if perm is not None and x_perm is None:
        x_perm = torch.empty_like(x)
    if x_perm is not None and (x_perm.shape[0] < t or x_perm.shape[1] != k or x_perm.dtype != x.dtype
                               or not x_perm.is_contiguous()):
        raise ConfigError(f"x_perm must be a contiguous [>= {t}, {k}] {x.dtype} buffer, got "
                          f"{list(x_perm.shape)} {x_perm.dtype}")
    if out is None:
        out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    return PreparedGemm(weight, config, perm)(x, out, x_perm, workspace)


__all__ = [
    "CutlassConfig", "CutlassWeight", "available", "build_library", "compile_commands", "cutlass_candidates",
    "cutlass_source_dir", "find_nvcc", "load_library", "permute_columns", "PreparedGemm", "sp24_cutlass_matmul",
    "supports_shape", "workspace_bytes",
    "MIN_TOKENS",
]
