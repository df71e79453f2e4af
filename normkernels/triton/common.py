"""Triton kernels shared by the batch and group norm families.

    moments_merge   per-statistic (count, mean, M2) partials -> mean, var, rstd (Chan, closed form)
    channel_affine  out = (x - center[n,c]) * k_x[n,c] + k_0[n,c] (+ dy * k_dy[n,c]) over an
                    NCHW or channels_last tensor, in memory order: batch norm's normalize (train
                    and inference), group norm's normalize, and both families' dx.
    channel_grad_sums  per-(n, c) sum(dy) and sum(dy * (x - center[n, c])), split over HW.
    sum_parts       column sums of [parts, n] fp32 partials, in part order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import heuristics as H
from .launch import count_launch


@triton.jit
def chan_merge(count, mean, m2, block_count, block_mean, block_m2):
    """Chan's merge of a block's (count, mean, M2) into running ones (scalars or vectors)."""
    total = count + block_count
    delta = block_mean - mean
    mean = mean + delta * (block_count / total)
    m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
    return total, mean, m2


@triton.jit
def moments_merge_kernel(PCount, PMean, PM2, Mean, Var, Rstd, num_parts, stride_stat, stride_part,
                         eps, BLOCK_P: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    mask = p < num_parts
    off = s * stride_stat + p * stride_part
    cnt = tl.load(PCount + off, mask=mask, other=0.0)
    mu = tl.load(PMean + off, mask=mask, other=0.0)
    m2 = tl.load(PM2 + off, mask=mask, other=0.0)
    total = tl.sum(cnt, axis=0)
    safe = tl.where(total > 0, total, 1.0)
    mean = tl.sum(cnt * mu, axis=0) / safe
    dev = tl.where(mask, mu - mean, 0.0)
    # Chan's merge in closed form: M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)
    var = (tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / safe
    tl.store(Mean + s, mean)
    tl.store(Var + s, var)
    tl.store(Rstd + s, 1.0 / tl.sqrt(var + eps))


@triton.jit
def channel_affine_kernel(X, DY, Out, Center, KX, K0, KDY, numel, C, HW, coef_stride_n,
                          CHANNELS_LAST: tl.constexpr, HAS_DY: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    if CHANNELS_LAST:
        c = i % C
    else:
        c = (i // HW) % C
    n = i // (HW * C)
    coef = n * coef_stride_n + c
    x = tl.load(X + i, mask=mask, other=0.0)
    center = tl.load(Center + coef, mask=mask, other=0.0)
    acc_t = center.dtype
    out = (x.to(acc_t) - center) * tl.load(KX + coef, mask=mask, other=0.0) + tl.load(K0 + coef, mask=mask, other=0.0)
    if HAS_DY:
        dy = tl.load(DY + i, mask=mask, other=0.0).to(acc_t)
        out += dy * tl.load(KDY + coef, mask=mask, other=0.0)
    tl.store(Out + i, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def channel_grad_sums_kernel(DY, X, Center, PSumDy, PSumDyX, C, HW, sN, sC, sHW, hw_per_split,
                             center_stride_n,
                             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (N, cdiv(C, BLOCK_C), splits). Writes partials [split, n, c]."""
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    split = tl.program_id(2)
    N = tl.num_programs(0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    center = tl.load(Center + n * center_stride_n + c, mask=cmask, other=0.0)
    acc_t = center.dtype
    s_dy = tl.zeros([BLOCK_C], acc_t)
    s_dyx = tl.zeros([BLOCK_C], acc_t)
    hw0 = split * hw_per_split
    hw1 = tl.minimum(hw0 + hw_per_split, HW)
    for start in range(hw0, hw1, BLOCK_K):
        hw = start + tl.arange(0, BLOCK_K)
        m = cmask[:, None] & (hw < hw1)[None, :]
        off = n * sN + c.to(tl.int64)[:, None] * sC + hw.to(tl.int64)[None, :] * sHW
        dy = tl.load(DY + off, mask=m, other=0.0).to(acc_t)
        x = tl.load(X + off, mask=m, other=0.0).to(acc_t)
        s_dy += tl.sum(dy, axis=1)
        s_dyx += tl.sum(dy * tl.where(m, x - center[:, None], 0.0), axis=1)
    out = (split * N + n) * C + c
    tl.store(PSumDy + out, s_dy, mask=cmask)
    tl.store(PSumDyX + out, s_dyx, mask=cmask)


@triton.jit
def sum_parts_kernel(Parts, Out, num_parts, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    acc = tl.load(Parts + cols, mask=mask, other=0.0)
    for p in range(1, num_parts):
        acc += tl.load(Parts + p * n + cols, mask=mask, other=0.0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launchers


def channel_affine(w, out, center, k_x, k_0, k_dy=None, dy=None) -> None:
    """out = (x - center) * k_x + k_0 (+ dy * k_dy) over the walked tensor w.x; coefficients
    are [N, C] (per sample and channel) or [C] (shared by every sample), contiguous."""
    numel = w.x.numel()
    if numel == 0:
        return
    count_launch("channel_affine")
    channel_affine_kernel[(triton.cdiv(numel, H.ELEMENTWISE_BLOCK),)](
        w.x, dy, out, center, k_x, k_0, k_dy, numel, w.C, w.HW, w.C if center.dim() == 2 else 0,
        CHANNELS_LAST=w.channels_last, HAS_DY=dy is not None, BLOCK=H.ELEMENTWISE_BLOCK)


def channel_grad_sums(w, dy, center, dtype):
    """Per-(n, c) sum(dy) and sum(dy * (x - center)) as two [N, C] tensors; center is [N, C]
    or [C]. HW is split over programs when N * C alone would not fill the GPU; the split
    partials are summed in a fixed order."""
    N, C, HW = w.N, w.C, w.HW
    if N * C == 0 or HW == 0:
        zeros = torch.zeros((N, C), dtype=dtype, device=w.x.device)
        return zeros, zeros.clone()
    block_c, block_k = H.tile_2d(C, w.channels_last)
    splits = H.split_count(N * triton.cdiv(C, block_c), HW, w.x.device, min_elems=block_k)
    hw_per = triton.cdiv(HW, splits)
    splits = triton.cdiv(HW, hw_per)
    p_dy = torch.empty((splits, N, C), dtype=dtype, device=w.x.device)
    p_dyx = torch.empty((splits, N, C), dtype=dtype, device=w.x.device)
    count_launch("channel_grad_sums")
    channel_grad_sums_kernel[(N, triton.cdiv(C, block_c), splits)](
        dy, w.x, center, p_dy, p_dyx, C, HW, w.sN, w.sC, w.sHW, hw_per,
        C if center.dim() == 2 else 0, BLOCK_C=block_c, BLOCK_K=block_k)
    return p_dy.sum(0), p_dyx.sum(0)


def grad_mask(output_mask, weight):
    """(want dx, want dweight, want dbias) from a backward op's output mask."""
    return bool(output_mask[0]), bool(output_mask[1]) and weight is not None, bool(output_mask[2])
