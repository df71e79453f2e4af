"""Group norm (and instance norm: one channel per group), Triton, NCHW and channels_last.

    forward : per-(n, group) Welford partials, each group split over several programs so that
              small batches fill the GPU; a merge kernel (Chan, fixed order); then one
              elementwise normalize in the input's own memory order.
    backward: per-(n, channel) sums of dy and dy * (x - mean) (split over HW, partials summed in
              a fixed order), per-group coefficients on [N, C]-sized tensors, then one
              elementwise dx = dy * k_dy + (x - mean) * k_x + k_0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import heuristics as H
from ._shape import walk
from .checks import check_dy, check_groups, check_param, stats_arg
from .common import channel_affine, channel_grad_sums, chan_merge, grad_mask, moments_merge_kernel
from .launch import acc_dtype, count_launch, tl_acc


@triton.jit
def group_moments_partial_kernel(X, PCount, PMean, PM2, HW, G, D, sN, sC, sHW, k_per_split,
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
    tl.store(PCount + out, count)
    tl.store(PMean + out, mean)
    tl.store(PM2 + out, m2)


def _per_channel(stat: torch.Tensor, N: int, G: int, D: int) -> torch.Tensor:
    """[N, G] -> [N, C] contiguous, each group's value repeated over its D channels."""
    return stat.view(N, G, 1).expand(N, G, D).reshape(N, G * D).contiguous()


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
    mean = torch.zeros((S,), dtype=sdt, device=x.device)
    var = torch.zeros((S,), dtype=sdt, device=x.device)
    rstd = torch.full((S,), 1.0 / (eps ** 0.5), dtype=sdt, device=x.device)
    if S > 0 and K > 0:
        splits = H.split_count(S, K, x.device)
        k_per = triton.cdiv(K, splits)
        splits = triton.cdiv(K, k_per)
        parts = [torch.empty((S, splits), dtype=sdt, device=x.device) for _ in range(3)]
        count_launch("group_moments_partial")
        group_moments_partial_kernel[(S, splits)](
            w.x, *parts, HW, G, D, w.sN, w.sC, w.sHW, k_per, CHANNELS_LAST=w.channels_last,
            BLOCK=H.ELEMENTWISE_BLOCK, ACC=tl_acc(x))
        count_launch("moments_merge")
        moments_merge_kernel[(S,)](*parts, mean, var, rstd, splits, splits, 1, eps,
                                   BLOCK_P=H.next_pow2(splits))
        wt = weight.to(sdt) if weight is not None else torch.ones(C, dtype=sdt, device=x.device)
        center = _per_channel(mean, N, G, D)
        k_x = _per_channel(rstd, N, G, D) * wt
        k_0 = (bias.to(sdt) if bias is not None else torch.zeros(C, dtype=sdt, device=x.device)).expand(N, C).contiguous()
        channel_affine(w, y, center, k_x.contiguous(), k_0)
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
    mean2, rstd2 = mean.view(N, G), rstd.view(N, G)
    center = _per_channel(mean2, N, G, D)
    sum_dy, sum_dyx = channel_grad_sums(w, dyc, center, sdt)
    rstd_c = _per_channel(rstd2, N, G, D)
    dwt = (sum_dyx * rstd_c).sum(0).to(pdtype) if want_dw else x.new_empty((0,))
    dbs = sum_dy.sum(0).to(pdtype) if want_db else x.new_empty((0,))
    if not want_dx:
        return x.new_empty((0,)), dwt, dbs
    dx = w.empty()
    if x.numel() > 0:
        wt = weight.to(sdt) if weight is not None else torch.ones(C, dtype=sdt, device=x.device)
        inv_count = 1.0 / (D * HW)
        mean_g = (sum_dy * wt).view(N, G, D).sum(-1) * inv_count  # mean of g = dy * w
        mean_gxhat = (sum_dyx * wt).view(N, G, D).sum(-1) * rstd2 * inv_count
        k_dy = (rstd_c * wt).contiguous()
        k_x = _per_channel(-rstd2 * rstd2 * mean_gxhat, N, G, D)
        k_0 = _per_channel(-rstd2 * mean_g, N, G, D)
        channel_affine(w, dx, center, k_x, k_0, k_dy, dyc)
    return dx, dwt, dbs
