"""Row-banded inference (vaetool.nn.banded) equals the plain forward: blocks, a whole decoder, in place."""

from __future__ import annotations

import pytest
import torch

from vaetool.api import load_vae
from vaetool.nn import banded
from vaetool.nn.blocks import ResnetBlock, upsample_conv_phases


@pytest.fixture
def small_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Band tiny tensors: every activation takes the banded path, in bands of 4 rows."""
    monkeypatch.setattr(banded, "MIN_BYTES", 0)
    monkeypatch.setattr(banded, "BAND_BYTES", 1)


def _plain(module: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(banded, "DEVICES", frozenset())
        return module(x)


@pytest.mark.parametrize(("cin", "cout", "rows"), [(32, 32, 13), (32, 64, 16), (64, 32, 9)])
def test_resnet_block_banded_equals_plain(small_bands: None, monkeypatch: pytest.MonkeyPatch, cin: int, cout: int, rows: int) -> None:
    """Same channels (identity shortcut) and a 1x1 shortcut; heights that do and do not divide into bands."""
    torch.manual_seed(0)
    block = ResnetBlock(in_channels=cin, out_channels=cout, temb_channels=0).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, cin, rows, 11) * 3 + 1
    ref = _plain(block, x, monkeypatch)
    x_before = x.clone()
    with torch.no_grad():
        assert block.runs_banded(x, None)
        out = block(x)
    assert torch.equal(x, x_before)  # the input is not overwritten
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_resnet_block_keeps_the_plain_path_for_training_and_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd, train mode and activations under MIN_BYTES never take the banded path."""
    block = ResnetBlock(in_channels=32, out_channels=32, temb_channels=0).eval()
    x = torch.randn(1, 32, 16, 16)
    assert not block.runs_banded(x, None)  # 32 KiB, under MIN_BYTES
    monkeypatch.setattr(banded, "MIN_BYTES", 0)
    with torch.no_grad():
        assert block.runs_banded(x, None)
        assert not block.train().runs_banded(x, None)
    assert not block.eval().runs_banded(x, None)  # grad enabled


@pytest.mark.parametrize("height", [5, 12, 17])
def test_phase_upsample_in_bands_equals_nearest_then_conv(small_bands: None, height: int) -> None:
    """The banded phase upsample against the definition: nearest x2, then the 3x3 conv."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1).eval()
    x = torch.randn(2, 16, height, 9)
    with torch.no_grad():
        ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert banded.band_rows(x) < height  # several bands (4 rows each)
        out = upsample_conv_phases(x, conv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["plain", "channels_last"])
def test_whole_coders_banded_equal_plain(small_bands: None, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """A whole kl-f8 encoder and decoder (res blocks, upsampling, norm_out/conv_out all banded) against the plain path."""
    vae = load_vae("tiny-f8", random_weights=True)
    model = vae.model
    torch.manual_seed(2)
    x = torch.rand(2, 3, 72, 40) * 2 - 1  # a batch: NCHW bands it whole, NHWC image by image
    z = torch.randn(2, model.decoder.z_shape[1], 9, 5)
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
        x, z = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    ref_dec, ref_enc = _plain(model.decoder, z, monkeypatch), _plain(model.encoder, x, monkeypatch)
    with torch.no_grad():
        dec, enc = model.decoder(z), model.encoder(x)
    torch.testing.assert_close(dec, ref_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc, ref_enc, rtol=1e-5, atol=1e-5)
    if layout == "channels_last":
        assert dec.is_contiguous(memory_format=torch.channels_last) == ref_dec.is_contiguous(memory_format=torch.channels_last)


def test_banded_decode_through_the_cli_matches_the_plain_decode(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vaetool decode` with every activation banded writes the image the plain path writes (16-bit PNG)."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from vaetool.cli import app

    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "z.npy", z.numpy())
    runner = CliRunner()
    args = ["decode", str(tmp_path / "z.npy"), "--model", "tiny-f8", "--random-weights", "--raw", "--16bit", "--quiet"]
    with monkeypatch.context() as m:
        m.setattr(banded, "DEVICES", frozenset())
        assert runner.invoke(app, [*args, "-o", str(tmp_path / "plain")]).exit_code == 0
    monkeypatch.setattr(banded, "MIN_BYTES", 0)
    monkeypatch.setattr(banded, "BAND_BYTES", 1)
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "banded")]).exit_code == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "z.png")).astype(np.int64) for d in ("plain", "banded"))
    assert a.shape == (96, 80, 3) and np.abs(a - b).max() <= 1  # one 16-bit level of float rounding at most


@pytest.mark.parametrize(("cin", "cout"), [(32, 32), (32, 64)])
def test_an_nhwc_batch_is_banded_image_by_image(small_bands: None, monkeypatch: pytest.MonkeyPatch, cin: int, cout: int) -> None:
    """An NHWC batch's rows are not contiguous across images: each image is banded alone, with the plain result."""
    torch.manual_seed(4)
    block = ResnetBlock(in_channels=cin, out_channels=cout, temb_channels=0).eval().to(memory_format=torch.channels_last)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    conv = torch.nn.Conv2d(cout, 8, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = (torch.randn(3, cin, 13, 10) * 2 + 1).contiguous(memory_format=torch.channels_last)  # [3, C, 13, 10] NHWC
    with torch.no_grad():
        ref = _plain(block, x, monkeypatch)
        ref_up = conv(torch.nn.functional.interpolate(ref, scale_factor=2.0, mode="nearest"))
    seen: list[int] = []
    band_rows = banded.band_rows
    monkeypatch.setattr(banded, "band_rows", lambda t: seen.append(t.shape[0]) or band_rows(t))
    x_before = x.clone()
    with torch.no_grad():
        out = block(x)
        up = upsample_conv_phases(out, conv)
    assert seen and set(seen) == {1}  # every band holds one image
    assert torch.equal(x, x_before) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up, ref_up, rtol=1e-5, atol=1e-5)
