"""Batch norm, Triton: training forward, inference forward and backward, NCHW, channels_last
and 2-D inputs.

    forward (train): per-channel Welford partials over [BLOCK_C x BLOCK_K] tiles of (channels x
                     N*HW positions), split over N*HW so that few channels still fill the GPU;
                     merge (Chan, fixed order); one elementwise normalize in memory order.
    inference      : the same elementwise normalize with the running statistics.
    backward       : per-(n, channel) sums of dy and dy * (x - mean) (split over HW), summed in
                     a fixed order; then dx = dy * k_dy + (x - mean) * k_x + k_0 elementwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import heuristics as H
from ._shape import walk
from .checks import check_dy, check_nc, check_param, stats_arg
from .common import channel_affine, channel_grad_sums, chan_merge, grad_mask, moments_merge_kernel
from .launch import acc_dtype, count_launch, tl_acc


@triton.jit
def batch_moments_partial_kernel(X, PCount, PMean, PM2, C, HW, R, sN, sC, sHW, rows_per_split,
                                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    cb = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    r0 = split * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, R)
    count = tl.sum(tl.zeros([1], ACC), axis=0)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(r0, r1, BLOCK_K):
        r = start + tl.arange(0, BLOCK_K)
        rmask = r < r1
        n = r // HW
        hw = r % HW
        off = c.to(tl.int64)[:, None] * sC + (n * sN + hw * sHW)[None, :]
        m = cmask[:, None] & rmask[None, :]
        x = tl.load(X + off, mask=m, other=0.0).to(ACC)
        cnt = tl.sum(rmask.to(ACC), axis=0)
        bmean = tl.sum(x, axis=1) / cnt
        dev = tl.where(m, x - bmean[:, None], 0.0)
        bm2 = tl.sum(dev * dev, axis=1)
        count, mean, m2 = chan_merge(count, mean, m2, cnt, bmean, bm2)
    out = split * C + c
    tl.store(PCount + out, tl.zeros([BLOCK_C], ACC) + count, mask=cmask)
    tl.store(PMean + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


def _params(weight, bias, C, sdt, device):
    wt = weight.to(sdt).contiguous() if weight is not None else torch.ones(C, dtype=sdt, device=device)
    bs = bias.to(sdt).contiguous() if bias is not None else torch.zeros(C, dtype=sdt, device=device)
    return wt, bs


def batch_norm_fwd(x, weight, bias, eps):
    check_nc(x, "batch_norm")
    check_param(weight, (x.shape[1],), x, "batch_norm", "weight")
    check_param(bias, (x.shape[1],), x, "batch_norm", "bias")
    w = walk(x, rows_2d=True)
    N, C, HW = w.N, w.C, w.HW
    sdt = acc_dtype(x)
    R = N * HW
    mean = torch.zeros((C,), dtype=sdt, device=x.device)
    var = torch.zeros((C,), dtype=sdt, device=x.device)
    invstd = torch.full((C,), 1.0 / (eps ** 0.5), dtype=sdt, device=x.device)
    y = w.empty()
    if C > 0 and R > 0:
        block_c, block_k = H.tile_2d(C, w.channels_last)
        cblocks = triton.cdiv(C, block_c)
        splits = H.split_count(cblocks, R * block_c, x.device)
        rows_per = triton.cdiv(R, splits)
        splits = triton.cdiv(R, rows_per)
        parts = [torch.empty((splits, C), dtype=sdt, device=x.device) for _ in range(3)]
        count_launch("batch_moments_partial")
        batch_moments_partial_kernel[(cblocks, splits)](
            w.x, *parts, C, HW, R, w.sN, w.sC, w.sHW, rows_per, BLOCK_C=block_c, BLOCK_K=block_k,
            ACC=tl_acc(x))
        count_launch("moments_merge")
        moments_merge_kernel[(C,)](*parts, mean, var, invstd, splits, 1, C, eps,
                                   BLOCK_P=H.next_pow2(splits))
        wt, bs = _params(weight, bias, C, sdt, x.device)
        channel_affine(w, y, mean, invstd * wt, bs)
    return y, mean, invstd, var


def batch_norm_infer(x, mean, var, weight, bias, eps):
    check_nc(x, "batch_norm")
    mean = stats_arg(mean, x.shape[1], x, "batch_norm", "mean")
    var = stats_arg(var, x.shape[1], x, "batch_norm", "var")
    check_param(weight, (x.shape[1],), x, "batch_norm", "weight")
    check_param(bias, (x.shape[1],), x, "batch_norm", "bias")
    w = walk(x, rows_2d=True)
    sdt = acc_dtype(x)
    y = w.empty()
    wt, bs = _params(weight, bias, w.C, sdt, x.device)
    invstd = torch.rsqrt(var + eps)
    channel_affine(w, y, mean, (invstd * wt).contiguous(), bs)
    return y


def batch_norm_bwd(dy, x, mean, invstd, weight, train, output_mask):
    check_nc(x, "batch_norm_bwd")
    check_dy(dy, x, "batch_norm_bwd")
    check_param(weight, (x.shape[1],), x, "batch_norm_bwd", "weight")
    mean = stats_arg(mean, x.shape[1], x, "batch_norm_bwd", "mean")
    invstd = stats_arg(invstd, x.shape[1], x, "batch_norm_bwd", "invstd")
    w = walk(x, rows_2d=True)
    N, C, HW = w.N, w.C, w.HW
    sdt = acc_dtype(x)
    want_dx, want_dw, want_db = grad_mask(output_mask, weight)
    pdtype = weight.dtype if weight is not None else x.dtype
    dyc = w.like(dy)
    count = N * HW
    sum_dy = torch.zeros((C,), dtype=sdt, device=x.device)
    sum_dyx = torch.zeros((C,), dtype=sdt, device=x.device)
    if train or want_dw or want_db:  # inference dx alone needs no reduction
        per_sample_dy, per_sample_dyx = channel_grad_sums(w, dyc, mean, sdt)
        sum_dy, sum_dyx = per_sample_dy.sum(0), per_sample_dyx.sum(0)
    dwt = (sum_dyx * invstd).to(pdtype) if want_dw else x.new_empty((0,))
    dbs = sum_dy.to(pdtype) if want_db else x.new_empty((0,))
    if not want_dx:
        return x.new_empty((0,)), dwt, dbs
    dx = w.empty()
    wt, _ = _params(weight, None, C, sdt, x.device)
    k_dy = invstd * wt
    if train and count > 0:
        k_x = -k_dy * invstd * invstd * sum_dyx / count
        k_0 = -k_dy * sum_dy / count
    else:
        k_x = torch.zeros_like(k_dy)
        k_0 = torch.zeros_like(k_dy)
    channel_affine(w, dx, mean, k_x.contiguous(), k_0.contiguous(), k_dy.contiguous(), dyc)
    return dx, dwt, dbs
