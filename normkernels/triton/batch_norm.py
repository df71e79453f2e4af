"""Batch norm, Triton: training forward, inference forward and backward, NCHW, channels_last
and 2-D inputs.

    forward (train): per-channel Welford partials over [BLOCK_C x BLOCK_K] tiles of (channels x
                     N*HW positions), split over N*HW so that few channels still fill the GPU;
                     merge (Chan, fixed order); one elementwise normalize in memory order that
                     reads mean, invstd, weight and bias itself (3 launches).
    inference      : the same elementwise normalize, invstd from the running variance (1 launch).
    backward       : per-(n, channel) partial sums of dy and dy * (x - mean) (split over HW); one
                     kernel sums them per channel in a fixed order and writes dweight, dbias and
                     dx's coefficients; then dx elementwise (3 launches).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import heuristics as H
from ._shape import walk
from .checks import check_dy, check_nc, check_param, stats_arg
from .common import chan_merge, channel_grad_sums, flat, grad_mask, merge_moments, norm_affine
from .launch import acc_dtype, count_launch, tl_acc


@triton.jit
def batch_moments_partial_kernel(X, Parts, plane, C, HW, R, sN, sC, sHW, rows_per_split,
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
    tl.store(Parts + out, tl.zeros([BLOCK_C], ACC) + count, mask=cmask)
    tl.store(Parts + plane + out, mean, mask=cmask)
    tl.store(Parts + 2 * plane + out, m2, mask=cmask)


@triton.jit
def batch_grad_coeffs_kernel(PSumDy, PSumDyX, Invstd, W, DW, DB, KX, K0, C, rows, count,
                             HAS_W: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                             HAS_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             ACC: tl.constexpr):
    """Per channel: sums the [rows, C] partials (rows = splits * N) in row order; writes dweight
    (sum dy * xhat), dbias (sum dy) and, in training, dx's k_x and k_0."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s_dy = tl.zeros([BLOCK_C], ACC)
    s_dyx = tl.zeros([BLOCK_C], ACC)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < rows)[:, None] & cmask[None, :]
        off = r.to(tl.int64)[:, None] * C + c[None, :]
        s_dy += tl.sum(tl.load(PSumDy + off, mask=m, other=0.0), axis=0)
        s_dyx += tl.sum(tl.load(PSumDyX + off, mask=m, other=0.0), axis=0)
    invstd = tl.load(Invstd + c, mask=cmask, other=0.0)
    if HAS_DW:
        tl.store(DW + c, (s_dyx * invstd).to(DW.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(DB + c, s_dy.to(DB.dtype.element_ty), mask=cmask)
    if HAS_K:
        k_dy = invstd
        if HAS_W:
            k_dy = invstd * tl.load(W + c, mask=cmask, other=0.0).to(ACC)
        tl.store(KX + c, -k_dy * invstd * invstd * s_dyx / count, mask=cmask)
        tl.store(K0 + c, -k_dy * s_dy / count, mask=cmask)


def batch_norm_fwd(x, weight, bias, eps):
    check_nc(x, "batch_norm")
    check_param(weight, (x.shape[1],), x, "batch_norm", "weight")
    check_param(bias, (x.shape[1],), x, "batch_norm", "bias")
    w = walk(x, rows_2d=True)
    N, C, HW = w.N, w.C, w.HW
    sdt = acc_dtype(x)
    R = N * HW
    y = w.empty()
    if C == 0 or R == 0:  # no values: torch's statistics of nothing
        return (y, torch.zeros((C,), dtype=sdt, device=x.device),
                torch.full((C,), 1.0 / (eps ** 0.5), dtype=sdt, device=x.device),
                torch.zeros((C,), dtype=sdt, device=x.device))
    # (three tensors, not views of one: outputs of an op share no storage, nor autograd's
    # version counter)
    mean, invstd, var = (torch.empty((C,), dtype=sdt, device=x.device) for _ in range(3))
    block_c, block_k = H.tile_2d(C, w.channels_last)
    cblocks = H.cdiv(C, block_c)
    rows_per, splits = H.split_range(R, H.split_count(cblocks, R * block_c, x.device))
    parts = torch.empty((3, splits, C), dtype=sdt, device=x.device)
    count_launch("batch_moments_partial")
    batch_moments_partial_kernel[(cblocks, splits)](
        w.x, parts, splits * C, C, HW, R, w.sN, w.sC, w.sHW, rows_per,
        BLOCK_C=block_c, BLOCK_K=block_k, ACC=tl_acc(x))
    merge_moments(parts, mean, var, invstd, splits, 1, C, eps)
    norm_affine(w, y, mean, invstd, flat(weight), flat(bias))
    return y, mean, invstd, var


def batch_norm_infer(x, mean, var, weight, bias, eps):
    check_nc(x, "batch_norm")
    mean = stats_arg(mean, x.shape[1], x, "batch_norm", "mean")
    var = stats_arg(var, x.shape[1], x, "batch_norm", "var")
    check_param(weight, (x.shape[1],), x, "batch_norm", "weight")
    check_param(bias, (x.shape[1],), x, "batch_norm", "bias")
    w = walk(x, rows_2d=True)
    y = w.empty()
    norm_affine(w, y, mean, var, flat(weight), flat(bias), eps=eps)
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
    wt = flat(weight)
    dwt = torch.empty((C,), dtype=pdtype, device=x.device) if want_dw else x.new_empty((0,))
    dbs = torch.empty((C,), dtype=pdtype, device=x.device) if want_db else x.new_empty((0,))
    with_k = want_dx and train and N * HW > 0  # inference dx needs no reduction
    k_x = k_0 = None
    if with_k or want_dw or want_db:
        p_dy, p_dyx = channel_grad_sums(w, dyc, mean, sdt)
        if with_k:
            k_x = torch.empty((C,), dtype=sdt, device=x.device)
            k_0 = torch.empty((C,), dtype=sdt, device=x.device)
        if C > 0:
            block_c = min(H.next_pow2(C), 64)
            count_launch("batch_grad_coeffs")
            batch_grad_coeffs_kernel[(H.cdiv(C, block_c),)](
                p_dy, p_dyx, invstd, wt, dwt if want_dw else None, dbs if want_db else None,
                k_x, k_0, C, p_dy.shape[0] * p_dy.shape[1], max(N * HW, 1), HAS_W=wt is not None,
                HAS_DW=want_dw, HAS_DB=want_db, HAS_K=with_k, BLOCK_R=2048 // block_c,
                BLOCK_C=block_c, ACC=tl_acc(x))
    if not want_dx:
        return x.new_empty((0,)), dwt, dbs
    dx = w.empty()
    norm_affine(w, dx, mean, invstd, wt, None, k_x=k_x, k_0=k_0, dy=dyc)
    return dx, dwt, dbs
