"""The zoo of user-style models (``zoo.py``) through the graph and through every technique that runs it."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.bounds import ReluNetwork, certified_eps
from qrobust.data import LatticeDataset
from qrobust.data.base import DatasetInfo
from qrobust.errors import QRobustError
from qrobust.graph import KINDS, TECHNIQUES, check_supported, trace
from qrobust.quant import (
    ADMMConfig,
    BitPolicy,
    QuantConfig,
    admm_quantize,
    bitops,
    calibrate,
    convert,
    layer_infos,
    prepare_qat,
    prune_channels,
    pruning_report,
)
from qrobust.quant.admm import certificate_epsilons
from qrobust.quant.export import onnx_runtime_model

from .zoo import ZOO, build

NAMES = sorted(ZOO)


def supporting(technique: str) -> list[str]:
    return [name for name in NAMES if technique in ZOO[name].techniques]


def lattice(n: int, shape: tuple[int, ...], seed: int, sigma: float = 0.25) -> torch.Tensor:
    """Smooth random images plus Gaussian noise of std ``sigma`` (in [0, 1] units), on the uint8 lattice."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, shape[0], 4, 4, generator=generator)
    smooth = nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    noisy = smooth + sigma * torch.randn(smooth.shape, generator=generator)
    return (noisy * 255).round().clamp(0, 255).to(torch.uint8)


def centered(name: str) -> nn.Module:
    """The zoo model with the last layer's bias centring every logit over noisy images, so predictions
    spread over the classes and agreement tests are not trivial."""
    model = build(name)
    last = model.get_submodule(ZOO[name].affine[-1])
    features = []
    handle = last.register_forward_hook(lambda module, args, output: features.append(args[0]))
    with torch.no_grad():
        model(lattice(256, ZOO[name].shape, seed=4).float() / 255)
    handle.remove()
    last.bias = nn.Parameter(-features[0].mean(0) @ last.weight.t())
    return model


# --- the graph -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_graph_lists_layers_in_call_order_with_their_shapes(name: str) -> None:
    """Module layers come in the order forward hooks see them run, with the shapes they see."""
    entry, model = ZOO[name], build(name)
    calls = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, n=n: calls.append((n, tuple(out.shape))))
        for n, module in model.named_modules()
        if n and next(module.children(), None) is None
    ]
    x = torch.rand(2, *entry.shape)
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    graph = trace(model, x)
    assert [layer.name for layer in graph.affine()] == list(entry.affine)
    named = dict(model.named_modules())
    modules = [
        (layer.target, layer.output_shape) for layer in graph.layers if layer.module is named.get(layer.target, 0)
    ]
    assert modules == calls
    assert graph[graph.output].output_shape == tuple(logits.shape)
    assert {layer.kind for layer in graph.layers} <= set(KINDS)
    for layer in graph.layers:  # the data flow is consistent both ways
        assert all(layer.name in graph[source].users for source in layer.inputs if source != graph.input)
        assert all(layer.name in graph[user].inputs for user in layer.users if user != "output")


def test_graph_data_flow_of_residuals_branches_and_reused_modules() -> None:
    resnet = trace(build("resnet18_style"))
    assert resnet["add"].inputs == ("layer1.0.bn2", "relu")  # out += identity, identity the stem's relu
    assert resnet["relu"].users == ("layer1.0.conv1", "add")
    assert resnet["add_1"].inputs == ("layer2.0.bn2", "layer2.0.downsample.1")
    assert [layer.target for layer in resnet.layers].count("layer1.0.relu") == 2  # one module, called twice
    twice = trace(build("read_twice"))
    assert twice["relu1"].users == ("conv2", "add") and twice["add"].inputs == ("conv2", "relu1")
    assert twice["reshape"].kind == "flatten"
    cat = trace(build("cat_net"), torch.rand(1, 3, 8, 8))
    assert cat["cat"].kind == "cat" and cat["cat"].inputs == ("relu", "relu_1")
    assert cat["cat"].output_shape == (1, 8, 8, 8) and cat["branch1"].users == ("relu",)
    tutorial = trace(build("tutorial_cnn"))
    assert [layer.kind for layer in tutorial.layers] == [
        "conv",
        "relu",
        "maxpool",
        "conv",
        "relu",
        "maxpool",
        "flatten",
        "linear",
        "relu",
        "linear",
    ]
    inline = trace(build("inline_norm_mlp"))
    assert inline.layers[0].kind == "normalize" and inline.layers[0].inputs == (inline.input,)
    torch.testing.assert_close(inline.layers[0].module.std, torch.tensor([0.2, 0.25, 0.3]))


@pytest.mark.parametrize("name", NAMES)
def test_check_supported_matches_the_zoo_s_claims(name: str) -> None:
    model = build(name)
    for technique in TECHNIQUES:
        if technique in ZOO[name].techniques:
            check_supported(model, None, technique)
        else:
            with pytest.raises(QRobustError, match=f"^cannot [^\n]*{model.__class__.__name__}: "):
                check_supported(model, None, technique)


