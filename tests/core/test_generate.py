import torch

from effdl.core.generate import right_pad


def test_right_pad_pads_each_row_to_the_longest_with_zeros():
    tokens, lengths = right_pad([[5, 6, 7], [8], [9, 10]])
    assert torch.equal(tokens, torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]]))
    assert torch.equal(lengths, torch.tensor([3, 1, 2]))
    assert tokens.dtype == lengths.dtype == torch.long
