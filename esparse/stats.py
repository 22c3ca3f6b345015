"""Streaming per-input-channel statistics of a linear layer's calibration inputs.

All statistics are accumulated batch by batch from the inputs that a forward hook sees, so the
activations `X` (T x C_in) of the whole calibration set are never held at once.

Entropy needs a fixed histogram range per channel. This suite takes the exact range from a first
pass (`observe_range`, per-channel min and max over all calibration tokens), then fills the
K-bin histogram over `[lo_j, hi_j]` in a second pass (`observe`). The result does not depend on
batch order or batch size: it is the histogram a one-shot `torch.histc` per channel would give.
A channel whose values are all equal has one occupied bin and entropy 0. On a CPU with numba the
counts come from one compiled pass (`esparse.cpu_kernels.count_into`), identical to the torch path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esparse import cpu_kernels

NEED_NORM = "norm"
NEED_ENTROPY = "entropy"
NEED_HESSIAN = "hessian"
KNOWN_NEEDS = frozenset({NEED_NORM, NEED_ENTROPY, NEED_HESSIAN})


@dataclass
class LayerStats:
    """Statistics of one nn.Linear's calibration inputs X (T x C_in)."""

    ntokens: int
    nsequences: int
    sum_sq: torch.Tensor
    hist: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    hessian: torch.Tensor | None = None

    def l2_norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens."""
        return self.sum_sq.sqrt()

    def wanda_scaler_row(self) -> torch.Tensor:
        """Wanda's `scaler_row`: the summed squares divided by the number of sequences.

        Wanda's metric is |W| * sqrt(scaler_row) = |W| * ||X_j|| / sqrt(nsequences): a per-layer
        constant away from |W| * ||X_j||, so the per-row ranking (and the mask) is the same.
        """
        return self.sum_sq / self.nsequences

    def entropy(self) -> torch.Tensor:
        """H_j = -sum_k p_jk ln p_jk of channel j's K-bin histogram (natural log, 0 ln 0 = 0)."""
        if self.hist is None:
            raise ValueError("entropy requested but the histogram was not accumulated")
        counts = self.hist.to(torch.float64)
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
        return -plogp.sum(dim=1)


# float64 temporaries of 1 MiB stay in a CPU core's L2 cache (measured: 1.8x faster than 2 MiB chunks);
# on a GPU, chunks only add kernel launches.
_HISTOGRAM_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_HISTOGRAM_CHUNK_ELEMENTS_OTHER = 1 << 25
# A bincount writes its whole output (C x K counts) however few indices it gets, so indices are
# pooled across batches until they outnumber the bins several times over, within a memory cap.
_PENDING_PER_BIN = 4
_PENDING_MIN_ELEMENTS = 1 << 22
_PENDING_MAX_ELEMENTS = 1 << 25  # 128 MiB of int32 indices
# The compiled CPU path may hold batches that will not change (the driver's replay) and count them
# together: at most this many values per call, so a layer's few calls cost little to hand to threads.
_HELD_BATCHES_MAX_ELEMENTS = 1 << 26


class ScratchPool:
    """Scratch buffers handed from one accumulator to the next (the driver keeps one per prune).

    A fresh buffer costs a page fault per 4 KiB page on its first write; on a virtual machine the
    bin-index buffers alone were measured at ten times the cost of the writes themselves (0.27 s of
    a SmolLM2 block's 0.9 s of E-Sparse work). Buffers given back are reused as they are.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D buffer of at least `numel` elements (its contents are garbage)."""
        fitting = [i for i, buffer in enumerate(self._free)
                   if buffer.dtype == dtype and buffer.device == device and buffer.numel() >= numel]
        if fitting:
            return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, buffer: torch.Tensor) -> None:
        self._free.append(buffer)


def bin_index_dtype(channels: int, bins: int) -> torch.dtype:
    """int32 flat bin indices when they fit (a third less bincount time), else int64."""
    return torch.int32 if channels * bins < 2**31 else torch.int64