@pytest.mark.parametrize(
    ("name", "technique", "operation", "code"),
    [
        ("leaky_net", "int8", "LeakyReLU (act)", "self.fc(torch.flatten(self.act(self.conv(x)), 1))"),
        ("leaky_net", "bounds", "LeakyReLU (act)", "self.fc(torch.flatten(self.act(self.conv(x)), 1))"),
        ("sigmoid_gate", "int8", "sigmoid (sigmoid)", "F.relu(self.fc1(x)) * torch.sigmoid(self.gate(x))"),
        ("mobilenet_style", "int8", "ReLU6 (relu6)", "F.relu6(self.bn0(self.stem(x)))"),
        ("cat_net", "bounds", "cat (cat)", "torch.cat("),
    ],
)
def test_unsupported_operations_are_named_with_their_line_before_any_work(name, technique, operation, code) -> None:
    with pytest.raises(QRobustError) as caught:
        check_supported(build(name), None, technique)
    message = str(caught.value)
    assert "\n" not in message and operation in message and code in message
    source = (Path(__file__).parent / "zoo.py").read_text().splitlines()
    lines = [i + 1 for i, line in enumerate(source) if code in line]
    assert f"zoo.py:{lines[0]} " in message
    if technique == "int8":  # the technique's own entry point refuses it the same way, before calibration
        with pytest.raises(QRobustError, match=operation.replace("(", r"\(").replace(")", r"\)")):
            prepare_qat(build(name))


# --- techniques ----------------------------------------------------------------------------------


@functools.cache
def _int8(name: str):
    model = centered(name)
    qat = calibrate(prepare_qat(model, QuantConfig()), lattice(256, ZOO[name].shape, seed=2))
    return model, qat, convert(qat)


@pytest.mark.parametrize("name", supporting("int8"))
def test_int8_engine_agrees_with_fake_quantization(name: str) -> None:
    """Top-1 agreement of the integer engine with the fake-quantized model >= 99.9% on 2,000 noisy images."""
    _, qat, int8 = _int8(name)
    images = lattice(2000, ZOO[name].shape, seed=3, sigma=0.5)
    with torch.no_grad():
        fake = qat(images.float() / 255).argmax(1)
    engine = int8.predict(images)
    assert len(engine.unique()) >= 3  # centred logits: agreement is not trivial
    assert float((engine == fake).float().mean()) >= 0.999


@pytest.mark.parametrize("name", supporting("export"))
def test_onnx_export_agrees_with_the_engine(name: str) -> None:
    pytest.importorskip("onnxruntime")
    _, _, int8 = _int8(name)
    images = lattice(500, ZOO[name].shape, seed=5)
    runtime = onnx_runtime_model(int8, threads=1)
    assert float((runtime.predict(images) == int8.predict(images)).float().mean()) >= 0.995


@pytest.mark.parametrize("name", supporting("bounds"))
def test_sampled_weight_perturbations_inside_eps_never_flip_the_prediction(name: str) -> None:
    model = build(name)
    network = ReluNetwork.from_model(model)
    images = lattice(6, ZOO[name].shape, seed=6).double() / 255
    with torch.no_grad():
        torch.testing.assert_close(network(images), model(images.float()).double(), rtol=1e-4, atol=1e-4)
    labels = network(images).argmax(1)
    generator = torch.Generator().manual_seed(0)
    for k in (0, network.num_layers - 1):
        eps = certified_eps(network, images, labels, layers=(k,))  # (N,)
        assert bool((eps > 0).all())
        weight = network.layers[k].weight
        for i in range(len(images)):
            signs = torch.randint(0, 2, (64, *weight.shape), generator=generator, dtype=torch.float64) * 2 - 1
            scale = torch.rand(64, *(1,) * weight.dim(), generator=generator, dtype=torch.float64)
            weights = weight + eps[i] * scale * signs  # corners and inside of the l_inf ball
            logits = torch.func.vmap(lambda w, i=i, k=k: network(images[i : i + 1], {k: w}))(weights)
            assert bool((logits.argmax(-1) == labels[i]).all()), f"layer {k}, image {i}"


@pytest.mark.parametrize("name", supporting("prune"))
def test_pruning_keeps_outputs_or_says_why_a_layer_is_left(name: str) -> None:
    model = build(name)
    convs = [layer for layer in trace(model).affine() if layer.kind == "conv"]
    with torch.no_grad():
        for layer in convs:  # two dead channels per conv, with a bias so they carry a constant
            layer.module.weight[:2] = 0
            if layer.module.bias is not None:
                layer.module.bias[:2] = 0.3
    pruned = prune_channels(model)
    x = lattice(8, ZOO[name].shape, seed=7).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)
    report = {decision.layer: decision for decision in pruning_report(model)}
    assert list(report) == [layer.name for layer in convs]
    for layer in convs:
        decision, out_channels = report[layer.name], pruned.get_submodule(layer.name)
        out_channels = getattr(out_channels, "conv", out_channels).out_channels
        if decision.reason is None:
            assert decision.removed == 2 and out_channels == layer.module.out_channels - 2
        else:
            assert decision.removed == 0 and out_channels == layer.module.out_channels and decision.reason


