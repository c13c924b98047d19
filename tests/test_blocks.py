"""The inference fast paths of the building blocks equal the plain (autograd) computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vaetool.nn.blocks import ResnetBlock, Upsample, upsample_conv_phases


@pytest.mark.parametrize("shape", [(1, 8, 4, 4), (2, 16, 5, 7), (1, 32, 1, 3)])
def test_upsample_phases_equal_nearest_then_conv(shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    up = Upsample(shape[1], with_conv=True)
    x = torch.randn(shape)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]
    with torch.inference_mode():
        out = up(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_upsample_phases_match_a_rectangular_conv() -> None:
    """Cout != Cin and a non-zero bias."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 6, 3, 5)
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.no_grad():
        torch.testing.assert_close(upsample_conv_phases(x, conv), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cout", [32, 64])
def test_resnet_in_place_inference_equals_training_path(cout: int) -> None:
    torch.manual_seed(0)
    block = ResnetBlock(in_channels=32, out_channels=cout, temb_channels=0).eval()
    x = torch.randn(2, 32, 6, 5)
    keep = x.clone()
    ref = block(x)
    with torch.inference_mode():
        out = block(x)
    assert torch.equal(x, keep)  # the input is never overwritten
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
