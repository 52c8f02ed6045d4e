"""AMM: Gaussian modulation against hand-computed numbers, gates, per-sample independence."""
import math

import pytest
import torch
import torch.nn.functional as F

from amrseg.config import AMMConfig
from amrseg.models.amm import AMM, ChannelGate, SpatialGate, gaussian_modulation

# Two samples with the same shape of distribution at different scales: per-sample statistics
# give both the same modulation. Sample 0: mu = 2.5, unbiased sigma = sqrt(5/3).
Z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
# exp(-(z - mu)^2 / (2 sigma^2)): (z - mu)^2 is 2.25 or 0.25, 2 sigma^2 = 10/3.
OUTER, INNER = math.exp(-2.25 * 3 / 10), math.exp(-0.25 * 3 / 10)  # 0.50916, 0.92774


def test_unit_gaussian_by_hand():
    g = gaussian_modulation(Z, dims=(1,), eps=0.0)
    expected = torch.tensor([[OUTER, INNER, INNER, OUTER]] * 2)
    torch.testing.assert_close(g, expected)
    assert abs(OUTER - 0.5091564) < 1e-6 and abs(INNER - 0.9277435) < 1e-6
    # The default eps (1e-6 on sigma) moves the values by far less than 1e-5.
    torch.testing.assert_close(gaussian_modulation(Z, dims=(1,)), expected, atol=1e-5, rtol=0)


def test_pdf_gaussian_by_hand():
    g = gaussian_modulation(Z[:1], dims=(1,), mode="pdf", eps=0.0)
    norm = math.sqrt(2 * math.pi) * math.sqrt(5 / 3)
    torch.testing.assert_close(g, torch.tensor([[OUTER, INNER, INNER, OUTER]]) / norm)


def test_threshold_zeroes_below_and_keeps_at_or_above():
    g = gaussian_modulation(Z, dims=(1,), threshold=0.6, eps=0.0)
    torch.testing.assert_close(g, torch.tensor([[0.0, INNER, INNER, 0.0]] * 2))
    plain = gaussian_modulation(Z, dims=(1,), eps=0.0)
    tau = plain[0, 0].item()  # exactly the outer value: kept
    g = gaussian_modulation(Z, dims=(1,), threshold=tau, eps=0.0)
    assert torch.equal(g, plain)
    g = gaussian_modulation(Z, dims=(1,), threshold=INNER + 1e-4, eps=0.0)
    assert torch.count_nonzero(g) == 0


def test_batch_statistics_differ_from_sample_statistics():
    batch = gaussian_modulation(Z, dims=(1,), stats="batch", eps=0.0)
    values = Z.flatten().tolist()
    mu = sum(values) / 8
    var = sum((v - mu) ** 2 for v in values) / 7
    expected = torch.tensor([[math.exp(-((v - mu) ** 2) / (2 * var)) for v in row] for row in Z.tolist()])
    torch.testing.assert_close(batch, expected)
    assert not torch.allclose(batch, gaussian_modulation(Z, dims=(1,), stats="sample", eps=0.0))


def test_constant_input_is_finite():
    z = torch.full((2, 3, 4, 4), 0.3)
    unit = gaussian_modulation(z, dims=(1, 2, 3))
    torch.testing.assert_close(unit, torch.ones_like(z))
    assert torch.isfinite(gaussian_modulation(z, dims=(1, 2, 3), mode="pdf")).all()
    assert torch.isfinite(gaussian_modulation(torch.ones(2, 1, 1, 1), dims=(1, 2, 3))).all()  # n = 1


def test_no_gradient_through_statistics():
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64)
    eps = 1e-3
    g = gaussian_modulation(z, dims=(1,), eps=eps)
    (g * w).sum().backward()
    zd = z.detach()
    mu = zd.mean(1, keepdim=True)
    sigma = zd.std(1, keepdim=True) + eps
    # d/dz exp(-(z - mu)^2 / (2 s^2)) with mu, s constants.
    by_hand = w * g.detach() * -(zd - mu) / sigma ** 2
    torch.testing.assert_close(z.grad, by_hand)


