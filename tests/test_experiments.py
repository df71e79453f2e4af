"""The seed experiments, as tests: BatchNorm keeps activation scale through a 100-layer MLP, and
a LeNet with BatchNorm after every layer trains on a real dataset to torch's accuracy."""
import copy

import pytest
import torch
from torch import nn

import normkernels


def _deep_mlp(depth=100, width=256):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers)


def _activation_stds(model, x):
    stds = []
    for layer in model:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            stds.append(x.std().item())
    return torch.tensor(stds)


def test_hundred_layer_mlp_keeps_activation_scale():
    torch.manual_seed(0)
    plain = _deep_mlp()
    ours = normkernels.convert(copy.deepcopy(plain))
    x = torch.randn(16, 256)
    ref = copy.deepcopy(plain).double()
    with torch.no_grad():
        s_plain, s_ours = _activation_stds(plain, x), _activation_stds(ours, x)
        s_ref = _activation_stds(ref, x.double()).float()
    # after BN + ReLU a unit-variance activation has std sqrt((1 - 1/pi) / 2) ~ 0.58 at every depth
    assert s_ours.min() > 0.45 and s_ours.max() < 0.7, s_ours
    # fp32 rounding grows through 100 layers in torch and in ours alike (both end ~1e-2 off the
    # fp64 run): tight on the first layers, and the same order as torch's drift on the last.
    torch.testing.assert_close(s_ours[:30], s_ref[:30], atol=1e-4, rtol=1e-4)
    drift_ours = (s_ours - s_ref).abs().max().item()
    drift_torch = (s_plain - s_ref).abs().max().item()
    assert drift_ours <= max(3 * drift_torch, 5e-3), (drift_ours, drift_torch)
    # without normalization the same network's activations collapse
    with torch.no_grad():
        h = x
        for layer in plain:
            if not isinstance(layer, nn.BatchNorm1d):
                h = layer(h)
    assert h.std() < 1e-3 * s_plain[-1]


def _lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 120), nn.BatchNorm1d(120), nn.ReLU(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def _train_and_score(model, xs, ys, xt, yt, epochs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs) - 1, 64):
            idx = perm[i : i + 64]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xt).argmax(1) == yt).float().mean().item()


def test_lenet_with_batchnorm_trains_on_digits_like_torch():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    plain = _lenet()
    ours = normkernels.convert(copy.deepcopy(plain))
    acc_plain = _train_and_score(plain, x[train], y[train], x[test], y[test])
    acc_ours = _train_and_score(ours, x[train], y[train], x[test], y[test])
    assert acc_ours >= 0.93, acc_ours
    assert abs(acc_ours - acc_plain) <= 0.02, (acc_ours, acc_plain)
