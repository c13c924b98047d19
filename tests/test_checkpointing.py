"""Gradient checkpointing: the same outputs and gradients as without, fewer saved activations, dropout and
autocast repeated in the recomputation, frozen parameters; the flags of the coders, the DDPM Model and the blocks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from vaetool.config import instantiate_from_config
from vaetool.nn.checkpoint import checkpoint, set_gradient_checkpointing
from vaetool.nn.transformer import BasicTransformerBlock
from vaetool.nn.unet import Model

DD = {"double_z": True, "z_channels": 4, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
      "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}


def run(model: nn.Module, fn: Callable[[], torch.Tensor], seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, parameter gradients and the bytes autograd saved for backward, of one forward+backward."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, saved[0]


def assert_same(a: tuple, b: tuple, atol: float = 1e-5) -> None:
    assert torch.allclose(a[0], b[0], atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=atol), name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_transformer_block_gradients_are_the_same_with_less_saved(dropout: float) -> None:
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, dropout=dropout, context_dim=8, checkpoint=False).train()
    x, ctx = torch.randn(2, 9, 32, requires_grad=True), torch.randn(2, 4, 8)
    plain = run(block, lambda: block(x, context=ctx))
    x_grad = x.grad.clone()
    x.grad = None
    block.checkpoint = True
    ckpt = run(block, lambda: block(x, context=ctx))  # same seed: dropout draws the same masks, twice
    assert_same(plain, ckpt)
    assert torch.allclose(x.grad, x_grad, atol=1e-5)
    assert ckpt[2] < plain[2] / 4


def test_the_ddpm_model_and_the_coders_checkpoint_their_blocks() -> None:
    torch.manual_seed(0)
    unet = Model(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], in_channels=3, resolution=8).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    plain = run(unet, lambda: unet(x, t))
    assert set_gradient_checkpointing(unet) == 1 and unet.gradient_checkpointing
    ckpt = run(unet, lambda: unet(x, t))
    assert_same(plain, ckpt)
    assert ckpt[2] < plain[2] / 2

    vae = instantiate_from_config({"target": "vaetool.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": DD}}).train()
    img = torch.randn(2, 3, 8, 8)
    plain = run(vae, lambda: vae(img)[1])
    assert set_gradient_checkpointing(vae) == 2  # encoder and decoder
    ckpt = run(vae, lambda: vae(img)[1])
    assert_same(plain, ckpt)
    assert ckpt[2] < plain[2] / 2
    set_gradient_checkpointing(vae, False)
    assert not vae.encoder.gradient_checkpointing and run(vae, lambda: vae(img)[1])[2] == plain[2]


def test_frozen_encoder_and_inference_skip_the_machinery() -> None:
    torch.manual_seed(0)
    vae = instantiate_from_config({"target": "vaetool.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": DD}}).train()
    vae.encoder.requires_grad_(False)
    img = torch.randn(1, 3, 8, 8)
    plain = run(vae, lambda: vae(img)[1])
    set_gradient_checkpointing(vae)
    ckpt = run(vae, lambda: vae(img)[1])
    assert_same(plain, ckpt)
    assert not any(n.startswith("encoder.") for n in ckpt[1])
    with torch.no_grad():
        assert torch.equal(vae.decode(torch.ones(1, 4, 4, 4)), vae.decode(torch.ones(1, 4, 4, 4)))


def test_checkpoint_function_interface_and_autocast() -> None:
    lin = nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    assert torch.equal(checkpoint(lin, (x,), lin.parameters(), False), lin(x))
    with torch.no_grad():
        assert torch.equal(checkpoint(lin, (x,), lin.parameters(), True), lin(x))

    def f(a: torch.Tensor, skip: None) -> torch.Tensor:
        return torch.relu(lin(a)) * 3

    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = run(lin, lambda: f(x, None))
        ckpt = run(lin, lambda: checkpoint(f, (x, None), lin.parameters(), True))
    assert plain[0].dtype == ckpt[0].dtype == torch.bfloat16
    assert_same(plain, ckpt, atol=0)  # the recomputation runs under the same autocast: bit-identical
