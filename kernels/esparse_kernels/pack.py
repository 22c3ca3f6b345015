"""Packed 2:4 format: kept values plus densely packed 2-bit in-group indices, optional input permutation.

Layout of one packed linear (out_features N, in_features K, K % 4 == 0), in the PERMUTED column order
(column j of the permuted weight is original column perm[j]; see interfaces.md):

- ``values``: [N, K/2], the weight's dtype. Group g (permuted columns 4g..4g+3) keeps two entries,
  stored at values[:, 2g] and values[:, 2g+1] in increasing column order.
- ``meta``: int32 [N, ceil(K/32)]. Group g owns the 4 bits at bit 4*(g % 8) of word g // 8:
  the low 2 bits are the in-group position of values[:, 2g], the high 2 bits that of values[:, 2g+1].
  Two bits per kept value: values + meta = 0.5625 of the dense 16-bit bytes.
- ``perm``: int32 [K] or None (identity).

Groups with fewer than two kept entries are padded with zero values at the lowest free positions, so
the positions of a group are always distinct and increasing (a canonical form: packing is a function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esparse.errors import ConfigError

GROUP = 4
KEPT = 2
GROUPS_PER_WORD = 8


@dataclass(frozen=True)
class Packed24:
    """A 2:4-packed weight; ``shape`` is the dense (out_features, in_features)."""

    values: torch.Tensor
    meta: torch.Tensor
    perm: torch.Tensor | None
    shape: tuple[int, int]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self, include_perm: bool = True) -> int:
        total = self.values.numel() * self.values.element_size() + self.meta.numel() * 4
        if include_perm and self.perm is not None:
            total += self.perm.numel() * 4
        return total

    def to(self, device: torch.device | str) -> "Packed24":
        return Packed24(
            values=self.values.to(device),
            meta=self.meta.to(device),
            perm=None if self.perm is None else self.perm.to(device),
            shape=self.shape,
        )

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}values": self.values.contiguous(), f"{prefix}meta": self.meta.contiguous()}
        if self.perm is not None:
            out[f"{prefix}perm"] = self.perm.contiguous()
        out[f"{prefix}shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "Packed24":
        try:
            values = tensors[f"{prefix}values"]
            meta = tensors[f"{prefix}meta"]
            shape_t = tensors[f"{prefix}shape"]
        except KeyError as exc:
            raise ConfigError(f"packed tensors lack key {exc.args[0]!r}") from exc
        shape = (int(shape_t[0]), int(shape_t[1]))
        packed = cls(values=values, meta=meta, perm=tensors.get(f"{prefix}perm"), shape=shape)
        _check_packed(packed)
        return packed


def meta_words(in_features: int) -> int:
    groups = in_features // GROUP
    return (groups + GROUPS_PER_WORD - 1) // GROUPS_PER_WORD


def _check_packed(packed: Packed24) -> None:
    n, k = packed.shape
    if packed.values.shape != (n, k // 2):
        raise ConfigError(f"packed values shape {tuple(packed.values.shape)} != {(n, k // 2)}")
    if packed.meta.shape != (n, meta_words(k)) or packed.meta.dtype != torch.int32:
        raise ConfigError(
            f"packed meta must be int32 {(n, meta_words(k))}, got {packed.meta.dtype} {tuple(packed.meta.shape)}"
        )
    if packed.perm is not None and (packed.perm.shape != (k,) or packed.perm.dtype != torch.int32):
        raise ConfigError(f"packed perm must be int32 [{k}], got {packed.perm.dtype} {tuple(packed.perm.shape)}")


def check_perm(perm: torch.Tensor, in_features: int) -> torch.Tensor:
    """Return perm as int64 after checking it is a permutation of range(in_features)."""
    if perm.dim() != 1 or perm.numel() != in_features:
        raise ConfigError(f"perm must have shape [{in_features}], got {tuple(perm.shape)}")
    perm64 = perm.to(torch.int64).cpu()
    seen = torch.zeros(in_features, dtype=torch.bool)
    if perm64.min() < 0 or perm64.max() >= in_features:
        raise ConfigError(f"perm values must lie in [0, {in_features}), got [{int(perm64.min())}, {int(perm64.max())}]")
    seen[perm64] = True
    if not bool(seen.all()):
        raise ConfigError("perm is not a permutation: some input columns are missing")
    return perm.to(torch.int64)


def is_24(mask: torch.Tensor, perm: torch.Tensor | None = None) -> bool:
    """True when every row of mask[:, perm] keeps at most 2 of each 4 consecutive columns."""
    if mask.dim() != 2 or mask.shape[1] % GROUP != 0:
        return False
    m = mask if perm is None else mask[:, perm.to(torch.int64).to(mask.device)]
    counts = m.reshape(m.shape[0], -1, GROUP).sum(dim=-1)
    return bool((counts <= KEPT).all())


def pack_24(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> Packed24:
    """Pack (weight * mask)[:, perm] into the 2:4 format. mask=None keeps the nonzeros of weight.

    Raises ConfigError when the (permuted) mask keeps more than 2 of some group of 4.
    """
    if weight.dim() != 2:
        raise ConfigError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % GROUP != 0:
        raise ConfigError(f"in_features={k} must be divisible by {GROUP} for 2:4 packing")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"weight dtype {weight.dtype} not supported (float16, bfloat16, float32)")
    if mask is None:
        mask = weight != 0
    elif mask.shape != weight.shape:
        raise ConfigError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    mask = mask.to(torch.bool)
    perm64 = None
    if perm is not None:
        perm64 = check_perm(perm, k).to(weight.device)
        w = weight[:, perm64]
        m = mask.to(weight.device)[:, perm64]
    else:
        w, m = weight, mask.to(weight.device)
    groups = k // GROUP
    m_g = m.reshape(n, groups, GROUP)
    counts = m_g.sum(dim=-1)
    if bool((counts > KEPT).any()):
        bad = int((counts > KEPT).sum())
        raise ConfigError(
            f"mask is not 2:4 in the {'permuted' if perm is not None else 'given'} column order: "
            f"{bad} groups of 4 keep more than 2 entries"
        )
    # Fill each group up to two slots with its lowest unkept positions: rank positions so kept ones
    # come first in column order, then unkept ones in column order, and take the first two.
    pos = torch.arange(GROUP, device=w.device)
    key = torch.where(m_g, pos, pos + GROUP)  # kept sort before unkept, ties impossible
    first_two = key.argsort(dim=-1)[..., :KEPT]  # [n, groups, 2]: kept positions, then padding
    slot = torch.arange(KEPT, device=w.device).view(1, 1, KEPT)
    is_pad = slot >= counts.unsqueeze(-1)  # slot s is padding when the group keeps fewer than s+1
    positions, sort_idx = first_two.sort(dim=-1)  # canonical: increasing in-group positions
    is_pad = is_pad.gather(-1, sort_idx)
    w_g = w.reshape(n, groups, GROUP)
    vals = w_g.gather(-1, positions)
    vals = torch.where(is_pad, torch.zeros((), dtype=vals.dtype, device=vals.device), vals)
    # masked-out entries inside kept slots cannot occur; entries kept by the mask keep their value
    values = vals.reshape(n, groups * KEPT).contiguous()
    nibble = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.int64)  # [n, groups]
    words = meta_words(k)
    padded = torch.zeros(n, words * GROUPS_PER_WORD, dtype=torch.int64, device=w.device)
    padded[:, :groups] = nibble
    shifts = (torch.arange(GROUPS_PER_WORD, device=w.device) * 4).view(1, 1, -1)
    word64 = (padded.view(n, words, GROUPS_PER_WORD) << shifts).sum(dim=-1)
    word32 = torch.where(word64 >= 2**31, word64 - 2**32, word64).to(torch.int32)
    perm32 = None if perm64 is None else perm64.to(torch.int32).contiguous()
    return Packed24(values=values, meta=word32.contiguous(), perm=perm32, shape=(n, k))


def reorder_rows(packed: Packed24, order: torch.Tensor) -> Packed24:
    """The same packed weight with its output rows in ``order`` (row i of the result is row order[i]):
    what a producer layer becomes when the permutation of the layer that reads its output is folded
    into it. Rows are independent in the 2:4 format, so values and meta rows move as they are."""
    _check_packed(packed)
    order64 = check_perm(order, packed.out_features).to(packed.values.device)
    return Packed24(packed.values[order64].contiguous(), packed.meta[order64].contiguous(), packed.perm, packed.shape)


def unpack_positions(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """In-group positions [N, K/4, 2] (int64) from the packed meta words."""
    n = meta.shape[0]
    groups = in_features // GROUP
    m64 = meta.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(GROUPS_PER_WORD, device=meta.device) * 4).view(1, 1, -1)
    nib = ((m64.unsqueeze(-1) >> shifts) & 0xF).reshape(n, -1)[:, :groups]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)


def unpack_24_permuted(packed: Packed24) -> torch.Tensor:
    """Dense masked weight in the PERMUTED column order (what the kernels multiply with x[:, perm])."""
    n, k = packed.shape
    groups = k // GROUP
    positions = unpack_positions(packed.meta, k)
    dense = torch.zeros(n, groups, GROUP, dtype=packed.values.dtype, device=packed.values.device)
    dense.scatter_(-1, positions, packed.values.reshape(n, groups, KEPT))
    return dense.reshape(n, k)


def unpack_24(packed: Packed24) -> torch.Tensor:
    """Dense masked weight in the ORIGINAL column order: exact inverse of pack_24."""
    dense_p = unpack_24_permuted(packed)
    if packed.perm is None:
        return dense_p
    out = torch.empty_like(dense_p)
    out[:, packed.perm.to(torch.int64)] = dense_p
    return out


# --------------------------------------------------------------------------------------------------
# Hopper metadata layout. CUTLASS's sm90 sparse GEMM (cutlass_sp24) reads the same 4-bit group codes
# as pack.py, but stores each row's 16-bit words (16 permuted columns, 4 groups) in the order of its
# tensor-E atom: Sm90GemmSparseConfig's TensorEAtom_16bit with tile K 128, i.e. 64 rows x 128
# columns per 1 KiB atom, ordered ((8, 2, 4) rows : (8, 1, 128) words, (2, 4) words : (64, 2) words),
# atoms along the rows first (stride 512 words), then along the columns (stride rows_aligned * 8).
# Every 32-bit pair in it holds one word of rows r and r + 8, which is what the warp-level mma.sp
# operand wants, so the CUDA decode kernel reads this layout as well: a layer holding both kernels
# then keeps one copy of the metadata (1/16 of the dense bytes), not two.

SM90_ATOM_ROWS = 64
SM90_ATOM_COLS = 128
SM90_PAD_WORD = 0x4444  # positions (0, 1) in every group: valid codes for the padding rows and columns


def sm90_meta_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """(rows, columns) the sm90 metadata covers: both rounded up to the atom."""
    return (-(-out_features // SM90_ATOM_ROWS) * SM90_ATOM_ROWS, -(-in_features // SM90_ATOM_COLS) * SM90_ATOM_COLS)


def sm90_word_index(rows: torch.Tensor, words: torch.Tensor, rows_aligned: int) -> torch.Tensor:
    """Offset, in 16-bit words, of metadata word ``words`` (columns 16*words .. 16*words + 15) of row
    ``rows`` in the sm90 layout (broadcasting integer tensors)."""
    atom_m, m = rows // SM90_ATOM_ROWS, rows % SM90_ATOM_ROWS
    atom_k, j = words // 8, words % 8
    return ((m // 8) % 2 + 2 * (j // 2) + 8 * (m % 8) + 64 * (j % 2) + 128 * (m // 16)
            + 512 * atom_m + atom_k * (rows_aligned * 8))


def _sm90_index(out_features: int, in_features: int, device) -> tuple[torch.Tensor, int, int]:
    if in_features % 16:
        raise ConfigError(f"the sm90 metadata layout needs in_features % 16 == 0, got {in_features}")
    rows_aligned, cols_aligned = sm90_meta_shape(out_features, in_features)
    rows = torch.arange(out_features, device=device).unsqueeze(1)
    words = torch.arange(in_features // 16, device=device).unsqueeze(0)
    return sm90_word_index(rows, words, rows_aligned), rows_aligned, cols_aligned


def meta_to_sm90(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """pack.py's int32 meta [N, ceil(K/32)] in the sm90 layout: uint8 [rows_aligned * cols_aligned / 8]
    on meta's device (padding words are SM90_PAD_WORD)."""
    n = meta.shape[0]
    if meta.dtype != torch.int32 or meta.shape != (n, meta_words(in_features)):
        raise ConfigError(f"meta must be int32 {(n, meta_words(in_features))}, got {meta.dtype} {tuple(meta.shape)}")
    index, rows_aligned, cols_aligned = _sm90_index(n, in_features, meta.device)
    halves = meta.contiguous().view(torch.int16)[:, : in_features // 16]
    pad = SM90_PAD_WORD - 65536 if SM90_PAD_WORD >= 32768 else SM90_PAD_WORD
    out = torch.full((rows_aligned * cols_aligned // 16,), pad, dtype=torch.int16, device=meta.device)
    out[index.reshape(-1)] = halves.reshape(-1)
    return out.view(torch.uint8)


def meta_from_sm90(meta_sm90: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of meta_to_sm90: pack.py's int32 meta [N, ceil(K/32)] (unused high halves zero)."""
    index, rows_aligned, cols_aligned = _sm90_index(out_features, in_features, meta_sm90.device)
    if meta_sm90.dtype != torch.uint8 or meta_sm90.numel() < rows_aligned * cols_aligned // 8:
        raise ConfigError(f"sm90 metadata of a {out_features}x{in_features} weight must be uint8 with at least "
                          f"{rows_aligned * cols_aligned // 8} bytes, got {meta_sm90.dtype} {meta_sm90.numel()}")
    halves = meta_sm90.contiguous().view(torch.int16)[index]
    words = 2 * meta_words(in_features)
    if words > halves.shape[1]:
        halves = torch.cat([halves, halves.new_zeros(out_features, words - halves.shape[1])], dim=1)
    return halves.contiguous().view(torch.int32)


def reference_linear(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (W*mask)^T computed in float64 on x's device; the oracle for every kernel."""
    dense = unpack_24(packed).to(device=x.device, dtype=torch.float64)
    y = x.to(torch.float64) @ dense.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def rel_frobenius_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64; NaN anywhere in out gives inf (never passes)."""
    out64 = out.detach().to(torch.float64)
    if not bool(torch.isfinite(out64).all()):
        return float("inf")
    ref64 = ref.detach().to(torch.float64)
    denom = ref64.norm()
    num = (out64 - ref64).norm()
    return float(num / denom) if float(denom) > 0 else float(num)


def random_24_weight(
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    with_perm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A random weight, a mask that is 2:4 in a random permuted order, and that permutation.

    Returns (masked weight in original order, mask in original order, perm or None).
    Values are drawn on the CPU from `generator` so results do not depend on the device.
    """
    w = torch.randn(out_features, in_features, generator=generator, dtype=torch.float32)
    groups = in_features // GROUP
    # choose 2 of 4 positions per group uniformly: argsort of random keys
    keys = torch.rand(out_features, groups, GROUP, generator=generator)
    keep_pos = keys.argsort(dim=-1)[..., :KEPT]
    mask_p = torch.zeros(out_features, groups, GROUP, dtype=torch.bool)
    mask_p.scatter_(-1, keep_pos, True)
    mask_p = mask_p.reshape(out_features, in_features)
    perm = torch.randperm(in_features, generator=generator) if with_perm else None
    if perm is None:
        mask = mask_p
    else:
        mask = torch.empty_like(mask_p)
        mask[:, perm] = mask_p
    weight = (w * mask).to(dtype)
    return weight.to(device), mask.to(device), None if perm is None else perm.to(device)
