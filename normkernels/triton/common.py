"""Triton kernels shared by the batch and group norm families (and the layer norm backward's
parameter sums).

Both families walk x as [N, C, HW] in its own memory order (NCHW or channels_last), with one
statistic per index s = n * stats_per_n + c // D: batch norm's per channel (stats_per_n = 0,
D = 1), group norm's per sample and group (stats_per_n = G, D = C / G). The kernels read the
statistics, the affine parameters and the backward's coefficients by that index themselves, so
a step launches these kernels and its family's own, with no torch ops in between to expand
per-group values to channels or cast parameters: on an H200 those glue ops (about 10 of them in
a group norm forward, 24 in its backward) cost several times the kernels' own time in launches.

    moments_merge   per-statistic (count, mean, M2) partials -> mean, var, rstd (Chan, closed form)
    norm_affine     y = (x - mean[s]) * rstd[s] * w[c] + b[c] (inference: rstd from the running
                    variance), or dx = dy * rstd[s] * w[c] + (x - mean[s]) * k_x[s] + k_0[s]
    channel_grad_sums  per-(n, c) sum(dy) and sum(dy * (x - mean[s])), split over HW
    sum_rows        column sums of [rows, n] partials, in row order (deterministic)
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import heuristics as H
from .launch import count_launch, tl_acc


@triton.jit
def chan_merge(count, mean, m2, block_count, block_mean, block_m2):
    """Chan's merge of a block's (count, mean, M2) into running ones (scalars or vectors)."""
    total = count + block_count
    delta = block_mean - mean
    mean = mean + delta * (block_count / total)
    m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
    return total, mean, m2


@triton.jit
def plus_eps(v, eps_hi, eps_lo):
    """v + eps in v's dtype. Triton passes a Python float as fp32, which would round an fp64
    eps (1e-5 by 2.5e-8 of itself: an fp64 group of two close values then missed torch's rstd
    by 1e-8 on an H200); so eps travels as two fp32 halves (split_eps), whose sum in fp64 is eps
    to 2^-48. In fp32 the low half is below hi's rounding and adds nothing."""
    return v + (tl.cast(eps_hi, v.dtype) + tl.cast(eps_lo, v.dtype))


def split_eps(eps: float) -> tuple:
    hi = struct.unpack("f", struct.pack("f", float(eps)))[0]
    return hi, float(eps) - hi


