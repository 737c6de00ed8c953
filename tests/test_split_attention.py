"""Our split-attention conv equals a literal, cardinality-major implementation of the paper's equations
(Zhang et al. 2020, section 3.2), written here from the paper, using the module's weights."""
import copy

import pytest
import torch
from torch.nn import functional as F

from resnest_backbone.core import SplitAttentionConv2d
from resnest_backbone.core import split_attention as sa
from resnest_backbone.core.radix import split_pool, split_sum
from conftest import randomize_norm_stats


def paper_split_attention(m: SplitAttentionConv2d, x: torch.Tensor) -> torch.Tensor:
    """For each cardinal group k and split r (conv group index g = r*K + k in the radix-major layout):
        U_{k,r} = relu(bn0(conv_g(x_g)))                      the split's feature map
        s_k     = GAP(sum_r U_{k,r})                           global context of cardinal group k
        z_k     = relu(bn1(fc1_k(s_k)))                        (fc1 grouped by cardinality)
        a_k     = softmax_r(fc2_k(z_k))  (sigmoid if R == 1)   attention of group k over its splits
        V_k     = sum_r a_{k,r} * U_{k,r}
    and the output concatenates V_1..V_K. Everything is indexed per (k, r) explicitly."""
    K, R, C = m.cardinality, m.radix, m.channels
    c_k = C // K  # channels per cardinal group in the output
    in_g = x.shape[1] // (K * R)  # input channels per conv group
    w = m.conv.weight  # (R*K*c_k, in_g, kh, kw), conv group g owns rows g*c_k:(g+1)*c_k
    bn0, bn1 = m.bn0, m.bn1
    inter_k = m.fc1.out_channels // K
    outputs = []
    for k in range(K):
        U = []
        for r in range(R):
            g = r * K + k
            rows = slice(g * c_k, (g + 1) * c_k)
            u = F.conv2d(x[:, g * in_g:(g + 1) * in_g], w[rows], None, m.conv.stride, m.conv.padding,
                         m.conv.dilation)
            u = (u - bn0.running_mean[rows, None, None]) / torch.sqrt(bn0.running_var[rows, None, None] + bn0.eps)
            u = F.relu(u * bn0.weight[rows, None, None] + bn0.bias[rows, None, None])
            U.append(u)
        s_k = sum(U).mean(dim=(2, 3))  # (B, c_k)
        fc1_rows = slice(k * inter_k, (k + 1) * inter_k)
        z = s_k @ m.fc1.weight[fc1_rows, :, 0, 0].T + m.fc1.bias[fc1_rows]
        z = (z - bn1.running_mean[fc1_rows]) / torch.sqrt(bn1.running_var[fc1_rows] + bn1.eps)
        z = F.relu(z * bn1.weight[fc1_rows] + bn1.bias[fc1_rows])
        # fc2 group k produces R*c_k logits ordered (r, c) within the group.
        fc2_rows = slice(k * R * c_k, (k + 1) * R * c_k)
        logits = (z @ m.fc2.weight[fc2_rows, :, 0, 0].T + m.fc2.bias[fc2_rows]).view(-1, R, c_k)
        a = torch.softmax(logits, dim=1) if R > 1 else torch.sigmoid(logits)
        outputs.append(sum(a[:, r, :, None, None] * U[r] for r in range(R)))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("radix,cardinality", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (1, 4), (3, 2)])
def test_equals_paper_equations(radix, cardinality):
    torch.manual_seed(radix * 10 + cardinality)
    channels = 24 * cardinality
    m = SplitAttentionConv2d(channels, channels, 3, 1, 1, cardinality=cardinality, radix=radix,
                             norm_layer=torch.nn.BatchNorm2d)
    m = randomize_norm_stats(m).eval()
    with torch.no_grad():
        m.fc1.bias.normal_()
        m.fc2.bias.normal_()
    x = torch.randn(2, channels, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(m(x), paper_split_attention(m, x), rtol=1e-5, atol=1e-5)


def test_cardinal_groups_do_not_mix():
    """Changing the input of cardinal group 0 only must leave group 1's output unchanged."""
    torch.manual_seed(0)
    m = SplitAttentionConv2d(32, 32, 3, 1, 1, cardinality=2, radix=2, norm_layer=torch.nn.BatchNorm2d).eval()
    x = torch.randn(1, 32, 8, 8)
    y = x.clone()
    # Input channels of conv groups g = r*K + k with k = 0: groups 0 and 2 (8 channels each).
    y[:, 0:8] += 1.0
    y[:, 16:24] += 1.0
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, 16:], b[:, 16:])
    assert not torch.allclose(a[:, :16], b[:, :16])


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="radix"):
        SplitAttentionConv2d(32, 32, radix=0)
    with pytest.raises(ValueError, match="divisible"):
        SplitAttentionConv2d(30, 30, cardinality=4, radix=2)


def _plain_pool(x: torch.Tensor, radix: int) -> torch.Tensor:
    """The global context with autograd's own backward (what split_pool's custom backward replaces)."""
    return F.adaptive_avg_pool2d(split_sum(x, radix) if radix > 1 else x, 1)


