import pytest
import torch

from qrobust.data import LatticeDataset
from qrobust.smoothing import FloatRS, SmoothedClassifier, certify_examples, evenly_spaced, example_generator


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
        assert (row.predict, row.radius, row.label) == (everything[row.idx].predict, everything[row.idx].radius, everything[row.idx].label)


def test_evenly_spaced():
    assert evenly_spaced(10, 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="number of examples"):
        evenly_spaced(3, 4)
