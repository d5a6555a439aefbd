"""One vector from a dict of tensors and back, as the global rankings and test families use it."""

import pytest
import torch

from pruning.flat import flatten, unflatten


def test_flatten_lays_out_key_by_key_in_row_major_order_and_unflatten_inverts_it():
    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.tensor([10.0]), "c": torch.zeros(0)}
    flat = flatten(tensors)
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0]  # the mapping's order, not sorted
    back = unflatten(flat, tensors)
    assert list(back) == list(tensors)
    for key in tensors:
        assert back[key].shape == tensors[key].shape and torch.equal(back[key], tensors[key])


def test_unflatten_gives_views_with_the_flat_vector_s_dtype():
    like = {"w": torch.zeros(2, 2), "v": torch.zeros(3)}
    keep = torch.tensor([True, False, True, True, False, False, True])
    masks = unflatten(keep, like)
    assert masks["w"].dtype == torch.bool and masks["w"].tolist() == [[True, False], [True, True]]
    assert masks["v"].tolist() == [False, False, True]
    keep[0] = False
    assert not bool(masks["w"][0, 0])  # a view of the flat vector, not a copy


def test_unflatten_refuses_a_vector_of_the_wrong_size():
    with pytest.raises(ValueError, match="7 entries"):
        unflatten(torch.zeros(6), {"w": torch.zeros(2, 2), "v": torch.zeros(3)})