@pytest.mark.parametrize("radix", [1, 2, 3, 4])
def test_split_sums_are_the_official_sums_in_every_layout(radix):
    """split_sum and split_pool compute the official code's expressions bit for bit (sum(torch.split(...)),
    sum([att * split ...]), then adaptive_avg_pool2d) on the same input, NCHW or channels_last, and keep its
    layout."""
    torch.manual_seed(radix)
    weights = torch.softmax(torch.randn(2, radix, 6, 1, 1), 1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, radix * 6, 5, 7).relu().contiguous(memory_format=fmt)
        splits = torch.split(x, 6, dim=1)
        official_sum = sum(splits)
        official_weighted = sum([w * s for w, s in zip(torch.split(weights.view(2, -1, 1, 1), 6, dim=1), splits)])
        assert torch.equal(split_pool(x, radix), F.adaptive_avg_pool2d(official_sum if radix > 1 else x, 1))
        if radix > 1:
            for out, ref in ((split_sum(x, radix), official_sum), (split_sum(x, radix, weights), official_weighted)):
                assert torch.equal(out, ref) and out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("radix", [1, 2, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_pool_gradient_is_autograds(radix, channels_last):
    """split_pool's backward (a broadcast view) gives autograd's gradient: gradcheck in float64 (first and
    second order), and, in a whole training-mode block, every parameter's gradient equal to the plain ops'."""
    torch.manual_seed(radix)
    x = torch.randn(2, radix * 3, 5, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    torch.autograd.gradcheck(lambda t: split_pool(t, radix), (x,))
    torch.autograd.gradgradcheck(lambda t: split_pool(t, radix) ** 2, (x,))
    torch.testing.assert_close(split_pool(x, radix), _plain_pool(x, radix), rtol=0, atol=0)

    m = SplitAttentionConv2d(16, 16, 3, 1, 1, cardinality=2 if radix < 4 else 1, radix=radix,
                             norm_layer=torch.nn.BatchNorm2d).train()
    inp = torch.randn(3, 16, 12, 10)
    if channels_last:
        m, inp = m.to(memory_format=torch.channels_last), inp.contiguous(memory_format=torch.channels_last)
    grads = []
    for pool in (split_pool, _plain_pool):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sa, "split_pool", pool)
            m.zero_grad(set_to_none=True)
            out = m(inp.clone().requires_grad_())
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_split_pool_backward_is_a_broadcast_view():
    """The gradient split_pool sends back is not materialised: stride 0 over the pixels (what saves a copy
    and an add of a full-size tensor per block); the plain ops' is a full tensor."""
    seen = {}
    for name, pool in (("split_pool", split_pool), ("plain", _plain_pool)):
        x = torch.randn(2, 8, 6, 5, requires_grad=True)
        y = x * 1.0  # an intermediate whose hook sees the gradient as sent
        y.register_hook(lambda g, name=name: seen.__setitem__(name, g.stride()))
        pool(y, 2).sum().backward()
    assert seen["split_pool"][2:] == (0, 0)
    assert 0 not in seen["plain"]


def test_split_pool_under_tracing_and_scripting_is_the_plain_ops():
    """jit.trace records plain ops (no Python autograd.Function in the graph); scripted modules take the
    plain branch; both give the same outputs as eager, with gradients flowing."""
    m = SplitAttentionConv2d(16, 16, 3, 1, 1, radix=2, norm_layer=torch.nn.BatchNorm2d).eval()
    x = torch.randn(1, 16, 8, 8)
    traced = torch.jit.trace(m, x, check_trace=False)
    assert "PythonOp" not in str(traced.inlined_graph)
    scripted = torch.jit.script(m)
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(traced(x), ref)
        torch.testing.assert_close(scripted(x), ref)
    scripted.train()(x.requires_grad_()).sum().backward()
    assert m.conv.weight.grad is not None


@pytest.mark.slow  # inductor codegen of a forward and a backward: about 3 minutes on 2 shared cores
def test_compiled_training_with_dynamic_shapes():
    """torch.compile(dynamic=True) trains a channels_last split-attention block at two input sizes (detection
    sizes vary per batch): the split sums take a form that inductor can order with symbolic strides (the
    permuted view stopped it: "cannot determine truth value of Relational"). Outputs equal eager's; gradients
    are as close to a float64 reference as eager channels_last's own. One block, not a trunk: the trunk adds
    only convolutions and norms, and compiling resnest14d took 12 minutes of inductor codegen on one CPU."""
    torch.manual_seed(0)
    m = SplitAttentionConv2d(32, 32, 3, 1, 1, cardinality=2, radix=2, norm_layer=torch.nn.BatchNorm2d)
    m = randomize_norm_stats(m).train().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(m)
    exact = copy.deepcopy(m).double()
    compiled = torch.compile(m, dynamic=True)

    def err(model):  # the largest gradient error to float64, relative to each gradient's scale
        scale = max(p.grad.abs().max().item() for p in exact.parameters())
        got = dict(model.named_parameters())
        return max((got[n].grad.double() - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-3 * scale)
                   for n, p in exact.named_parameters())

    for hw in ((12, 20), (20, 12)):
        x = torch.randn(2, 32, *hw)
        outs = {}
        for name, model, inp in (("compiled", compiled, x.contiguous(memory_format=torch.channels_last)),
                                 ("eager", eager, x.contiguous(memory_format=torch.channels_last)),
                                 ("exact", exact, x.double())):
            out = model(inp)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            outs[name] = out.detach()
        assert outs["compiled"].is_contiguous(memory_format=torch.channels_last)
        assert (outs["compiled"] - outs["eager"]).abs().max() <= 1e-5 * outs["eager"].abs().max()
        assert err(m) <= 2 * err(eager) + 1e-5, (err(m), err(eager))
        for model in (m, eager, exact):
            model.zero_grad(set_to_none=True)