@triton.jit
def moments_merge_kernel(Parts, plane, Mean, Var, Rstd, num_parts, stride_stat, stride_part,
                         eps_hi, eps_lo, HAS_VAR: tl.constexpr, BLOCK_P: tl.constexpr):
    """Parts: the partials' counts, means and M2s, three planes of `plane` values."""
    s = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    mask = p < num_parts
    off = s * stride_stat + p * stride_part
    cnt = tl.load(Parts + off, mask=mask, other=0.0)
    mu = tl.load(Parts + plane + off, mask=mask, other=0.0)
    m2 = tl.load(Parts + 2 * plane + off, mask=mask, other=0.0)
    total = tl.sum(cnt, axis=0)
    safe = tl.where(total > 0, total, 1.0)
    mean = tl.sum(cnt * mu, axis=0) / safe
    dev = tl.where(mask, mu - mean, 0.0)
    # Chan's merge in closed form: M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)
    var = (tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / safe
    tl.store(Mean + s, mean)
    if HAS_VAR:
        tl.store(Var + s, var)
    tl.store(Rstd + s, 1.0 / tl.sqrt(plus_eps(var, eps_hi, eps_lo)))


@triton.jit
def norm_affine_kernel(X, DY, Out, Mean, Rstd, W, B, KX, K0, numel, C, HW, D, stats_per_n,
                       eps_hi, eps_lo, CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, HAS_DY: tl.constexpr, HAS_K: tl.constexpr,
                       RSTD_FROM_VAR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    if CHANNELS_LAST:
        c = (i % C).to(tl.int32)
    else:
        c = ((i // HW) % C).to(tl.int32)
    s = (i // (HW * C)) * stats_per_n + c // D
    rstd = tl.load(Rstd + s, mask=mask, other=1.0).to(ACC)
    if RSTD_FROM_VAR:  # inference: Rstd holds the running variance
        rstd = 1.0 / tl.sqrt(plus_eps(rstd, eps_hi, eps_lo))
    scale = rstd
    if HAS_W:
        scale = rstd * tl.load(W + c, mask=mask, other=0.0).to(ACC)
    if HAS_DY:
        out = tl.load(DY + i, mask=mask, other=0.0).to(ACC) * scale
        if HAS_K:
            x = tl.load(X + i, mask=mask, other=0.0).to(ACC)
            mean = tl.load(Mean + s, mask=mask, other=0.0).to(ACC)
            k_x = tl.load(KX + s, mask=mask, other=0.0)
            out += (x - mean) * k_x + tl.load(K0 + s, mask=mask, other=0.0)
    else:
        x = tl.load(X + i, mask=mask, other=0.0).to(ACC)
        out = (x - tl.load(Mean + s, mask=mask, other=0.0).to(ACC)) * scale
        if HAS_B:
            out += tl.load(B + c, mask=mask, other=0.0).to(ACC)
    tl.store(Out + i, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def channel_grad_sums_kernel(DY, X, Mean, PSumDy, PSumDyX, C, HW, D, stats_per_n, sN, sC, sHW,
                             hw_per_split, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                             ACC: tl.constexpr):
    """Grid (N, cdiv(C, BLOCK_C), splits). Writes partials [split, n, c]."""
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    split = tl.program_id(2)
    N = tl.num_programs(0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(Mean + n * stats_per_n + c // D, mask=cmask, other=0.0).to(ACC)
    s_dy = tl.zeros([BLOCK_C], ACC)
    s_dyx = tl.zeros([BLOCK_C], ACC)
    hw0 = split * hw_per_split
    hw1 = tl.minimum(hw0 + hw_per_split, HW)
    for start in range(hw0, hw1, BLOCK_K):
        hw = start + tl.arange(0, BLOCK_K)
        m = cmask[:, None] & (hw < hw1)[None, :]
        off = n * sN + c.to(tl.int64)[:, None] * sC + hw.to(tl.int64)[None, :] * sHW
        dy = tl.load(DY + off, mask=m, other=0.0).to(ACC)
        x = tl.load(X + off, mask=m, other=0.0).to(ACC)
        s_dy += tl.sum(dy, axis=1)
        s_dyx += tl.sum(dy * tl.where(m, x - mean[:, None], 0.0), axis=1)
    out = (split * N + n) * C + c
    tl.store(PSumDy + out, s_dy, mask=cmask)
    tl.store(PSumDyX + out, s_dyx, mask=cmask)


@triton.jit
def sum_rows_kernel(Parts, Out, num_rows, n, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[j] = sum over rows of Parts[row, j], a [BLOCK_R x BLOCK_N] tile at a time."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n
    acc = tl.zeros([BLOCK_N], Parts.dtype.element_ty)
    for r0 in range(0, num_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < num_rows)[:, None] & cmask[None, :]
        tile = tl.load(Parts + r.to(tl.int64)[:, None] * n + cols[None, :], mask=m, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------ launchers


def norm_affine(w, out, mean, rstd, weight, bias, stats_per_n=0, D=1, k_x=None, k_0=None,
                dy=None, eps=None) -> None:
    """Over the walked tensor w.x, in its memory order: out = (x - mean[s]) * rstd[s] * w[c] +
    b[c], or with dy, dx = dy * rstd[s] * w[c] (+ (x - mean[s]) * k_x[s] + k_0[s]). With eps, rstd
    holds variances (batch norm inference). mean, rstd, k_x, k_0: contiguous, one value per
    statistic s = n * stats_per_n + c // D; weight and bias: [C] or None."""
    numel = w.x.numel()
    if numel == 0:
        return
    eps_hi, eps_lo = split_eps(eps) if eps is not None else (0.0, 0.0)  # (unread without eps)
    count_launch("norm_affine")
    norm_affine_kernel[(H.cdiv(numel, H.ELEMENTWISE_BLOCK),)](
        w.x, dy, out, mean, rstd, weight, bias, k_x, k_0, numel, w.C, w.HW, D, stats_per_n,
        eps_hi, eps_lo, CHANNELS_LAST=w.channels_last, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_DY=dy is not None, HAS_K=k_x is not None,
        RSTD_FROM_VAR=eps is not None, ACC=tl_acc(w.x), BLOCK=H.ELEMENTWISE_BLOCK)


def merge_moments(parts, mean, var, rstd, splits, stride_stat, stride_part, eps) -> None:
    """mean, var (optional) and rstd of each statistic from its `splits` (count, mean, M2)
    partials, parts[0..2] (contiguous) at stat * stride_stat + part * stride_part."""
    count_launch("moments_merge")
    moments_merge_kernel[(mean.numel(),)](
        parts, parts.numel() // 3, mean, var, rstd, splits, stride_stat, stride_part,
        *split_eps(eps), HAS_VAR=var is not None, BLOCK_P=H.next_pow2(splits))


def channel_grad_sums(w, dy, mean, dtype, stats_per_n=0, D=1):
    """Partial sums of dy and dy * (x - mean[s]) per (n, c), as two [splits, N, C] tensors:
    HW is split over programs when N * C alone would not fill the GPU."""
    N, C, HW = w.N, w.C, w.HW
    if N * C == 0 or HW == 0:
        zeros = torch.zeros((1, N, C), dtype=dtype, device=w.x.device)
        return zeros, zeros.clone()
    block_c, block_k = H.tile_2d(C, w.channels_last)
    hw_per, splits = H.split_range(
        HW, H.split_count(N * H.cdiv(C, block_c), HW, w.x.device, min_elems=block_k))
    p_dy = torch.empty((splits, N, C), dtype=dtype, device=w.x.device)
    p_dyx = torch.empty((splits, N, C), dtype=dtype, device=w.x.device)
    count_launch("channel_grad_sums")
    channel_grad_sums_kernel[(N, H.cdiv(C, block_c), splits)](
        dy, w.x, mean, p_dy, p_dyx, C, HW, D, stats_per_n, w.sN, w.sC, w.sHW, hw_per,
        BLOCK_C=block_c, BLOCK_K=block_k, ACC=tl_acc(w.x))
    return p_dy, p_dyx


def sum_rows(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of a contiguous [rows, n] tensor, as an [n] tensor of `dtype`."""
    rows, n = parts.shape
    out = torch.empty((n,), dtype=dtype, device=parts.device)
    if n:
        count_launch("sum_rows")
        sum_rows_kernel[(H.cdiv(n, H.SUM_ROWS_BLOCK[1]),)](
            parts, out, rows, n, BLOCK_R=H.SUM_ROWS_BLOCK[0], BLOCK_N=H.SUM_ROWS_BLOCK[1])
    return out


def zero_lone_values_grad(dx: torch.Tensor) -> None:
    """dx of values normalized alone (a layer norm row, or a group, of one value), whose true
    gradient is 0: the kernels' closed form leaves about rstd = 1 / sqrt(eps) times an ulp of
    dy * w there. Times 0 that is 0, and a NaN or inf stays NaN, as torch's
    (csrc/cpu/register.cpp does the same for the C++ kernels)."""
    if dx.numel():
        dx.mul_(0)


def flat(p):
    """An optional parameter as the kernels read it: contiguous, or None."""
    return p.contiguous() if p is not None else None


def grad_mask(output_mask, weight):
    """(want dx, want dweight, want dbias) from a backward op's output mask."""
    return bool(output_mask[0]), bool(output_mask[1]) and weight is not None, bool(output_mask[2])
