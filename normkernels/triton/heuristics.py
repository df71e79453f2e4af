"""Launch heuristics for the Triton kernels: small pure functions, tested on their own.

Everything here is a function of sizes (and the SM count), never of data, so a shape always
launches the same way (no autotuning pass makes a first call slow; results are reproducible).
"""
from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for sizes. (triton.cdiv is a constexpr function on recent Tritons: 2.6 us a
    call from Python on the Zen 3 guest, against 0.04 for this.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# A row of up to this many elements is held in registers by one program; longer rows loop.
MAX_ROW_BLOCK = 8192


def row_block(n_cols: int) -> int:
    """Block width for a row-wise (layer norm) kernel: the whole row up to MAX_ROW_BLOCK."""
    return min(next_pow2(max(n_cols, 1)), MAX_ROW_BLOCK)


def row_warps(block: int) -> int:
    """Warps per row program: ~8 elements per thread at the widest."""
    return max(1, min(16, block // 256))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (CUDA); the interpreter gets a small fixed count so that
    CPU test runs launch few programs."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def programs_for_rows(n_rows: int, device: torch.device) -> int:
    """Programs of the layer norm backward: each owns a contiguous run of rows and one row of
    dweight/dbias partials; enough to fill the GPU a few times over, never more than rows."""
    return max(1, min(n_rows, 4 * num_sms(device)))


def split_count(num_stats: int, elems_per_stat: int, device: torch.device, min_elems: int = 4096) -> int:
    """How many programs share one statistic (one group, or one channel of batch norm) so that
    small batches still fill the GPU: about 4 programs per SM in all, each with >= min_elems."""
    want = max(1, (4 * num_sms(device) + num_stats - 1) // max(num_stats, 1))
    most = max(1, elems_per_stat // min_elems)
    return max(1, min(want, most, 1024))


def split_range(length: int, splits: int) -> tuple:
    """(per, splits): `length` cut into runs of `per` (the last one shorter), about `splits` of
    them and none empty."""
    per = -(-length // max(splits, 1))
    return per, -(-length // max(per, 1))


def tile_2d(n_channels: int, channels_last: bool) -> tuple:
    """(BLOCK_C, BLOCK_K) for the [channels x reduced elements] tiles of batch/group norm:
    wide along whichever axis is contiguous in memory."""
    if channels_last:
        bc = min(next_pow2(n_channels), 64)
        return bc, max(16, 2048 // bc)
    return min(next_pow2(n_channels), 4), 512


ELEMENTWISE_BLOCK = 1024

# sum_rows' tile: rows at a time x columns a program. A [rows, n] sum of the layer norm
# backward's per-program partials (528 rows on an H200) had one program per 1024 columns walk
# its rows one by one: 106 us for n = 1024, over half the whole backward.
SUM_ROWS_BLOCK = (32, 64)
