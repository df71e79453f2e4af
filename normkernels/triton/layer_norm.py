"""Layer norm and RMS norm, Triton: forward and backward for rows of any length.

    forward : one program per row; a row up to MAX_ROW_BLOCK elements lives in registers (one
              read), a longer row loops over blocks (two-pass statistics, then normalize).
    backward: each program owns a contiguous run of rows: dx row by row, dweight/dbias
              accumulated in fp32 into the program's own row of partials (no atomics), then
              summed over programs in a fixed order (bitwise reproducible).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _ops  # (names looked up at call time: _ops imports this package as it loads)
from . import heuristics as H
from .checks import check_dy, check_param, check_rows, stats_arg
from .common import flat, plus_eps, split_eps, sum_rows, zero_lone_values_grad
from .launch import acc_dtype, count_launch, tl_acc


@triton.jit
def _zero_scalar(ACC: tl.constexpr):
    return tl.sum(tl.zeros([1], ACC), axis=0)


@triton.jit
def layer_norm_fwd_kernel(X, Y, W, B, Mean, Rstd, N, eps_hi, eps_lo, RMS: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
                          SINGLE: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * N
    y_row = Y + row * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
        if RMS:
            mean = _zero_scalar(ACC)
        else:
            mean = tl.sum(x, axis=0) / N
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(plus_eps(tl.sum(d * d, axis=0) / N, eps_hi, eps_lo))
        y = d * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        mean = _zero_scalar(ACC)
        if not RMS:
            acc = tl.zeros([BLOCK_N], ACC)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                acc += tl.load(x_row + cols, mask=cols < N, other=0.0).to(ACC)
            mean = tl.sum(acc, axis=0) / N
        acc2 = tl.zeros([BLOCK_N], ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            d = tl.where(mask, tl.load(x_row + cols, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            acc2 += d * d
        rstd = 1.0 / tl.sqrt(plus_eps(tl.sum(acc2, axis=0) / N, eps_hi, eps_lo))
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = (tl.load(x_row + cols, mask=mask, other=0.0).to(ACC) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(DY, X, W, Mean, Rstd, DX, DWPart, DBPart, M, N, rows_per_program,
                          RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DX: tl.constexpr,
                          HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_N: tl.constexpr,
                          SINGLE: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row0 = pid * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, M)
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        dw_acc = tl.zeros([BLOCK_N], ACC)
        db_acc = tl.zeros([BLOCK_N], ACC)
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        for row in range(row0, row1):
            x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(Rstd + row)
            if RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
            if HAS_W:
                g = dy * w
            else:
                g = dy
            if HAS_DX:
                c1 = tl.sum(g * xhat, axis=0) / N
                if RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - xhat * c1 - tl.sum(g, axis=0) / N) * rstd
                tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if HAS_DW:
            tl.store(DWPart + pid * N + cols, dw_acc, mask=mask)
        if HAS_DB:
            tl.store(DBPart + pid * N + cols, db_acc, mask=mask)
    else:
        for row in range(row0, row1):
            rstd = tl.load(Rstd + row)
            mean = _zero_scalar(ACC)
            if not RMS:
                mean = tl.load(Mean + row)
            s_gx = tl.zeros([BLOCK_N], ACC)
            s_g = tl.zeros([BLOCK_N], ACC)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
                dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                s_gx += g * xhat
                s_g += g
                if HAS_DW:
                    p = DWPart + pid * N + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_DB:
                    p = DBPart + pid * N + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dy, mask=mask)
            if HAS_DX:
                c1 = tl.sum(s_gx, axis=0) / N
                c2 = tl.sum(s_g, axis=0) / N
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = cols < N
                    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(ACC)
                    dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(ACC)
                    xhat = (x - mean) * rstd
                    g = dy
                    if HAS_W:
                        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                    if RMS:
                        dx = (g - xhat * c1) * rstd
                    else:
                        dx = (g - xhat * c1 - c2) * rstd
                    tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, normalized_ndim: int):
    """(rows, values a row): the leading dims' product and the normalized dims'."""
    lead = x.dim() - normalized_ndim
    return math.prod(x.shape[:lead]), math.prod(x.shape[lead:])


def layer_norm_fwd(x, normalized_ndim, weight, bias, eps, rms):
    check_rows(x, normalized_ndim, "layer_norm")
    pshape = x.shape[x.dim() - normalized_ndim:]
    check_param(weight, pshape, x, "layer_norm", "weight")
    check_param(bias, pshape, x, "layer_norm", "bias")
    xc = x.contiguous()
    M, N = _rows(x, normalized_ndim)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sdt = acc_dtype(x)
    sshape = _ops.layer_norm_stats_shape(x, normalized_ndim)
    mean = torch.empty((0,) if rms else sshape, dtype=sdt, device=x.device)
    rstd = torch.empty(sshape, dtype=sdt, device=x.device)
    if N == 0:  # rows of no values: torch's statistics (mean 0, rstd nan)
        mean.zero_()
        rstd.fill_(math.nan)
    elif M > 0:
        block = H.row_block(N)
        w, b = flat(weight), flat(bias)
        count_launch("layer_norm_fwd")
        layer_norm_fwd_kernel[(M,)](
            xc, y, w, b, mean if not rms else rstd, rstd, N, *split_eps(eps), RMS=rms,
            HAS_W=w is not None, HAS_B=b is not None, BLOCK_N=block, SINGLE=N <= block,
            ACC=tl_acc(x), num_warps=H.row_warps(block))
    return y, mean, rstd


def layer_norm_bwd(dy, x, mean, rstd, weight, normalized_ndim, rms, output_mask):
    check_rows(x, normalized_ndim, "layer_norm_bwd")
    check_dy(dy, x, "layer_norm_bwd")
    pshape = x.shape[x.dim() - normalized_ndim:]
    check_param(weight, pshape, x, "layer_norm_bwd", "weight")
    M, N = _rows(x, normalized_ndim)
    if not rms:  # RMS norm has no mean (the forward returns an empty one)
        mean = stats_arg(mean, M, x, "layer_norm_bwd", "mean")
    rstd = stats_arg(rstd, M, x, "layer_norm_bwd", "rstd")
    xc, dyc = x.contiguous(), dy.contiguous()
    sdt = acc_dtype(x)
    want_dx = bool(output_mask[0])
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = bool(output_mask[2])
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_dx else x.new_empty((0,))
    P = H.programs_for_rows(M, x.device)
    block = H.row_block(N)
    launch = M > 0 and N > 0 and (want_dx or want_dw or want_db)
    # Rows that fit one block store every program's partials whole; longer rows add into them.
    alloc = torch.empty if launch and N <= block else torch.zeros
    dw_part = alloc((P, N), dtype=sdt, device=x.device) if want_dw else None
    db_part = alloc((P, N), dtype=sdt, device=x.device) if want_db else None
    if launch:
        count_launch("layer_norm_bwd")
        layer_norm_bwd_kernel[(P,)](
            dyc, xc, flat(weight),
            mean if not rms else rstd, rstd, dx if want_dx else None, dw_part, db_part, M, N,
            H.cdiv(M, P), RMS=rms, HAS_W=weight is not None, HAS_DX=want_dx,
            HAS_DW=want_dw, HAS_DB=want_db, BLOCK_N=block, SINGLE=N <= block, ACC=tl_acc(x),
            num_warps=H.row_warps(block))
        if want_dx and N == 1 and not rms:
            zero_lone_values_grad(dx)
    pdtype = weight.dtype if weight is not None else x.dtype
    dw = sum_rows(dw_part, pdtype).view(pshape) if want_dw else x.new_empty((0,))
    db = sum_rows(db_part, pdtype).view(pshape) if want_db else x.new_empty((0,))
    return dx, dw, db
