import numpy as np
import pytest
import torch

from qrobust.data import LatticeDataset
from qrobust.errors import QRobustError
from qrobust.smoothing import FloatRS, SmoothedClassifier, certify_examples, evenly_spaced, example_generator, run
from qrobust.smoothing.run import example_bound_rng


def test_example_generators_are_reproducible_and_distinct():
    first = torch.randn(5, generator=example_generator(0, 3))
    assert torch.equal(first, torch.randn(5, generator=example_generator(0, 3)))
    assert not torch.equal(first, torch.randn(5, generator=example_generator(0, 4)))
    assert not torch.equal(first, torch.randn(5, generator=example_generator(1, 3)))


def test_rows_do_not_depend_on_which_examples_ran_before(linear_binary, tiny_info):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 2, 2), dtype=torch.uint8, generator=generator)
    data = LatticeDataset(images, torch.tensor([0, 1, 0, 1, 1, 0]), tiny_info)
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25), batch_size=64)
    options = dict(n0=20, n=200, alpha=0.01, seed=5)
    everything = {row.idx: row for row in certify_examples(smoothed, data, range(6), **options)}
    shard = list(certify_examples(smoothed, data, [4, 1], **options))
    assert [row.idx for row in shard] == [4, 1]
    for row in shard:
        assert (row.predict, row.radius, row.label) == (
            everything[row.idx].predict,
            everything[row.idx].radius,
            everything[row.idx].label,
        )


def test_evenly_spaced():
    assert evenly_spaced(10, 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="number of examples"):
        evenly_spaced(3, 4)


@pytest.fixture
def tiny_run(linear_binary, tiny_info):
    images = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = LatticeDataset(images, torch.tensor([0, 1, 0, 1]), tiny_info)
    return SmoothedClassifier(linear_binary, 2, FloatRS(0.25), batch_size=64), data


def test_randomized_bound_rows_are_reproducible_per_example_and_never_below_plain(tiny_run):
    smoothed, data = tiny_run
    options = dict(n0=20, n=200, alpha=0.01, seed=5)
    plain = list(certify_examples(smoothed, data, range(4), **options))
    randomized = list(certify_examples(smoothed, data, range(4), randomized_bound=True, **options))
    again = list(certify_examples(smoothed, data, range(4), randomized_bound=True, **options))
    assert [(r.predict, r.radius) for r in randomized] == [(r.predict, r.radius) for r in again]
    shard = list(certify_examples(smoothed, data, [3, 1], randomized_bound=True, **options))
    assert [(r.predict, r.radius) for r in shard] == [(randomized[i].predict, randomized[i].radius) for i in (3, 1)]
    assert all(r.radius >= p.radius for r, p in zip(randomized, plain, strict=True))
    assert any(r.radius > p.radius for r, p in zip(randomized, plain, strict=True))
    first = example_bound_rng(5, 3).random(3)
    assert np.array_equal(first, example_bound_rng(5, 3).random(3))
    assert not np.array_equal(first, example_bound_rng(5, 4).random(3))


@pytest.mark.parametrize("sequential", ["cs", "union"])
def test_adaptive_rows_use_the_chosen_sequential_test(tiny_run, sequential, monkeypatch):
    smoothed, data = tiny_run
    calls = []
    real = run.certify_adaptive
    monkeypatch.setattr(run, "certify_adaptive", lambda *a, **k: calls.append(k["sequential"]) or real(*a, **k))
    rows = list(
        certify_examples(
            smoothed, data, range(4), n0=20, n=2000, alpha=0.01, settle_radii=(0.0, 0.25), sequential=sequential
        )
    )
    assert calls == [sequential] * 4 and [row.idx for row in rows] == [0, 1, 2, 3]
    assert all(1 <= row.samples <= 2000 for row in rows) and any(row.samples < 2000 for row in rows)
    fixed = list(certify_examples(smoothed, data, range(4), n0=20, n=2000, alpha=0.01))
    assert [row.samples for row in fixed] == [2000] * 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sequential": "peek"}, "sequential must be"),
        ({"settle_radii": ()}, "radii"),
        ({"settle_radii": (0.25,), "randomized_bound": True}, "randomized_bound applies to fixed-n"),
    ],
)
def test_certify_examples_checks_the_new_options_before_the_first_example(tiny_run, change, message):
    smoothed, data = tiny_run
    with pytest.raises(QRobustError, match=message):
        certify_examples(smoothed, data, range(4), n0=20, n=200, alpha=0.01, **change)
