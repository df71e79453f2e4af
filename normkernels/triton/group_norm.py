"""Group norm (and instance norm: one channel per group), Triton, NCHW and channels_last.

    forward : per-(n, group) Welford partials, each group split over several programs so that
              small batches fill the GPU; a merge kernel (Chan, fixed order) writes mean and
              rstd; then one elementwise normalize in the input's own memory order, reading
              mean[n, g], rstd[n, g], weight[c] and bias[c] itself (3 launches).
    backward: per-(n, channel) partial sums of dy and dy * (x - mean) (split over HW); one
              program per (n, group) sums them, writes the group's dx coefficients and each
              channel's dweight/dbias share of sample n; the shares are summed over samples in
              a fixed order; one elementwise dx (at most 5 launches).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import heuristics as H
from ._shape import walk
from .checks import check_dy, check_groups, check_param, stats_arg
from .common import (chan_merge, channel_grad_sums, flat, grad_mask, merge_moments, norm_affine,
                     sum_rows, zero_lone_values_grad)
from .launch import acc_dtype, count_launch, tl_acc


@triton.jit
def group_moments_partial_kernel(X, Parts, plane, HW, G, D, sN, sC, sHW, k_per_split,
                                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
                                 ACC: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    n = s // G
    g = s % G
    K = D * HW
    k0 = split * k_per_split
    k1 = tl.minimum(k0 + k_per_split, K)
    count = tl.sum(tl.zeros([1], ACC), axis=0)
    mean = tl.sum(tl.zeros([1], ACC), axis=0)
    m2 = tl.sum(tl.zeros([1], ACC), axis=0)
    for start in range(k0, k1, BLOCK):
        k = start + tl.arange(0, BLOCK)
        mask = k < k1
        if CHANNELS_LAST:
            hw = k // D
            d = k % D
        else:
            d = k // HW
            hw = k % HW
        off = n * sN + (g * D + d).to(tl.int64) * sC + hw.to(tl.int64) * sHW
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        cnt = tl.sum(mask.to(ACC), axis=0)
        bmean = tl.sum(x, axis=0) / cnt
        dev = tl.where(mask, x - bmean, 0.0)
        bm2 = tl.sum(dev * dev, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, cnt, bmean, bm2)
    out = s * nsplit + split
    tl.store(Parts + out, count)
    tl.store(Parts + plane + out, mean)
    tl.store(Parts + 2 * plane + out, m2)


@triton.jit
def group_grad_coeffs_kernel(PSumDy, PSumDyX, Rstd, W, KX, K0, DWPart, DBPart, C, G, D, count,
                             num_splits, HAS_W: tl.constexpr, HAS_DW: tl.constexpr,
                             HAS_DB: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """One program per (n, g): sums the group's channels' partials over the HW splits; writes
    k_x = -rstd^3 * mean(g * (x - mean)) and k_0 = -rstd * mean(g), g = dy * w, for dx, and each
    channel's dweight (sum dy * xhat) and dbias (sum dy) shares of sample n."""
    s = tl.program_id(0).to(tl.int64)
    n = s // G
    g = s % G
    rstd = tl.load(Rstd + s)
    NC = (tl.num_programs(0) // G).to(tl.int64) * C  # (the partials' split stride, N * C)
    sum_g = tl.sum(tl.zeros([1], ACC), axis=0)
    sum_gx = tl.sum(tl.zeros([1], ACC), axis=0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = d < D
        c = g * D + d
        off = n * C + c
        s_dy = tl.zeros([BLOCK_D], ACC)
        s_dyx = tl.zeros([BLOCK_D], ACC)
        for p in range(num_splits):
            s_dy += tl.load(PSumDy + p * NC + off, mask=m, other=0.0)
            s_dyx += tl.load(PSumDyX + p * NC + off, mask=m, other=0.0)
        if HAS_DW:
            tl.store(DWPart + off, s_dyx * rstd, mask=m)
        if HAS_DB:
            tl.store(DBPart + off, s_dy, mask=m)
        if HAS_W:
            wt = tl.load(W + c, mask=m, other=0.0).to(ACC)
            s_dy = s_dy * wt
            s_dyx = s_dyx * wt
        sum_g += tl.sum(s_dy, axis=0)
        sum_gx += tl.sum(s_dyx, axis=0)
    tl.store(KX + s, -rstd * rstd * rstd * (sum_gx / count))
    tl.store(K0 + s, -rstd * (sum_g / count))


def group_norm_fwd(x, num_groups, weight, bias, eps):
    check_groups(x, num_groups, "group_norm")
    check_param(weight, (x.shape[1],), x, "group_norm", "weight")
    check_param(bias, (x.shape[1],), x, "group_norm", "bias")
    w = walk(x, rows_2d=False)
    N, C, HW, G = w.N, w.C, w.HW, num_groups
    D = C // G
    sdt = acc_dtype(x)
    y = w.empty()
    S, K = N * G, D * HW
    if S == 0 or K == 0:  # no values: torch's statistics of nothing (mean 0, rstd nan)
        mean = torch.zeros((S,), dtype=sdt, device=x.device)
        rstd = torch.full((S,), math.nan, dtype=sdt, device=x.device)
        return y, mean.view(N, G), rstd.view(N, G)
    mean = torch.empty((S,), dtype=sdt, device=x.device)
    rstd = torch.empty((S,), dtype=sdt, device=x.device)
    k_per, splits = H.split_range(K, H.split_count(S, K, x.device))
    parts = torch.empty((3, S, splits), dtype=sdt, device=x.device)
    count_launch("group_moments_partial")
    group_moments_partial_kernel[(S, splits)](
        w.x, parts, S * splits, HW, G, D, w.sN, w.sC, w.sHW, k_per,
        CHANNELS_LAST=w.channels_last, BLOCK=H.ELEMENTWISE_BLOCK, ACC=tl_acc(x))
    merge_moments(parts, mean, None, rstd, splits, splits, 1, eps)
    norm_affine(w, y, mean, rstd, flat(weight), flat(bias), stats_per_n=G, D=D)
    return y, mean.view(N, G), rstd.view(N, G)


def group_norm_bwd(dy, x, mean, rstd, weight, num_groups, output_mask):
    check_groups(x, num_groups, "group_norm_bwd")
    check_dy(dy, x, "group_norm_bwd")
    check_param(weight, (x.shape[1],), x, "group_norm_bwd", "weight")
    mean = stats_arg(mean, x.shape[0] * num_groups, x, "group_norm_bwd", "mean")
    rstd = stats_arg(rstd, x.shape[0] * num_groups, x, "group_norm_bwd", "rstd")
    w = walk(x, rows_2d=False)
    N, C, HW, G = w.N, w.C, w.HW, num_groups
    D = C // G
    sdt = acc_dtype(x)
    want_dx, want_dw, want_db = grad_mask(output_mask, weight)
    pdtype = weight.dtype if weight is not None else x.dtype
    dyc = w.like(dy)
    wt = flat(weight)
    p_dy, p_dyx = channel_grad_sums(w, dyc, mean, sdt, stats_per_n=G, D=D)
    k_x = torch.empty((N * G,), dtype=sdt, device=x.device)
    k_0 = torch.empty((N * G,), dtype=sdt, device=x.device)
    dw_part = torch.empty((N, C), dtype=sdt, device=x.device) if want_dw else None
    db_part = torch.empty((N, C), dtype=sdt, device=x.device) if want_db else None
    if N * G > 0:
        count_launch("group_grad_coeffs")
        group_grad_coeffs_kernel[(N * G,)](
            p_dy, p_dyx, rstd, wt, k_x, k_0, dw_part, db_part, C, G, D, max(D * HW, 1),
            p_dy.shape[0], HAS_W=wt is not None, HAS_DW=want_dw, HAS_DB=want_db,
            BLOCK_D=min(H.next_pow2(D), 1024), ACC=tl_acc(x))
    dwt = sum_rows(dw_part, pdtype) if want_dw else x.new_empty((0,))
    dbs = sum_rows(db_part, pdtype) if want_db else x.new_empty((0,))
    if not want_dx:
        return x.new_empty((0,)), dwt, dbs
    dx = w.empty()
    norm_affine(w, dx, mean, rstd, wt, None, stats_per_n=G, D=D, k_x=k_x, k_0=k_0, dy=dyc)
    if D * HW == 1:  # one value a group
        zero_lone_values_grad(dx)
    return dx, dwt, dbs
