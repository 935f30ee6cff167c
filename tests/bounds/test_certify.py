"""Soundness of the weight-perturbation certificates (Weng et al., AAAI 2020).

Weights sampled in the certified ball (box corners for l_inf) and a PGD attack on the weights never change
a certified prediction; the bounds contain every sampled margin; on a one-hidden-layer net they are
compared with the exact worst case; they shrink as eps grows and certified radii grow with the margin.
"""

import math

import pytest
import torch

from qrobust.bounds import ReluNetwork, SingleLayerBound, WeightPerturbation, certified_eps, certify, margin_bounds
from qrobust.bounds.certify import resolve_method

from .conftest import trained

SAMPLES = 10_000


def network_of(name: str) -> ReluNetwork:
    model = trained("mlp", depth=3, width=16) if name == "mlp" else trained("tiny_cnn" if name == "cnn" else name)
    return ReluNetwork.from_model(model)


def inputs(network, digit_images, count):
    images, _ = digit_images
    x = images[:count].double() / 255
    return x, network(x).argmax(1)  # certify the network's own predictions


def sample_deltas(shape, bias_size, eps, norm, count, generator):
    """``count`` weight (and bias) changes in the ball: per output unit, l_inf corners / uniform or l_p sphere."""
    size = (count, shape[0], math.prod(shape[1:]) + bias_size)
    if math.isinf(norm):
        corners = torch.randint(0, 2, (count // 2, *size[1:]), generator=generator).float() * 2 - 1
        uniform = torch.rand(count - count // 2, *size[1:], generator=generator) * 2 - 1
        rows = torch.cat([corners, uniform]).double() * eps
    else:
        rows = torch.randn(size, generator=generator).double()
        rows = rows / torch.linalg.vector_norm(rows, ord=norm, dim=-1, keepdim=True) * eps
    weights = rows[..., : rows.shape[-1] - bias_size].reshape(count, *shape)
    biases = rows[..., -1] if bias_size else torch.zeros(count, shape[0], dtype=torch.float64)
    return weights, biases


def perturbed_logits(network, k, image, weights, biases):
    """Logits (S, classes) of one image under S weight/bias changes of layer k (batched with vmap)."""
    layer = network.layers[k]

    def run(dw, db):
        return network(image.unsqueeze(0), {k: layer.weight + dw}, {k: layer.bias + db})[0]

    return torch.func.vmap(run)(weights, biases)


CASES = [("mlp", k, math.inf, False) for k in range(3)] + [("mlp", 0, 2.0, True), ("mlp", 1, 1.5, True)]
CASES += [("cnn", k, math.inf, False) for k in range(4)] + [("cnn", 1, 2.0, True)]
CASES += [("conv_linear", 0, math.inf, True), ("conv_linear", 0, 2.0, False)]  # linear bounds of a conv


@pytest.mark.parametrize("name, k, norm, bias", CASES)
def test_sampled_weights_never_flip_a_certified_prediction(name, k, norm, bias, digit_images):
    network = network_of(name)
    x, labels = inputs(network, digit_images, 2)
    radii = certified_eps(network, x, labels, (k,), norm, bias=bias)
    assert bool((radii > 0).all())
    if name == "conv_linear":
        assert resolve_method(network, (k,), "auto") == "linear"
    generator = torch.Generator().manual_seed(k)
    layer = network.layers[k]
    for i in range(len(x)):
        for scale in (1.0, 3.0):  # at the certified radius, and beyond it where the bound is negative
            eps = float(radii[i]) * scale
            weights, biases = sample_deltas(layer.weight.shape, int(bias), eps, norm, SAMPLES, generator)
            logits = perturbed_logits(network, k, x[i], weights, biases)  # (S, classes)
            margins = logits[:, labels[i], None] - logits  # (S, classes)
            bound = margin_bounds(network, x[i : i + 1], labels[i : i + 1], WeightPerturbation((k,), eps, norm, bias))[
                0
            ]
            finite = torch.isfinite(bound)
            assert bool((margins[:, finite] >= bound[finite] - 1e-9).all()), "a sampled margin lies below its bound"
            if scale == 1.0:
                assert bool((logits.argmax(1) == labels[i]).all()), "a sampled weight change flipped a certified input"


def pgd_on_weights(network, k, x, labels, eps, steps=60, seed=0):
    """Smallest margin f_c - max_j f_j found by l_inf PGD on layer k's weights, per input (own weights each)."""
    layer = network.layers[k]
    generator = torch.Generator().manual_seed(seed)
    eps = eps.view(-1, *([1] * layer.weight.dim()))
    delta = (
        (2 * torch.rand(len(x), *layer.weight.shape, generator=generator, dtype=torch.float64) - 1) * eps
    ).requires_grad_()

    def margin(dw, image, label):
        logits = network(image.unsqueeze(0), {k: layer.weight + dw})[0]
        others = logits.scatter(0, label.view(1), -math.inf)
        return logits[label] - others.max()

    worst = torch.full((len(x),), math.inf, dtype=torch.float64)
    for step in range(steps):
        values = torch.func.vmap(margin)(delta, x, labels)
        worst = torch.minimum(worst, values.detach())
        (grad,) = torch.autograd.grad(values.sum(), delta)
        with torch.no_grad():
            size = eps * (0.25 if step < steps // 2 else 0.05)
            delta -= size * grad.sign()
            delta.copy_(torch.maximum(torch.minimum(delta, eps), -eps))
    return worst


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_pgd_on_weights_never_flips_a_certified_prediction(name, digit_images):
    network = network_of(name)
    x, labels = inputs(network, digit_images, 16)
    flipped_beyond = 0
    for k in range(network.num_layers):
        radii = certified_eps(network, x, labels, (k,))
        assert bool((pgd_on_weights(network, k, x, labels, radii) > 0).all())
        flipped_beyond += int((pgd_on_weights(network, k, x, labels, radii * 50) <= 0).sum())
    assert flipped_beyond > 0, "the attack is too weak to mean anything"


def test_multi_layer_interval_bounds_are_sound(digit_images):
    network = network_of("mlp")
    x, labels = inputs(network, digit_images, 4)
    radii = certified_eps(network, x, labels, (0, 1, 2), bias=True)
    assert bool((radii > 0).all()) and resolve_method(network, (0, 1, 2), "auto") == "interval"
    generator = torch.Generator().manual_seed(0)
    for i in range(len(x)):
        changes = {
            k: sample_deltas(layer.weight.shape, 1, float(radii[i]), math.inf, SAMPLES, generator)
            for k, layer in enumerate(network.layers)
        }

        def run(w0, b0, w1, b1, w2, b2, i=i):
            weights = {k: layer.weight + w for k, (layer, w) in enumerate(zip(network.layers, (w0, w1, w2)))}
            biases = {k: layer.bias + b for k, (layer, b) in enumerate(zip(network.layers, (b0, b1, b2)))}
            return network(x[i : i + 1], weights, biases)[0]

        logits = torch.func.vmap(run)(*(t for k in range(3) for t in changes[k]))
        assert bool((logits.argmax(1) == labels[i]).all())


def exact_one_hidden_layer(network, image, label, eps):
    """The exact minimum of f_c - f_j over the l_inf box on layer 0's weights of a one-hidden-layer net.

    Rows of W0 move independently, so each hidden pre-activation ranges over its exact interval on its own
    and the minimum of v_r relu(z_r) is at an end of it (relu is monotone)."""
    first, last = network.layers
    phi = image.flatten()
    z = first.weight @ phi + first.bias
    radius = eps * phi.abs().sum()
    v = last.weight[label] - last.weight  # (J, hidden)
    ends = torch.stack([torch.relu(z - radius), torch.relu(z + radius)])  # (2, hidden)
    low = torch.minimum(v * ends[0], v * ends[1]).sum(1)
    return low + last.bias[label] - last.bias


def test_agrees_with_the_exact_worst_case_on_a_one_hidden_layer_net(digit_images):
    network = ReluNetwork.from_model(trained("mlp", depth=2, width=12))
    x, labels = inputs(network, digit_images, 8)
    for i in range(len(x)):
        for eps in (1e-4, 1e-3, 1e-2):
            exact = exact_one_hidden_layer(network, x[i], labels[i], eps)
            exact[labels[i]] = math.inf
            bound = margin_bounds(network, x[i : i + 1], labels[i : i + 1], WeightPerturbation((0,), eps))[0]
            assert bool((bound <= exact + 1e-9).all())
            # the last layer enters the margin linearly: Hoelder's bound is exact there (eq. 12-13)
            phi = torch.relu(network.layers[0](x[i].flatten()))
            last_bound = margin_bounds(network, x[i : i + 1], labels[i : i + 1], WeightPerturbation((1,), eps))[0]
            logits = network(x[i : i + 1])[0]
            expected = logits[labels[i]] - logits - 2 * eps * phi.abs().sum()
            expected[labels[i]] = math.inf
            torch.testing.assert_close(last_bound, expected)
    # certified radii against the exact ones found by bisection on the exact worst case
    radii = certified_eps(network, x, labels, (0,))
    for i in range(len(x)):
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            exact = exact_one_hidden_layer(network, x[i], labels[i], mid)
            exact[labels[i]] = math.inf
            lo, hi = (mid, hi) if bool((exact > 0).all()) else (lo, mid)
        assert 0.5 * lo <= float(radii[i]) <= lo * (1 + 1e-6)


@pytest.mark.parametrize(
    "name, k, norm",
    [("mlp", 0, math.inf), ("mlp", 1, 2.0), ("mlp", 2, math.inf), ("cnn", 0, math.inf), ("cnn", 2, 1.0)],
)
def test_bounds_shrink_as_eps_grows(name, k, norm, digit_images):
    network = network_of(name)
    x, labels = inputs(network, digit_images, 6)
    previous = None
    for eps in torch.logspace(-6, -1, 12).tolist():
        bound = margin_bounds(network, x, labels, WeightPerturbation((k,), eps, norm))
        if previous is not None:
            finite = torch.isfinite(bound)
            assert bool((bound[finite] <= previous[finite] + 1e-9).all())
        previous = bound


@pytest.mark.parametrize("k", [0, 1])
def test_certified_eps_grows_with_the_margin(k, digit_images):
    """Raising the predicted class's output bias raises its margin by the same amount under every perturbation."""
    network = ReluNetwork.from_model(trained("mlp", depth=2, width=12))
    x, labels = inputs(network, digit_images, 8)
    radii = []
    for shift in (0.0, 0.5, 2.0):
        last = network.layers[-1]
        bias = last.bias + shift * torch.nn.functional.one_hot(labels[:1], last.bias.numel())[0].double()
        shifted = network.replace_layer(1, type(last)(last.weight, bias))
        chosen = labels == labels[0]
        radii.append(certified_eps(shifted, x[chosen], labels[chosen], (k,)))
    assert bool((radii[0] < radii[1]).all() and (radii[1] < radii[2]).all())


def test_certify_agrees_with_certified_eps_and_refuses_misclassified(digit_images):
    network = network_of("mlp")
    x, labels = inputs(network, digit_images, 8)
    radii = certified_eps(network, x, labels, (1,))
    assert bool(certify(network, x, labels, WeightPerturbation((1,), float(radii.min()))).all())
    wrong = (labels + 1) % 10
    assert not bool(certify(network, x, wrong, WeightPerturbation((1,), 0.0)).any())
    assert bool((certified_eps(network, x, wrong, (1,)) == 0).all())


def test_linear_method_is_refused_where_it_does_not_apply(digit_images):
    network = network_of("cnn")
    x, labels = inputs(network, digit_images, 2)
    assert resolve_method(network, (0,), "auto") == "interval" and resolve_method(network, (2,), "auto") == "linear"
    with pytest.raises(ValueError, match="interval"):
        certify(network, x, labels, WeightPerturbation((0,), 1e-3), method="linear")
    with pytest.raises(ValueError, match="method"):
        certify(network, x, labels, WeightPerturbation((0,), 1e-3), method="crown")
    with pytest.raises(ValueError, match="layer"):
        certify(network, x, labels, WeightPerturbation((7,), 1e-3))


def test_empty_batches_and_misclassified_inputs_are_handled(digit_images):
    """No input, or none certified (every search step then bounds no input), gives empty or zero radii."""
    network = ReluNetwork.from_model(trained("mlp", depth=3, width=64))
    x, labels = inputs(network, digit_images, 6)
    none = torch.zeros(0, dtype=torch.long)
    for k in range(network.num_layers):
        assert certified_eps(network, x[:0], none, (k,)).shape == (0,)
        assert certify(network, x[:0], none, WeightPerturbation((k,), 1e-3)).shape == (0,)
        assert margin_bounds(network, x[:0], none, WeightPerturbation((k,), 1e-3)).shape == (0, 10)
        assert bool((certified_eps(network, x, (labels + 1) % 10, (k,)) == 0).all())
    single = SingleLayerBound(network, x, 0, math.inf, False)
    assert single.margins(torch.ones(0, dtype=torch.float64), none, none).shape == (0, 10)


@pytest.mark.parametrize("name, k", [("mlp", 0), ("mlp", 1), ("conv_linear", 0)])
def test_search_agrees_with_bisection_on_fresh_bounds(name, k, digit_images):
    """The secant search (with boxes reused between steps) finds the radius a plain bisection on fresh
    ``margin_bounds`` calls finds, within the tolerance of both."""
    network = network_of(name)
    x, labels = inputs(network, digit_images, 4)
    radii = certified_eps(network, x, labels, (k,), rtol=1e-3)
    for i in range(len(x)):
        lo, hi = 1e-10, 10.0
        while hi > lo * 1.0001:
            mid = math.sqrt(lo * hi)
            bound = margin_bounds(network, x[i : i + 1], labels[i : i + 1], WeightPerturbation((k,), mid))
            lo, hi = (mid, hi) if bool(bound.amin() > 0) else (lo, mid)
        assert lo / 1.003 <= float(radii[i]) <= hi * 1.01


@pytest.mark.parametrize("method", ["linear", "interval"])
def test_certified_eps_keeps_to_eps_range(method, digit_images):
    """0 where the low end is not certified, exactly the high end where it is, else the radius found over the
    whole range (within rtol)."""
    network = network_of("mlp")
    x, labels = inputs(network, digit_images, 8)
    radii = certified_eps(network, x, labels, (1,), method=method)
    assert bool((radii > 0).all())
    above = float(radii.max()) * 3
    assert bool((certified_eps(network, x, labels, (1,), method=method, eps_range=(above, 2 * above)) == 0).all())
    below = float(radii.min()) / 2
    assert bool((certified_eps(network, x, labels, (1,), method=method, eps_range=(below / 100, below)) == below).all())
    narrower = certified_eps(network, x, labels, (1,), method=method, eps_range=(below, 2 * above))
    assert bool(((narrower / radii - 1).abs() <= 0.0201).all())  # both within a factor 1 + rtol of the root
