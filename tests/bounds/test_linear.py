"""The batched linear bounds (live-neuron compression, chunks, pairs, regrouping, zonotopes, reused boxes)
equal a plain per-input, per-neuron computation of the same bounds (Weng et al., AAAI 2020, Theorem 0.1),
and every box they use contains the pre-activations of sampled perturbed networks."""

import math

import pytest
import torch
import torch.nn.functional as F

from qrobust.bounds import ReluNetwork, SingleLayerBound, certified_eps, linear
from qrobust.bounds.interval import LayerBall, interval_margins
from qrobust.bounds.linear import following_linear_layers
from qrobust.bounds.perturbation import dual_norm

from .conftest import trained


def reference_margins(network, image, label, k, eps, norm, bias, zonotopes):
    """Margin lower bounds (classes,) of one image, written out plainly on full-width vectors.

    Boxes layer by layer: an interval step, intersected from z_2 on (if ``zonotopes``) with the box of a
    zonotope started at z_1 from the box of z_0, then for each neuron left unstable the rows of l and -u
    back-substituted together through the ReLU relaxations, concretised on the box of each relu(z_g) after
    the first, stopping once either is > 0; the margins go down to the perturbed layer's output z_0, where
    Hoelder's inequality bounds the weight ball. Every bound met is kept if better.
    """
    first, after = network.layers[k], following_linear_layers(network, k)
    padded = first.pad(network.layer_input(image.unsqueeze(0), k))
    center = first.core(padded).flatten()  # (n0,)
    patches = first.patches(padded)[0]  # (K, P)
    if bias:
        patches = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=patches.dtype)])
    q = dual_norm(norm)
    radius = eps * torch.linalg.vector_norm(patches, ord=q, dim=0)  # (P,): the same for every output channel
    boxes = [(center - radius.repeat(first.weight.shape[0]), center + radius.repeat(first.weight.shape[0]))]

    def hoelder(lam):  # min of lam . z_0 over the weight ball
        grads = lam.view(first.weight.shape[0], -1) @ patches.t()  # (O, K): G_o = sum_p lam_{o,p} [patch_p, 1]
        return lam @ center - eps * torch.linalg.vector_norm(grads, ord=q, dim=1).sum()

    def bound(rows, consts, g, stop):  # best lower bounds of rows . relu(z_g) + consts, rows (S, n_g)
        best = torch.full((len(rows),), -math.inf, dtype=rows.dtype)
        concretise = not stop
        while True:
            lower, upper = boxes[g]
            if concretise:
                value = consts + rows @ F.relu(lower) + rows.clamp(max=0) @ (F.relu(upper) - F.relu(lower))
                best = torch.maximum(best, value)
                if stop and bool((best > 0).any()):
                    return best
            concretise = True
            unstable = (lower < 0) & (upper > 0)
            slope_up = torch.where(unstable, upper / (upper - lower), (lower >= 0).double())
            slope_low = torch.where(unstable, (upper > -lower).double(), (lower >= 0).double())
            lam = torch.where(rows >= 0, rows * slope_low, rows * slope_up)  # on z_g
            consts = consts + rows.clamp(max=0) @ torch.where(unstable, -slope_up * lower, 0.0)
            if g == 0:
                return torch.maximum(best, consts + torch.stack([hoelder(row) for row in lam]))
            consts, rows = consts + lam @ after[g - 1].bias, lam @ after[g - 1].weight
            g -= 1

    zonotope = None  # (center (n_h,), generators (n_h, symbols)) of z_h
    for h in range(1, len(after)):
        layer, (lower, upper) = after[h - 1], boxes[-1]
        mid, half = (F.relu(upper) + F.relu(lower)) / 2, (F.relu(upper) - F.relu(lower)) / 2
        lower, upper = layer(mid) - layer.weight.abs() @ half, layer(mid) + layer.weight.abs() @ half
        if zonotopes and h >= 2:
            if zonotope is None:  # z_1 = after[0](relu(z_0)), each relu(z_0) in its box on its own symbol
                low, high = (F.relu(bound) for bound in boxes[0])
                zonotope = (after[0]((low + high) / 2), after[0].weight * ((high - low) / 2))
            (middle, generators), (below_lower, below_upper) = zonotope, boxes[-1]
            unstable = (below_lower < 0) & (below_upper > 0)
            scale = torch.where(
                below_lower >= 0, 1.0, torch.where(unstable, below_upper / (below_upper - below_lower), 0.0)
            )
            mu = torch.where(unstable, -scale * below_lower / 2, 0.0)  # relu(z) = scale z + mu +- mu
            zonotope = (
                layer(middle * scale + mu),
                layer.weight @ torch.cat([generators * scale.unsqueeze(1), torch.diag(mu)], 1),
            )
            reach = zonotope[1].abs().sum(1)
            lower, upper = torch.maximum(lower, zonotope[0] - reach), torch.minimum(upper, zonotope[0] + reach)
        for j in torch.nonzero((lower < 0) & (upper > 0)).flatten().tolist():
            rows, consts = (
                torch.stack([layer.weight[j], -layer.weight[j]]),
                torch.stack([layer.bias[j], -layer.bias[j]]),
            )
            found = bound(rows, consts, h - 1, stop=True)
            lower[j], upper[j] = torch.maximum(lower[j], found[0]), torch.minimum(upper[j], -found[1])
        boxes.append((lower, upper))
    last = after[-1]
    margins = bound(last.weight[label] - last.weight, last.bias[label] - last.bias, len(after) - 1, stop=False)
    margins[label] = math.inf
    return margins