def test_bad_mode_or_stats():
    with pytest.raises(ValueError):
        gaussian_modulation(Z, dims=(1,), mode="gauss")
    with pytest.raises(ValueError):
        gaussian_modulation(Z, dims=(1,), stats="group")
    with pytest.raises(ValueError, match="even batch"):
        gaussian_modulation(Z[:1], dims=(1,), stats="pair")
    with pytest.raises(ValueError):
        ChannelGate(8, eval_stats="batch")


def test_channel_gate_against_reference():
    gate = ChannelGate(32, reduction=16)
    assert gate.mlp[0].out_features == 8  # C/16 = 2, raised to the minimum of 8 hidden units
    assert ChannelGate(256, reduction=16).mlp[0].out_features == 16 and ChannelGate(4).mlp[0].out_features == 4
    x = torch.randn(2, 32, 5, 6)
    l1, l2 = gate.mlp[0], gate.mlp[2]
    p = x.sum(dim=(2, 3)) / 30
    a = torch.relu(p @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    s = torch.exp(-(a - a.mean(1, keepdim=True)) ** 2 / (2 * (a.std(1, keepdim=True) + 1e-6) ** 2))
    torch.testing.assert_close(gate(x), x * s[:, :, None, None])
    assert ChannelGate(8, reduction=16).mlp[0].out_features == 8


def test_spatial_gate_against_reference():
    gate = SpatialGate().eval()
    assert gate.bn.momentum == 0.01 and gate.conv.bias is None
    with torch.no_grad():
        gate.bn.running_mean.fill_(0.2)
        gate.bn.running_var.fill_(2.0)
        gate.bn.weight.fill_(1.5)
        gate.bn.bias.fill_(-0.1)
    x = torch.randn(2, 4, 6, 6)
    q = torch.stack([x.max(dim=1).values, x.mean(dim=1)], dim=1)
    t = F.conv2d(q, gate.conv.weight, padding=3)
    t = (t - 0.2) / math.sqrt(2.0 + gate.bn.eps) * 1.5 - 0.1
    flat = t.flatten(1)
    mu, sd = flat.mean(1)[:, None, None, None], flat.std(1)[:, None, None, None] + 1e-6
    s = torch.exp(-(t - mu) ** 2 / (2 * sd ** 2))
    torch.testing.assert_close(gate(x), x * s)


def test_amm_shape_and_per_sample_independence():
    amm = AMM(16, AMMConfig(reduction=4))
    assert set(dict(amm.named_children())) == {"channel", "spatial"}
    x = torch.randn(3, 16, 7, 9)
    with torch.no_grad():
        amm.train()(x * 2 + 1)  # move the spatial BN's running statistics off their defaults
        amm.eval()
        batch = amm(x)
        assert batch.shape == x.shape
        for i in range(3):
            torch.testing.assert_close(amm(x[i:i + 1]), batch[i:i + 1], atol=1e-6, rtol=1e-5)
        # With eval_stats 'sample' (the default), batch statistics couple the images in training
        # only: in eval mode every image uses its own statistics, so inference never depends on the batch.
        release = AMM(16, AMMConfig(reduction=4, stats="batch", gaussian="pdf"))
        release.load_state_dict(amm.state_dict())
        release.eval()
        torch.testing.assert_close(release(x[:1]), release(x)[:1], atol=1e-6, rtol=1e-5)
        own = AMM(16, AMMConfig(reduction=4, stats="sample", gaussian="pdf"))
        own.load_state_dict(amm.state_dict())
        torch.testing.assert_close(release(x), own.eval()(x))


def test_amm_gtm_and_gradients():
    amm = AMM(32, AMMConfig(reduction=4, threshold=0.5))  # 8 hidden units: not all dead ReLUs
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    y = amm(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in amm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Positions whose spatial gate fell below tau are zero in every channel.
    zero = (y.detach() == 0).all(dim=1)
    assert zero.any() and not zero.all()


def test_low_precision_input_is_computed_in_float32():
    z = torch.full((2, 64), 0.3, dtype=torch.float16)
    z[:, 0] = 0.31  # sigma ~ 1e-3: sigma^2 ~ 1e-6 is near fp16's smallest normal
    g = gaussian_modulation(z, dims=(1,))
    assert g.dtype == torch.float16
    torch.testing.assert_close(g.float(), gaussian_modulation(z.float(), dims=(1,)), atol=1e-3, rtol=1e-3)
    bf = gaussian_modulation(torch.full((1, 3, 4, 4), 0.3, dtype=torch.bfloat16), dims=(1, 2, 3), mode="pdf")
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()


def test_pair_statistics_by_hand():
    # rows 0, 1 form a pair and rows 2, 3 another: each pair's 8 values give mu and the unbiased sigma
    z = torch.cat([Z, Z * 3 - 1])
    g = gaussian_modulation(z, dims=(1,), stats="pair", eps=0.0)
    for rows in ([0, 1], [2, 3]):
        values = z[rows].flatten().tolist()
        mu = sum(values) / 8
        var = sum((v - mu) ** 2 for v in values) / 7
        expected = torch.tensor([[math.exp(-((v - mu) ** 2) / (2 * var)) for v in row] for row in z[rows].tolist()])
        torch.testing.assert_close(g[rows], expected)
    # a pair is the batch of two: equal to batch statistics on it alone
    torch.testing.assert_close(g[2:], gaussian_modulation(z[2:], dims=(1,), stats="batch", eps=0.0))


def test_amm_pair_mode_is_the_release_batch_of_two():
    """eval_stats 'pair': at inference each (image, flip) pair is normalised as the release's training-mode AMM
    normalises a batch of two, whatever else shares the forward pass; running statistics stay put."""
    cfg = AMMConfig(reduction=4, gaussian="pdf", stats="batch", eval_stats="pair")
    amm = AMM(16, cfg)
    with torch.no_grad():
        amm.train()(torch.randn(6, 16, 7, 9) * 2 + 1)  # running statistics off their defaults
    amm.eval()
    x = torch.randn(3, 16, 7, 9)
    pairs = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # image, flip, image, flip, ...
    running = amm.spatial.bn.running_mean.clone(), amm.spatial.bn.running_var.clone()
    with torch.no_grad():
        batched = amm(pairs)
        release = AMM(16, cfg)
        release.load_state_dict(amm.state_dict())
        release.train()  # the release never leaves training mode: BN and Gaussian over the batch of two
        for i in range(3):
            torch.testing.assert_close(batched[2 * i:2 * i + 2], amm(pairs[2 * i:2 * i + 2]), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(batched[2 * i:2 * i + 2], release(pairs[2 * i:2 * i + 2]), atol=1e-6, rtol=1e-5)
        assert torch.equal(amm.spatial.bn.running_mean, running[0]) and torch.equal(amm.spatial.bn.running_var, running[1])
        # a ResNet feature map is not flip-symmetric: per-image statistics give other values
        own = AMM(16, AMMConfig(reduction=4, gaussian="pdf", stats="batch"))
        own.load_state_dict(amm.state_dict())
        assert (own.eval()(pairs) - batched).abs().max() > 1e-3
    with pytest.raises(ValueError, match="even batch"):
        amm(x)


def test_pair_mode_gradients_flow_through_the_pair_statistics_of_bn():
    """In the climb of advcam the release's BN is in training mode: the input gradient runs through its batch
    statistics (the Gaussian's mu, sigma are detached in both)."""
    torch.manual_seed(2)
    cfg = AMMConfig(reduction=4, stats="batch", eval_stats="pair")
    amm = AMM(8, cfg).eval()
    release = AMM(8, cfg)
    release.load_state_dict(amm.state_dict())
    release.train()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    (g1,) = torch.autograd.grad((amm.double()(x) * w).sum(), x)
    (g2,) = torch.autograd.grad((release.double()(x) * w).sum(), x)
    torch.testing.assert_close(g1, g2)