def _histogram_chunk_rows(channels: int, device: torch.device) -> int:
    return max(1, _HISTOGRAM_CHUNK_ELEMENTS.get(device.type, _HISTOGRAM_CHUNK_ELEMENTS_OTHER) // channels)


def histogram_scratch_elements(channels: int, device: torch.device) -> int:
    """Size of the float64 scratch `channel_bin_index` needs for any number of tokens."""
    return _histogram_chunk_rows(channels, device) * channels


def safe_bin_width(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin width (hi - lo) / K per channel, infinite for a constant channel (w = 0): x - lo = 0
    there, and 0 / inf sends every value to bin 0."""
    width = (hi - lo) / bins
    return torch.where(width > 0, width, torch.full_like(width, float("inf")))


def channel_bin_index(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int,
                      out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Flat bin index `j * K + k` of every value of `x` (tokens x channels), 1-D of `bin_index_dtype`,
    written to `out` when given. `scratch` (1-D float64 of `histogram_scratch_elements`, or at least
    all of `x`) holds the positions of one chunk of tokens; without it one is allocated.

    Bin k covers [lo + k w, lo + (k+1) w) with w = (hi - lo) / K, computed in float64 as
    floor((x - lo) / w); the maximum lands in the last bin, like torch.histc. Values outside the
    range (never, when the range came from the same data) are clamped into the edge bins. A constant
    channel (w = 0) has all its values in bin 0.
    """
    channels = x.shape[-1]
    flat = x.reshape(-1, channels)
    safe_width = safe_bin_width(lo, hi, bins)
    index_dtype = bin_index_dtype(channels, bins)
    offset = torch.arange(channels, device=x.device, dtype=index_dtype) * bins
    if out is None:
        out = torch.empty(flat.numel(), dtype=index_dtype, device=x.device)
    if out.shape != (flat.numel(),) or out.dtype != index_dtype:
        raise ValueError(f"out must be a 1-D {index_dtype} tensor of {flat.numel()} elements")
    index = out.view(flat.shape)
    rows = min(_histogram_chunk_rows(channels, x.device), flat.shape[0])
    if scratch is None:
        scratch = torch.empty(rows * channels, dtype=torch.float64, device=x.device)
    if scratch.dtype != torch.float64 or scratch.dim() != 1 or scratch.numel() < rows * channels:
        raise ValueError(f"scratch must be a 1-D float64 tensor of at least {rows * channels} elements")
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        # float32 - float64 into float64 scratch (the input is never modified). After the clamp the
        # quotient is >= 0, where truncation to an integer (copy_ into the index dtype) is the floor.
        position = scratch[:chunk.numel()].view(chunk.shape)
        torch.sub(chunk, lo, out=position).div_(safe_width).clamp_(0, bins - 1)
        index[start:start + rows].copy_(position).add_(offset)
    return out


def channel_histogram(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-channel K-bin histogram of `x` (tokens x channels) over [lo_j, hi_j] (int64, C x K);
    bins as in `channel_bin_index`."""
    channels = x.shape[-1]
    counts = torch.bincount(channel_bin_index(x, lo, hi, bins), minlength=channels * bins)
    return counts.reshape(channels, bins)


class StatsAccumulator:
    """Accumulates `LayerStats` for one linear layer from batches of its inputs."""

    def __init__(self, in_features: int, needs: frozenset[str], bins: int = 0,
                 device: torch.device | str = "cpu", scratch: ScratchPool | None = None):
        unknown = set(needs) - KNOWN_NEEDS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}")
        if NEED_ENTROPY in needs and bins < 2:
            raise ValueError(f"entropy needs at least 2 histogram bins, got {bins}")
        self.in_features = in_features
        self.needs = frozenset(needs)
        self.bins = bins
        self.device = torch.device(device)
        self.ntokens = 0
        self.nsequences = 0
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=self.device)
        self.lo = self.hi = self.hist = self.hessian = None
        if NEED_ENTROPY in needs:
            self.lo = torch.full((in_features,), float("inf"), dtype=torch.float64, device=self.device)
            self.hi = torch.full((in_features,), float("-inf"), dtype=torch.float64, device=self.device)
            self.hist = torch.zeros(in_features, bins, dtype=torch.int64, device=self.device)
        if NEED_HESSIAN in needs:
            self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device)
        self._range_tokens = 0
        self._range_is_finite = False  # checked once, before the first histogram batch
        self._pending_bins: torch.Tensor | None = None  # taken from the pool on first use
        self._position_scratch: torch.Tensor | None = None  # likewise
        self._scratch = scratch if scratch is not None else ScratchPool()
        self._pending_elements = 0
        # CPU with numba: one row of counts per thread, summed in finalize (esparse.cpu_kernels)
        self._compiled = self.device.type == "cpu" and cpu_kernels.AVAILABLE and bins <= cpu_kernels.MAX_BINS
        self._thread_counts: torch.Tensor | None = None
        self._safe_width: torch.Tensor | None = None
        self._held_batches: list[torch.Tensor] = []
        self._held_elements = 0
        self._pending_limit = min(max(_PENDING_PER_BIN * in_features * max(bins, 1), _PENDING_MIN_ELEMENTS),
                                  _PENDING_MAX_ELEMENTS)

    @property
    def needs_range_pass(self) -> bool:
        return NEED_ENTROPY in self.needs

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        return x.detach().reshape(-1, self.in_features).to(self.device)

    def observe_range(self, x: torch.Tensor) -> None:
        """First pass (entropy only): exact per-channel min and max."""
        flat = self._flatten(x)
        # amin and amax separately: several times faster than aminmax(dim=0) on CPU, same values
        torch.minimum(self.lo, flat.amin(dim=0).to(torch.float64), out=self.lo)
        torch.maximum(self.hi, flat.amax(dim=0).to(torch.float64), out=self.hi)
        self._range_tokens += flat.shape[0]

    def observe(self, x: torch.Tensor, sequences: int, unchanged_until_finalize: bool = False) -> None:
        """Main pass: summed squares, histogram over the fixed range, and the Hessian X^T X.

        unchanged_until_finalize: the caller guarantees that `x` is not written to before `finalize`
        (the driver's replay of held block inputs), so the compiled CPU path may hold it and count it
        later together with other batches; otherwise it is counted now.
        """
        flat = self._flatten(x)
        self.ntokens += flat.shape[0]
        self.nsequences += sequences
        self.sum_sq += flat.to(torch.float64).square().sum(dim=0)
        if self.hist is not None:
            if self._range_tokens == 0:
                raise RuntimeError("entropy histogram needs observe_range() over all inputs first")
            if not self._range_is_finite:
                finite = torch.isfinite(self.lo) & torch.isfinite(self.hi)
                if not bool(finite.all()):
                    raise ValueError(f"calibration inputs of {int((~finite).sum())} of {self.in_features} channels "
                                     "contain NaN or infinite values; the entropy histogram needs finite inputs")
                self._range_is_finite = True
            if self._compiled:
                self._add_compiled(flat, unchanged_until_finalize)
            else:
                self._add_to_histogram(flat)
        if self.hessian is not None:
            # One float32 GEMM per batch, summed in float64 across batches.
            as32 = flat.to(torch.float32)
            self.hessian += (as32.T @ as32).to(torch.float64)

    def _add_compiled(self, flat: torch.Tensor, may_hold: bool) -> None:
        """Count the batch now, or (`may_hold`) hold it, a reference without a copy, and count the
        held batches together once they reach the limit (esparse.cpu_kernels.count_into says why)."""
        if self._thread_counts is None:
            self._thread_counts = torch.zeros(max(1, torch.get_num_threads()), self.hist.numel(), dtype=torch.int64)
            self._safe_width = safe_bin_width(self.lo, self.hi, self.bins)
        if not may_hold:
            cpu_kernels.count_into(self._thread_counts, [flat], self.lo, self._safe_width, self.bins)
            return
        if self._held_elements + flat.numel() > _HELD_BATCHES_MAX_ELEMENTS:
            self._count_held_batches()
        self._held_batches.append(flat)
        self._held_elements += flat.numel()

    def _count_held_batches(self) -> None:
        if self._held_batches:
            cpu_kernels.count_into(self._thread_counts, self._held_batches, self.lo, self._safe_width, self.bins)
        self._held_batches = []
        self._held_elements = 0

    def _add_to_histogram(self, flat: torch.Tensor) -> None:
        """Bin the batch's values into the pending index buffer; count the buffer once it is full."""
        size = flat.numel()
        if size > self._pending_limit:  # larger than the whole buffer: count on its own
            self._count(channel_bin_index(flat, self.lo, self.hi, self.bins))
            return
        if self._pending_elements + size > self._pending_limit:
            self._count_pending_bins()
        if self._pending_bins is None:
            self._pending_bins = self._scratch.take(self._pending_limit, bin_index_dtype(self.in_features, self.bins),
                                                    self.device)
            self._position_scratch = self._scratch.take(histogram_scratch_elements(self.in_features, self.device),
                                                        torch.float64, self.device)
        start = self._pending_elements
        channel_bin_index(flat, self.lo, self.hi, self.bins, out=self._pending_bins[start:start + size],
                          scratch=self._position_scratch)
        self._pending_elements += size

    def _count(self, index: torch.Tensor) -> None:
        self.hist += torch.bincount(index, minlength=self.hist.numel()).reshape(self.hist.shape)

    def _count_pending_bins(self) -> None:
        if self._pending_elements:
            self._count(self._pending_bins[:self._pending_elements])
        self._pending_elements = 0

    def finalize(self) -> LayerStats:
        self._count_pending_bins()
        self._count_held_batches()
        if self._thread_counts is not None:
            self.hist += self._thread_counts.sum(dim=0).reshape(self.hist.shape)
            self._thread_counts = None
        if self._pending_bins is not None:
            self._scratch.give(self._pending_bins)
            self._scratch.give(self._position_scratch)
            self._pending_bins = self._position_scratch = None
        if self.ntokens == 0:
            raise RuntimeError("no calibration inputs were observed for this layer")
        if self.hist is not None and self._range_tokens != self.ntokens:
            raise RuntimeError(
                f"range pass saw {self._range_tokens} tokens but the main pass saw {self.ntokens}: "
                "both passes must cover the same calibration inputs"
            )
        return LayerStats(ntokens=self.ntokens, nsequences=self.nsequences, sum_sq=self.sum_sq,
                          hist=self.hist, lo=self.lo, hi=self.hi, hessian=self.hessian)