CASES = [
    ("mlp-4", 0, math.inf, False),
    ("mlp-4", 1, 2.0, True),
    ("mlp-3", 0, 1.0, False),
    ("conv_linear", 0, 2.0, True),
]
CASES += [("mlp-6", 0, math.inf, False), ("mlp-6", 1, 2.0, True)]  # zonotopes over several layers
DEPTHS = {"mlp-3": 3, "mlp-4": 4, "mlp-6": 6}


def case(name, k, norm, bias, digit_images):
    """The network of a case, six digit images, their predicted labels and certified radii."""
    model = trained("mlp", depth=DEPTHS[name], width=24) if name in DEPTHS else trained(name)
    network = ReluNetwork.from_model(model)
    x = digit_images[0][:6].double() / 255
    labels = network(x).argmax(1)
    return network, x, labels, certified_eps(network, x, labels, (k,), norm, bias=bias)


@pytest.mark.parametrize("zonotopes", [False, True])
@pytest.mark.parametrize("name, k, norm, bias", CASES)
def test_batched_bounds_equal_the_plain_computation(name, k, norm, bias, zonotopes, digit_images, monkeypatch):
    monkeypatch.setattr(linear, "ZONOTOPE_FROM", -1.0 if zonotopes else math.inf)  # always from z_2 on, or never
    monkeypatch.setattr(linear, "ZONOTOPE_DTYPE", torch.float64)  # as the reference (float32 is tested below)
    network, x, labels, radii = case(name, k, norm, bias, digit_images)
    assert bool((radii > 0).all())
    for scale in (0.5, 1.0, 3.0):  # below, at and above the radius: few, some and many unstable neurons
        eps = radii * scale
        expected = torch.stack(
            [
                reference_margins(network, x[i], labels[i], k, float(eps[i]), norm, bias, zonotopes)
                for i in range(len(x))
            ]
        )
        for chunk in (linear.CHUNK, 64):  # all inputs in one chunk, or a few (and regrouped) at a time
            monkeypatch.setattr(linear, "CHUNK", chunk)
            batched = SingleLayerBound(network, x, k, norm, bias).margins(eps, labels)
            torch.testing.assert_close(batched, expected, rtol=1e-9, atol=1e-12)


def test_boxes_kept_from_a_larger_radius_only_tighten_the_bounds(digit_images, monkeypatch):
    """After a call at a larger radius (not certified), a call below it reuses its boxes: never looser
    than the same bounds without them (zonotopes, which such calls skip, are left out of both)."""
    monkeypatch.setattr(linear, "ZONOTOPE_FROM", math.inf)
    network = ReluNetwork.from_model(trained("mlp", depth=4, width=24))
    images, _ = digit_images
    x = images[:6].double() / 255
    labels = network(x).argmax(1)
    radii = certified_eps(network, x, labels, (0,))
    single = SingleLayerBound(network, x, 0, math.inf, False)
    assert bool((single.margins(radii * 3, labels).amin(1) <= 0).all())
    reused = single.margins(radii * 0.9, labels)
    fresh = SingleLayerBound(network, x, 0, math.inf, False).margins(radii * 0.9, labels)
    finite = torch.isfinite(fresh)
    assert bool((reused[finite] >= fresh[finite] - 1e-12).all())


