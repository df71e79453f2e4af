"""SyncBatchNorm across two processes (gloo on loopback) against one process running
BatchNorm on the whole batch: outputs, input gradients, summed parameter gradients and running
statistics."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkernels

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64, generator=g) * 2 + 1
    return x, torch.randn(6, 5, 4, 3, dtype=torch.float64, generator=g)


def _init(module):
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
        module.bias.copy_(torch.linspace(-1, 1, 5, dtype=torch.float64))
    return module


def _worker(rank, port, layout, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, dy = _data()
        module = _init(normkernels.nn.SyncBatchNorm(5).double())
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        # this rank's share: 2 samples on rank 0, 4 on rank 1 (unequal on purpose)
        part = slice(0, 2) if rank == 0 else slice(2, 6)
        xi = x[part].detach().requires_grad_()
        for _ in range(2):
            y = module(xi)
            gx, gw, gb = torch.autograd.grad(y, (xi, module.weight, module.bias), dy[part])
        for t in (gw, gb):
            dist.all_reduce(t)  # what DDP would do with the local parameter gradients (sum)
        results[rank] = (y.detach(), gx, gw, gb, module.running_mean.clone(), module.running_var.clone())
        dist.barrier()  # both ranks done before either tears down (see tests/test_dtensor.py)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sync_batch_norm_matches_whole_batch(layout):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), layout, results), nprocs=WORLD, join=True)

    x, dy = _data()
    ref = _init(torch.nn.BatchNorm2d(5).double())
    xr = x.detach().requires_grad_()
    for _ in range(2):
        y = ref(xr)
        gx, gw, gb = torch.autograd.grad(y, (xr, ref.weight, ref.bias), dy)
    y0, gx0, gw0, gb0, rm0, rv0 = results[0]
    y1, gx1, gw1, gb1, rm1, rv1 = results[1]
    torch.testing.assert_close(torch.cat([y0, y1]), y)
    torch.testing.assert_close(torch.cat([gx0, gx1]), gx)
    torch.testing.assert_close(gw0, gw)
    torch.testing.assert_close(gb0, gb)
    for rm, rv in ((rm0, rv0), (rm1, rv1)):
        torch.testing.assert_close(rm, ref.running_mean)
        torch.testing.assert_close(rv, ref.running_var)
