"""DTensor: our ops under sharded inputs (normkernels/_sharding.py), two processes (gloo on
loopback), against torch.nn.functional on the whole tensors: outputs, every gradient, running
statistics; that our kernels ran on the local shards (not an ATen decomposition); and which
placements come out (sharded where the rule keeps x sharded, partial parameter gradients)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import normkernels
import normkernels.functional as NF

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _OpsSeen(TorchDispatchMode):
    """The ops dispatched, DTensor's and the local shards' alike."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ours_ran(seen, fwd, bwd):
    assert f"normkernels.{fwd}" in seen and f"normkernels.{bwd}" in seen, seen
    assert not any(n.startswith("aten.native_") and "norm" in n for n in seen), seen


def _check(fn_ours, fn_torch, full, placements, params, mesh, expect_y, expect_param_grads,
           **tolerance):
    """Runs fn_ours on DTensors (x with `placements`, params replicated or as given) and
    fn_torch on the whole tensors; compares y and every gradient."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    g = torch.Generator().manual_seed(1)
    dy = torch.randn(full.shape, dtype=full.dtype, generator=g)
    xd = distribute_tensor(full, mesh, placements).requires_grad_()
    dyd = distribute_tensor(dy, mesh, placements)
    pd = [None if p is None else distribute_tensor(p, mesh, pl or [Replicate()]).requires_grad_()
          for p, pl in params]
    with _OpsSeen() as mode:
        y = fn_ours(xd, *pd)
        grads = torch.autograd.grad(y, [xd] + [p for p in pd if p is not None], dyd)
    xr = full.clone().requires_grad_()
    pr = [None if p is None else p.clone().requires_grad_() for p, _ in params]
    yr = fn_torch(xr, *pr)
    ref = torch.autograd.grad(yr, [xr] + [p for p in pr if p is not None], dy)
    assert tuple(y.placements) == tuple(expect_y), y.placements
    torch.testing.assert_close(y.full_tensor(), yr, **tolerance)
    for k, (got, want) in enumerate(zip(grads, ref)):
        if k > 0:
            assert tuple(got.placements) == tuple(expect_param_grads), got.placements
        torch.testing.assert_close(got.full_tensor(), want, **tolerance)
    return mode.names


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.tensor import DeviceMesh, Partial, Replicate, Shard, distribute_tensor

        mesh = DeviceMesh("cpu", list(range(WORLD)))
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
        # layer norm, x [batch 2, sequence 5, hidden 8] split along the sequence (3 and 2 rows:
        # uneven), as sequence parallelism splits it: y and dx stay split, dweight/dbias partial
        x, w, b = rnd(2, 5, 8) * 2 + 1, rnd(8), rnd(8)
        seen = _check(lambda x, w, b: NF.layer_norm(x, (8,), w, b),
                      lambda x, w, b: F.layer_norm(x, (8,), w, b),
                      x, [Shard(1)], [(w, None), (b, None)], mesh, [Shard(1)], [Partial()])
        _ours_ran(seen, "layer_norm_fwd", "layer_norm_bwd")
        # split along the normalized dim: gathered first, the result replicated
        _check(lambda x, w, b: NF.layer_norm(x, (8,), w, b),
               lambda x, w, b: F.layer_norm(x, (8,), w, b),
               x, [Shard(2)], [(w, None), (b, None)], mesh, [Replicate()], [Replicate()])
        # RMS norm over two dims, split along the batch; no bias
        x, w = rnd(5, 4, 6), rnd(4, 6)
        seen = _check(lambda x, w: NF.rms_norm(x, (4, 6), w, 1e-6),
                      lambda x, w: F.rms_norm(x, (4, 6), w, 1e-6),
                      x, [Shard(0)], [(w, None)], mesh, [Shard(0)], [Partial()])
        _ours_ran(seen, "layer_norm_fwd", "layer_norm_bwd")
        # group norm split along the batch (3 and 2 samples)
        x, w, b = rnd(5, 6, 3, 3), rnd(6), rnd(6)
        seen = _check(lambda x, w, b: NF.group_norm(x, 3, w, b),
                      lambda x, w, b: F.group_norm(x, 3, w, b),
                      x, [Shard(0)], [(w, None), (b, None)], mesh, [Shard(0)], [Partial()])
        _ours_ran(seen, "group_norm_fwd", "group_norm_bwd")
        # bf16 and channels_last (each rank's shard a channels_last tensor of its own), against
        # ours on the whole tensor (bf16 against torch is test_parity's): y and dx the same
        # per-sample kernels, dweight/dbias two bf16 partial sums added (a rounding each)
        xh = rnd(5, 6, 3, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        wh, bh = rnd(6).to(torch.bfloat16), rnd(6).to(torch.bfloat16)
        _check(lambda x, w, b: NF.group_norm(x, 3, w, b),
               lambda x, w, b: NF.group_norm(x, 3, w, b),
               xh, [Shard(0)], [(wh, None), (bh, None)], mesh, [Shard(0)], [Partial()],
               rtol=1.6e-2, atol=1e-2)
        # batch norm, training, split along the channels (weight, bias and running statistics
        # too): per-channel statistics need nothing from the other rank
        x, w, b = rnd(4, 6, 3, 3) * 3 - 1, rnd(6), rnd(6)
        rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
        rmd, rvd = (distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in (rm, rv))
        seen = _check(lambda x, w, b: NF.batch_norm(x, rmd, rvd, w, b, True, 0.1, 1e-5),
                      lambda x, w, b: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                      x, [Shard(1)], [(w, [Shard(0)]), (b, [Shard(0)])], mesh, [Shard(1)],
                      [Shard(0)])
        _ours_ran(seen, "batch_norm_fwd", "batch_norm_bwd")
        torch.testing.assert_close(rmd.full_tensor(), rm)
        torch.testing.assert_close(rvd.full_tensor(), rv)
        # training, split along the batch: the statistics are the whole batch's (x gathered)
        rm2, rv2 = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
        rmd2, rvd2 = (distribute_tensor(t.clone(), mesh, [Replicate()]) for t in (rm2, rv2))
        _check(lambda x, w, b: NF.batch_norm(x, rmd2, rvd2, w, b, True, 0.1, 1e-5),
               lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5),
               x, [Shard(0)], [(w, None), (b, None)], mesh, [Replicate()], [Replicate()])
        torch.testing.assert_close(rmd2.full_tensor(), rm2)
        torch.testing.assert_close(rvd2.full_tensor(), rv2)
        # inference, split along the batch: running statistics replicated, y stays split
        rm3, rv3 = rnd(6), rnd(6).abs() + 0.5
        rmd3, rvd3 = (distribute_tensor(t, mesh, [Replicate()]) for t in (rm3, rv3))
        with _OpsSeen() as mode:
            y = NF.batch_norm(distribute_tensor(x, mesh, [Shard(0)]), rmd3, rvd3,
                              distribute_tensor(w, mesh, [Replicate()]), None, False)
        assert "normkernels.batch_norm_infer" in mode.names, mode.names
        assert tuple(y.placements) == (Shard(0),)
        torch.testing.assert_close(y.full_tensor(), F.batch_norm(x, rm3, rv3, w, None, False))
        # a module whose parameters were distributed (replicated), called on a split input
        ln = normkernels.nn.LayerNorm(8).double()
        ref = torch.nn.LayerNorm(8).double()
        from torch.distributed.tensor import distribute_module

        distribute_module(ln, mesh)
        x = rnd(2, 6, 8)
        y = ln(distribute_tensor(x, mesh, [Shard(1)]))
        torch.testing.assert_close(y.full_tensor(), ref(x).detach())
        # sequence parallelism (torch's tensor-parallel API) on a converted model: each rank
        # holds its part of the sequence, the norms' parameters replicated
        from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

        model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)).double()
        ref = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)).double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(rnd(*p.shape))
        ref.load_state_dict(model.state_dict())
        normkernels.convert(model)
        parallelize_module(model, mesh, {"0": SequenceParallel(), "1": SequenceParallel()})
        part = slice(0, 3) if rank == 0 else slice(3, 5)  # 5 positions: 3 and 2
        x = rnd(2, 5, 8)
        xl = x[:, part].clone().requires_grad_()
        with _OpsSeen() as mode:
            y = model(xl)
            y.to_local().sum().backward()
        _ours_ran(mode.names, "layer_norm_fwd", "layer_norm_bwd")
        xr = x.clone().requires_grad_()
        ref(xr).sum().backward()
        torch.testing.assert_close(y.to_local(), ref(x)[:, part].detach())
        torch.testing.assert_close(xl.grad, xr.grad[:, part])
        for ours, theirs in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(ours.grad.full_tensor(), theirs.grad)
        # every rank done communicating before either tears down (gloo aborted the process now
        # and then when one rank destroyed its group while the other was still in a collective)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_dtensor_runs_our_kernels_on_local_shards():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        from torch.distributed.tensor.experimental import register_sharding  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no torch.distributed.tensor.experimental.register_sharding")
    # A worker killed by SIGABRT is gloo's teardown, not a failed check (a check that fails raises
    # in the worker, and spawn raises ProcessRaisedException): "terminate called without an active
    # exception", once in about a dozen runs of the suite in one session, the barrier above
    # notwithstanding. So that death alone gets one more try, on a fresh port.
    for attempt in range(2):
        try:
            mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
            return
        except mp.ProcessExitedException as e:
            if attempt == 1 or e.signal_name != "SIGABRT":
                raise


def test_rules_registered_when_dtensor_is_imported_after_us():
    """normkernels first, torch.distributed.tensor later (as a tensor-parallel script does): the
    rules are there before any of our calls, so a direct op call (or a compiled model's first
    call, which never runs functional's eager check) runs our kernel, not the decomposition.
    In a fresh interpreter: this one has imported DTensor already."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    code = (
        "import sys, torch, normkernels\n"
        "from normkernels import _sharding\n"
        "assert not _sharding._registered and 'torch.distributed.tensor' not in sys.modules\n"
        "import torch.distributed.tensor as dt\n"
        "assert _sharding._registered\n"
        "funcs = dt.DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs\n"
        "ops = torch.ops.normkernels\n"
        "names = ['layer_norm_fwd', 'layer_norm_bwd', 'group_norm_fwd', 'group_norm_bwd',\n"
        "         'batch_norm_fwd', 'batch_norm_infer', 'batch_norm_bwd']\n"
        "assert all(getattr(ops, n).default in funcs for n in names)\n"
        "assert not any(getattr(f, 'name', None) == dt.__name__ for f in sys.meta_path)\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