def test_pruning_removes_what_the_data_flow_allows() -> None:
    """The tutorial CNN prunes every conv; the read-twice block keeps conv1, whose output has two readers."""
    assert all(d.reason is None for d in pruning_report(build("tutorial_cnn")))
    report = {d.layer: d.reason for d in pruning_report(build("read_twice"))}
    assert report["conv1"] == "relu1's output is read by 2 layers (conv2, add); each must drop the channel"
    mobile = {d.layer: d.reason for d in pruning_report(build("mobilenet_style"))}
    assert "Conv2d (depthwise)" in mobile["stem"] and "groups=8" in mobile["depthwise"]


def tiny_dataset(name: str, model: nn.Module, n: int = 64) -> LatticeDataset:
    images = lattice(n, ZOO[name].shape, seed=8)
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)
    info = DatasetInfo(
        name, ZOO[name].shape, tuple("abcdefghij"), (0.5,) * ZOO[name].shape[0], (0.25,) * ZOO[name].shape[0]
    )
    return LatticeDataset(images, labels, info)


@pytest.mark.parametrize("name", supporting("admm"))
def test_admm_quantizes_every_layer_in_call_order(name: str) -> None:
    model = build(name)
    config = ADMMConfig(bits=4, iterations=1, steps=2, batch_size=16, scale_steps=2, eval_images=16)
    result = admm_quantize(model, tiny_dataset(name, model), config)
    assert [layer.name for layer in result.layers] == list(ZOO[name].affine)
    for layer in result.layers:
        torch.testing.assert_close(result.model.get_submodule(layer.name).weight, layer.dequantize())


@pytest.mark.parametrize("name", ["head_first", "tutorial_cnn", "inline_norm_mlp"])
def test_admm_certificate_radii_land_on_the_layers_they_were_computed_for(name: str) -> None:
    model = build(name)
    data = tiny_dataset(name, model, n=8)
    epsilons = certificate_epsilons(model, data.floats(), data.labels, 50)
    assert list(epsilons) == list(ZOO[name].affine)
    network = ReluNetwork.from_model(model)
    for k, layer in enumerate(ZOO[name].affine):  # the radius of layer k is its own certified median
        bound = certified_eps(network, data.floats().double(), data.labels, layers=(k,)).float()
        if k == 0 and name == "inline_norm_mlp":  # Normalize folded in: back to the model's weight units
            bound = bound * 0.2
        assert epsilons[layer] == pytest.approx(float(np.percentile(bound.numpy(), 50)), rel=1e-6)
    config = ADMMConfig(bits=8, iterations=1, steps=1, batch_size=8, scale_steps=1, eval_images=8)
    result = admm_quantize(model, data, config, epsilons=epsilons)
    assert {layer.name: layer.epsilon for layer in result.layers} == pytest.approx(epsilons)


@pytest.mark.parametrize("name", supporting("mixed"))
def test_mixed_precision_wraps_the_layers_in_call_order(name: str) -> None:
    model = build(name)
    infos = layer_infos(model, ZOO[name].shape)
    assert [info.name for info in infos] == list(ZOO[name].affine)
    mixed = calibrate(prepare_qat(model, BitPolicy.uniform(len(infos), 6)), lattice(64, ZOO[name].shape, seed=9))
    assert mixed.layer_names == ZOO[name].affine
    x = lattice(256, ZOO[name].shape, seed=10).float() / 255
    with torch.no_grad():
        agreement = float((mixed(x).argmax(1) == model(x).argmax(1)).float().mean())
    assert agreement >= 0.8


# MACs per layer by hand: (inputs per filter) * filters * output positions.
HAND_MACS = {
    # conv1 1x3x3 -> 4 on 8x8; conv2 4x3x3 -> 8 on 4x4; fc1 32 -> 16; fc2 16 -> 10
    "tutorial_cnn": [9 * 4 * 64, 36 * 8 * 16, 32 * 16, 16 * 10],
    # stem 3x3x3 -> 8 on 4x4 (stride 2); depthwise 1x3x3 per channel, 8 on 4x4; project 8 -> 16 on 4x4; fc 16 -> 10
    "mobilenet_style": [27 * 8 * 16, 9 * 8 * 16, 8 * 16 * 16, 16 * 10],
    # branch1 3 -> 4 on 8x8; branch3 27 -> 4 on 8x8; mix 72 -> 8 on 8x8; fc 128 -> 10
    "cat_net": [3 * 4 * 64, 27 * 4 * 64, 72 * 8 * 64, 128 * 10],
}


@pytest.mark.parametrize("name", sorted(HAND_MACS))
def test_bitops_equal_a_hand_count(name: str) -> None:
    infos = layer_infos(build(name), ZOO[name].shape)
    policy = BitPolicy((8, 4, 2, 8), (8, 3, 5, 8))
    assert bitops(infos, policy) == [w * a * m for w, a, m in zip((8, 4, 2, 8), (8, 3, 5, 8), HAND_MACS[name])]
