"""GPTQ: quantize column by column, feeding each column's rounding error back into the
columns not yet quantized, weighted by the inverse Hessian of the layer-wise objective
``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, ``H = XᵀX`` (Frantar et al., 2023).

With ``U`` the upper Cholesky factor of ``(H + λI)⁻¹``, column ``c`` (in processing order) gets

    q_c = quant(w_c);   e_c = (w_c − q_c) / U_cc;   W[:, c+1:] −= e_c ⊗ U[c, c+1:]

applied lazily: inside a block of ``block_size`` columns the rank-1 updates touch only the
block, and the block's errors reach the columns after it in one matrix product.

Choices (see :class:`GPTQConfig`):

* act-order processes columns by decreasing ``H_cc``; group parameters are then "static",
  computed on the original column order before any update, so the stored format keeps plain
  contiguous groups and needs no per-column group index;
* damping ``λ = damp · mean diag(H)``, the mean taken over the live columns (so dropping a
  column is exactly the same as deleting it); a failed Cholesky retries with 10× the damping;
* dead input channels (``H_cc = 0``) and exempt columns are dropped: ``H[c, :] = H[:, c] = 0``,
  ``H_cc = 1``, ``W[:, c] = 0``. They quantize to exactly zero with zero error and, being
  decoupled in ``H``, neither send nor receive updates. Their codes are the zero point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qe.errors import ConfigError, DataError, NumericalError
from qe.gram import (
    all_finite,
    factor_damped,
    factor_damped_over,
    invert_lower_in_place,
    overwritable,
    permute_symmetric_in_place,
)
from qe.quantized import QuantizedWeight
from qe.quantizers.base import Quantizer
from qe.quantizers.grid import (
    check_finite,
    check_group_size,
    check_weight_bits,
    column_groups,
    dequantize_codes,
    group_params,
    num_groups,
    quantize_to_codes,
)
from qe.quantizers.rtn import CLIP_GRID, require_weight_bits


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # relative to the mean Hessian diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = True  # process columns by decreasing Hessian diagonal
    # MSE clip search for the grid parameters (over rtn.CLIP_GRID). On by default: measured on the
    # embedded default at W4A16 per channel, held-out perplexity 14.66 with it, 15.32 without.
    clip: bool = True
    static_groups: bool = True  # group parameters from the original weight, before any update

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ConfigError(f"damp={self.damp} must be positive (a fraction of the mean Hessian diagonal), e.g. 0.01")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be at least 1, e.g. 128")
        if self.act_order and not self.static_groups:
            raise ConfigError(
                "act_order=true with static_groups=false needs a per-column group index that the stored "
                "format lacks: keep static_groups=true or set act_order=false"
            )


class _InverseCholesky:
    """``U`` upper triangular with ``Uᵀ U = (H + damp·mean_diag·I)⁻¹`` (``H`` in processing
    order), held as ``M⁻¹`` and read one block at a time; the damping rises ×10 while Cholesky
    fails.

    Without forming the inverse: with ``J`` the order reversal, ``J H J = M Mᵀ`` (``M`` lower)
    gives ``H = R Rᵀ`` with ``R = J M J`` upper triangular, so ``H⁻¹ = R⁻ᵀ R⁻¹`` and
    ``U = R⁻¹ = J M⁻¹ J``. ``source`` is either a function that builds ``J H J`` (once, or
    again on a retry), factored and inverted in place: the one ``d × d`` matrix GPTQ adds to
    the Hessian it is given; or ``J H J`` itself (the caller's Hessian, reordered where it
    lies), factored and inverted in its own memory, so GPTQ adds none. ``U``'s blocks are
    flipped out of ``M⁻¹`` as they are read.
    """

    def __init__(self, source: Callable[[], torch.Tensor] | torch.Tensor, damp: float, mean_diag: float,
                 layer_name: str):
        where = f"GPTQ on {layer_name}" if layer_name else "GPTQ"

        def warn(lam: float, following: float) -> None:
            warnings.warn(f"{where}: the Hessian with damping {lam:g} is not positive definite; retrying with "
                          f"damping {following:g}", RuntimeWarning, stacklevel=4)

        if isinstance(source, torch.Tensor):
            M, _ = factor_damped_over(source, damp, mean_diag, where, on_retry=warn)
        else:
            M, _ = factor_damped(source, damp, mean_diag, where, on_retry=warn)
        self.M_inv = invert_lower_in_place(M)
        if not all_finite(self.M_inv):
            raise NumericalError(f"{where}: the damped Hessian's inverse overflows: check the calibration data or use rtn")
        self.d = M.shape[0]

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """``U[r0:r1, c0:c1]`` (a copy)."""
        d = self.d
        return self.M_inv[d - r1 : d - r0, d - c1 : d - c0].flip(0, 1)


def _block_bounds(d_in: int, block_size: int, group_size: int, dynamic_groups: bool) -> list[int]:
    """Block boundaries; with dynamic groups every group starts a block, so its parameters are
    computed from fully updated columns."""
    bounds = set(range(0, d_in, block_size))
    if dynamic_groups:
        bounds |= set(range(0, d_in, group_size))
    return sorted(bounds) + [d_in]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    exempt: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = True,
    clip_grid: tuple[float, ...] | None = None,
    layer_name: str = "",
    overwrite_hessian: bool = False,
) -> QuantizedWeight:
    """GPTQ of ``weight`` ``(d_out, d_in)`` with ``hessian`` ``(d_in, d_in)`` (any positive
    multiple of XᵀX). With ``overwrite_hessian``, a contiguous float64 ``hessian`` on the CPU
    becomes GPTQ's working matrix (reordered, factored and inverted where it lies) instead of
    being copied (elsewhere it is still copied): the caller must not read it afterwards. The
    codes are the same either way."""
    d_out, d_in = weight.shape
    check_weight_bits(bits, layer_name)
    check_group_size(d_in, group_size, layer_name)
    if tuple(hessian.shape) != (d_in, d_in):
        raise DataError(f"the Hessian of {layer_name or 'the layer'} is {tuple(hessian.shape)}, expected ({d_in}, {d_in})")
    if exempt is not None and tuple(exempt.shape) != (d_in,):
        raise ConfigError(f"the exempt mask of {layer_name or 'the layer'} has shape {tuple(exempt.shape)}, expected ({d_in},)")
    check_finite(weight, "weight", layer_name)
    check_finite(hessian, "Hessian", layer_name)
    dynamic_groups = group_size > 0 and not static_groups
    if dynamic_groups and act_order:
        raise ConfigError("GPTQ act-order needs static groups: the stored format has no per-column group index")

    # Columns of W are rows of Wt, so each column's work reads and writes contiguous memory.
    Wt = weight.detach().to(torch.float64).T.contiguous()  # (d_in, d_out), updated in place
    hessian = hessian.detach().to(device=Wt.device, dtype=torch.float64)  # no copy when it is already
    diag = torch.diagonal(hessian)
    dropped = diag == 0  # dead input channels
    if exempt is not None:
        exempt = exempt.to(device=Wt.device, dtype=torch.bool)
        dropped |= exempt
    live = ~dropped
    if not bool(live.any()):
        warnings.warn(f"GPTQ on {layer_name or 'a layer'}: no input channel is live (all exempt or never active in the "
                      "calibration data); its weight quantizes to zero", RuntimeWarning, stacklevel=2)
    mean_diag = float(diag[live].mean()) if bool(live.any()) else 1.0
    Wt[dropped] = 0

    n_g = num_groups(d_in, group_size)
    g_of = column_groups(d_in, group_size, Wt.device)  # (d_in,) group of each original column
    if dynamic_groups:
        scales = torch.zeros(d_out, n_g, device=Wt.device)
        zeros = torch.zeros(d_out, n_g, device=Wt.device)
    else:  # per channel, or static groups: parameters from the weight before any update
        scales, zeros = group_params(Wt.T.float(), bits, symmetric, group_size, clip_grid)

    if act_order:  # dropped columns sort by the H_cc = 1 they get below
        perm = torch.argsort(diag.masked_fill(dropped, 1.0), descending=True, stable=True)
    else:
        perm = torch.arange(d_in, device=Wt.device)
    Wt = Wt.index_select(0, perm)
    # The Hessian in processing order, reversed (what the factorization wants), in one copy or
    # where it lies; dropped columns decoupled: H[c, :] = H[:, c] = 0, H_cc = 1.
    rev = perm.flip(0)
    gone = dropped[rev]
    del diag  # a view of the Hessian, which may be overwritten from here on

    def decouple(H_rev: torch.Tensor) -> torch.Tensor:
        H_rev[gone, :] = 0
        H_rev[:, gone] = 0
        H_rev.diagonal()[gone] = 1
        return H_rev

    def reversed_hessian() -> torch.Tensor:
        return decouple(hessian[rev[:, None], rev])

    if overwrite_hessian and overwritable(hessian):
        source: Callable[[], torch.Tensor] | torch.Tensor = decouple(permute_symmetric_in_place(hessian, rev))
    else:
        source = reversed_hessian
    U = _InverseCholesky(source, damp, mean_diag, layer_name)  # upper, permuted order
    column_group = g_of[perm]  # the group of each processed column
    codes_t = torch.zeros(d_in, d_out, device=Wt.device)  # codes, transposed like Wt

    bounds = _block_bounds(d_in, block_size, group_size, dynamic_groups)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if dynamic_groups and i1 % group_size == 0:  # a group starts: parameters from its current columns
            g = i1 // group_size
            s, z = group_params(Wt[i1 : i1 + group_size].T.float(), bits, symmetric, 0, clip_grid)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        # (B, d_out) grid parameters of the block's columns, gathered per block: for all
        # columns at once they would be two more weight-sized matrices
        block_scale = scales.T.index_select(0, column_group[i1:i2])
        block_zero = zeros.T.index_select(0, column_group[i1:i2])
        W1 = Wt[i1:i2]  # (B, d_out): the block's columns as left by the earlier blocks' updates
        Err1 = torch.zeros_like(W1)  # (B, d_out) scaled errors e_c
        U1 = U.block(i1, i2, i1, i2)
        for i in range(i2 - i1):
            # Column i after the rank-1 updates of the block's earlier columns, summed in one
            # matrix-vector product: the same as W1[:, i+1:] -= e_i ⊗ U1[i, i+1:] done eagerly,
            # but one small BLAS call per column instead of a rank-1 update of the whole block.
            w = torch.addmv(W1[i], Err1[:i].T, U1[:i, i], alpha=-1)
            s, z = block_scale[i], block_zero[i]
            c = quantize_to_codes(w.float(), s, z, bits)  # the float32 grid, exactly as RTN rounds
            codes_t[i1 + i] = c
            Err1[i] = (w - dequantize_codes(c, s, z).double()) / U1[i, i]
        Wt[i2:] -= U.block(i1, i2, i2, d_in).T @ Err1  # lazy update of the columns after the block

    codes = codes_t.index_select(0, torch.argsort(perm)).T
    check_finite(codes, "GPTQ codes", layer_name)  # a NaN would be cast silently to code 0
    if exempt is not None:
        codes[:, exempt] = zeros[:, g_of[exempt]]
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales, zeros, bits, group_size, symmetric, exempt)


class GPTQ(Quantizer):
    """GPTQ: Hessian-weighted error feedback (act-order, static groups, lazy block updates).

    ``quantize`` and ``quantize_spending_hessian`` share one implementation, so a subclass
    that changes ``quantize`` must change both."""

    name = "gptq"
    Config = GPTQConfig
    needs_hessian = True

    def quantize(self, weight, setting, *, hessian=None, exempt=None, layer_name="") -> QuantizedWeight:
        return self._quantize(weight, setting, hessian, exempt, layer_name, overwrite_hessian=False)

    def quantize_spending_hessian(self, weight, setting, *, hessian=None, exempt=None, layer_name="") -> QuantizedWeight:
        return self._quantize(weight, setting, hessian, exempt, layer_name, overwrite_hessian=True)

    def _quantize(self, weight, setting, hessian, exempt, layer_name, *, overwrite_hessian: bool) -> QuantizedWeight:
        require_weight_bits(setting, layer_name)
        if hessian is None:
            where = f" for {layer_name}" if layer_name else ""
            raise ConfigError(f"GPTQ needs calibration data: no Hessian (XᵀX) was given{where}; give calibration samples or use rtn")
        cfg = self.config
        return gptq_quantize(
            weight, hessian, setting.w_bits, setting.group_size, setting.symmetric, exempt=exempt,
            damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups,
            clip_grid=CLIP_GRID if cfg.clip else None, layer_name=layer_name, overwrite_hessian=overwrite_hessian,
        )
