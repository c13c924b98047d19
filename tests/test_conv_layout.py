"""Conv2d weights in NHWC for bf16 on the CPU (faster in oneDNN): same results as the plain layout, fp32 untouched."""

from __future__ import annotations

import pytest
import torch

from vaetool.api import load_vae
from vaetool.devices import conv_memory_format
from vaetool.tiling import Tiling


def _conv_weights(vae) -> list[torch.Tensor]:
    return [m.weight for m in vae.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_the_layout_table() -> None:
    assert conv_memory_format(torch.device("cpu"), torch.bfloat16) == torch.channels_last
    assert conv_memory_format(torch.device("cpu"), torch.float32) == torch.contiguous_format


@pytest.mark.parametrize("config", ["tiny-f8", "tiny-svd", "tiny-wan", "tiny-taesd"])
def test_bf16_on_the_cpu_is_nhwc_and_decodes_as_the_plain_layout(config: str) -> None:
    vae = load_vae(config, dtype=torch.bfloat16)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(vae))
    z = torch.randn(1, vae.latent_format.channels, 6, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    images = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [1, 3, 48, 40]
    nhwc_dec, nhwc_enc = vae.decode(z), vae.encode(images.to(torch.bfloat16))
    for w in _conv_weights(vae):  # the same weights in the plain layout
        w.data = w.data.contiguous()
    torch.testing.assert_close(nhwc_dec.float(), vae.decode(z).float(), atol=0.05, rtol=0)  # bf16 noise only
    torch.testing.assert_close(nhwc_enc.float(), vae.encode(images.to(torch.bfloat16)).float(), atol=0.05, rtol=0)
    assert vae.to(dtype=torch.float32) and all(w.is_contiguous() for w in _conv_weights(vae))  # back to fp32: plain again


def test_tiled_bf16_decode_in_nhwc_matches_untiled() -> None:
    vae = load_vae("tiny-f8", dtype=torch.bfloat16)
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = vae.decode(z).float()
    tiled = vae.decode(z, tiling=Tiling(mode="exact", tile_size=64)).float()
    assert float((tiled - whole).abs().mean()) < 0.01