@pytest.mark.parametrize("zonotopes", [False, True])
@pytest.mark.parametrize("k", [0, 2])
def test_every_box_contains_sampled_pre_activations(k, zonotopes, digit_images, monkeypatch):
    """The boxes of z_0, z_1, ... (interval steps, zonotopes, back-substitution) hold the pre-activations of
    networks with sampled weights of layer k in the ball, box corners included, below and above the radius."""
    monkeypatch.setattr(linear, "ZONOTOPE_FROM", -1.0 if zonotopes else math.inf)
    network = ReluNetwork.from_model(trained("mlp", depth=6, width=24))
    images, _ = digit_images
    x = images[:3].double() / 255
    labels = network(x).argmax(1)
    radii = certified_eps(network, x, labels, (k,))
    generator = torch.Generator().manual_seed(k)
    weight = network.layers[k].weight
    for scale in (1.0, 3.0):
        eps = radii * scale
        single = SingleLayerBound(network, x, k, math.inf, False)
        levels = single._levels(
            linear._Batch(eps, single.z_center, single.patches, single.patch_norms), torch.arange(len(x))
        )
        for i in range(len(x)):
            corners = torch.randint(0, 2, (1000, *weight.shape), generator=generator).double() * 2 - 1
            uniform = torch.rand(1000, *weight.shape, generator=generator, dtype=torch.float64) * 2 - 1
            deltas = torch.cat([corners, uniform]) * float(eps[i])
            z = (weight + deltas) @ network.layer_input(x[i : i + 1], k).flatten() + network.layers[k].bias  # (S, n_0)
            for g, level in enumerate(levels):
                if g:
                    z = single.after[g - 1](F.relu(z))
                assert bool((z >= level.lower[i] - 1e-9).all() and (z <= level.upper[i] + 1e-9).all()), (
                    f"z_{g} left its box"
                )


@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
def test_float32_zonotopes_contain_the_exact_ones(scale, digit_images, monkeypatch):
    """Zonotopes stored in float32 widen their boxes by a bound on the rounding: each box contains the box
    of the same zonotope in float64, on a 6-layer MLP with weights spread over 12 orders of magnitude."""
    torch.manual_seed(0)
    network = ReluNetwork.from_model(trained("mlp", depth=6, width=24))
    for layer in network.layers:
        layer.weight.mul_(10 ** (torch.rand(layer.weight.shape, dtype=torch.float64) * 12 - 6))
    images, _ = digit_images
    x = images[:4].double() / 255
    single = SingleLayerBound(network, x, 0, math.inf, False)
    eps = torch.full((len(x),), 1e-3 * scale, dtype=torch.float64)
    levels = single._levels(
        linear._Batch(eps, single.z_center, single.patches, single.patch_norms), torch.arange(len(x))
    )
    boxes = {}
    for dtype in (torch.float32, torch.float64):
        monkeypatch.setattr(linear, "ZONOTOPE_DTYPE", dtype)
        zonotope = linear._Zonotope(single.after[0], levels[0].lower, levels[0].upper)
        found = [zonotope.bounds()]
        for g in range(1, len(levels)):
            zonotope.step(single.after[g], levels[g].lower, levels[g].upper)
            found.append(zonotope.bounds())
        boxes[dtype] = found
    widened = 0.0
    for (lower32, upper32), (lower64, upper64) in zip(boxes[torch.float32], boxes[torch.float64]):
        assert bool((lower32 <= lower64).all() and (upper32 >= upper64).all())
        widened = max(widened, float(((lower64 - lower32) / (upper64 - lower64)).max()))
    assert 0 < widened < 1e-3  # widened, by a little


@pytest.mark.parametrize("name, k, norm, bias", CASES)
def test_linear_bounds_are_never_looser_than_interval_bounds(name, k, norm, bias, digit_images):
    """certified_eps uses linear bounds alone: they are at least the interval ones, below and above the radius."""
    network, x, labels, radii = case(name, k, norm, bias, digit_images)
    for scale in (0.3, 1.0, 3.0, 30.0):
        eps = radii * scale
        balls = {k: LayerBall(eps, norm, bias)}
        interval = interval_margins(network, x, labels, balls)
        finite = torch.isfinite(interval)
        linear_bounds = SingleLayerBound(network, x, k, norm, bias).margins(eps, labels)
        assert bool((linear_bounds[finite] >= interval[finite] - 1e-12).all())


@pytest.mark.parametrize("name, k, norm, bias", [*CASES, ("mlp-4", 3, math.inf, True)])
def test_descent_is_the_slope_of_the_bounds_at_zero(name, k, norm, bias, digit_images):
    """Far below the radius no neuron is unstable and the bounds are the line exact - eps * descent."""
    network, x, labels, radii = case(name, k, norm, bias, digit_images)
    single = SingleLayerBound(network, x, k, norm, bias)
    logits = network(x)
    exact = (logits.gather(1, labels.view(-1, 1)) - logits).scatter(1, labels.view(-1, 1), math.inf)
    descent = single.descent(labels)
    assert bool((descent > 0).sum(1).eq(logits.shape[1] - 1).all()) and bool(
        (descent.gather(1, labels.view(-1, 1)) == 0).all()
    )
    eps = radii * 1e-6
    drop = exact - single.margins(eps, labels)
    line = eps.view(-1, 1) * descent
    finite = torch.isfinite(exact)
    torch.testing.assert_close(drop[finite], line[finite], rtol=1e-5, atol=0.0)
