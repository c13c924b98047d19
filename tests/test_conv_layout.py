"""Conv2d weights in NHWC for bf16 and fp32 on the CPU (faster in oneDNN): same results as the plain layout."""

from __future__ import annotations

import pytest
import torch

from vaetool.api import load_vae
from vaetool.devices import conv_memory_format
from vaetool.tiling import Tiling


def _conv_weights(vae) -> list[torch.Tensor]:
    """The model's 3x3 Conv2d weights (a 1x1 weight is contiguous in both layouts)."""
    return [m.weight for m in vae.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_the_layout_table() -> None:
    cpu, nhwc, plain = torch.device("cpu"), torch.channels_last, torch.contiguous_format
    assert conv_memory_format(cpu, torch.bfloat16) == conv_memory_format(cpu, torch.float32) == nhwc
    assert conv_memory_format(cpu, torch.float16) == conv_memory_format(torch.device("cuda"), torch.float32) == plain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", ["tiny-f8", "tiny-svd", "tiny-wan", "tiny-taesd"])
def test_cpu_is_nhwc_and_decodes_as_the_plain_layout(config: str, dtype: torch.dtype) -> None:
    vae = load_vae(config, dtype=dtype)
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in _conv_weights(vae))
    z = torch.randn(1, vae.latent_format.channels, 6, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    images = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [1, 3, 48, 40]
    nhwc_dec, nhwc_enc = vae.decode(z), vae.encode(images.to(dtype))
    for w in _conv_weights(vae):  # the same weights in the plain layout
        w.data = w.data.contiguous()
    tol = 0.05 if dtype == torch.bfloat16 else 1e-5  # bf16 noise; fp32 float rounding
    torch.testing.assert_close(nhwc_dec.float(), vae.decode(z).float(), atol=tol, rtol=0)
    torch.testing.assert_close(nhwc_enc.float(), vae.encode(images.to(dtype)).float(), atol=tol, rtol=0)
    assert vae.to(dtype=torch.float16) and all(w.is_contiguous() for w in _conv_weights(vae))  # fp16 on the CPU: plain


def test_tiled_bf16_decode_in_nhwc_matches_untiled() -> None:
    vae = load_vae("tiny-f8", dtype=torch.bfloat16)
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = vae.decode(z).float()
    tiled = vae.decode(z, tiling=Tiling(mode="exact", tile_size=64)).float()
    assert float((tiled - whole).abs().mean()) < 0.01


def test_fp32_latents_are_reproducible_and_agree_across_thread_counts() -> None:
    """Same threads and batch: the same bytes, every time; another thread count (a torchrun rank runs 1): float rounding only."""
    vae = load_vae("tiny-f8")
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vae.encode(x)
        assert torch.equal(vae.encode(x), one)
        torch.set_num_threads(2)
        two = vae.encode(x)
        assert torch.equal(vae.encode(x), two)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
