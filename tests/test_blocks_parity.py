"""Blocks against diffusers or an independent hand-written forward: BasicTransformerBlock with cross-attention,
AttnVideoBlock (and the attn-only / all video decoders), the Gaussian regularizer, AutoencodingEngineLegacy's
max_batch_size, and a timestep-conditioned ResnetBlock with a 3x3 conv shortcut."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from vaetool.config import instantiate_from_config
from vaetool.keymaps import to_original
from vaetool.nn.blocks import ResnetBlock
from vaetool.nn.distributions import DiagonalGaussianRegularizer
from vaetool.nn.temporal import AttnVideoBlock, VideoDecoder
from vaetool.nn.transformer import BasicTransformerBlock

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock as DiffusersBlock  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersGaussian  # noqa: E402


def _wake(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.mark.parametrize("masked", [False, True])
def test_basic_transformer_block_with_context_matches_diffusers(masked: bool) -> None:
    torch.manual_seed(0)
    ref = _wake(DiffusersBlock(32, 2, 16, cross_attention_dim=12, activation_fn="geglu", attention_bias=False))
    ours = BasicTransformerBlock(32, 2, 16, context_dim=12).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 12)
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if masked else None
    bias = None if keep is None else ((1 - keep.float()) * -10000.0)[:, None]  # diffusers' block takes the bias [B, 1, M]
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=bias)
        got = ours(x, context=ctx, context_mask=keep)
    assert (got - expected).abs().max().item() <= 1e-4


# ---- AttnVideoBlock by hand ---------------------------------------------------------------------


def _conv1x1(conv: torch.nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], h) + conv.bias[None, :, None, None]


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def _ff(ff: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    a, gate = F.linear(x, ff.net[0].proj.weight, ff.net[0].proj.bias).chunk(2, dim=-1)
    return F.linear(a * F.gelu(gate), ff.net[2].weight, ff.net[2].bias)


def _self_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = (F.linear(x, lin.weight).reshape(b, n, attn.heads, -1).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
    out = _softmax_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
    return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


def hand_attn_video(m: AttnVideoBlock, x: torch.Tensor, timesteps: int | None = None, **kwargs: object) -> torch.Tensor:
    """sgm's AttnVideoBlock written out: spatial single-head attention, frame-index embedding, the temporal
    transformer block (GEGLU ff_in, two self-attentions, GEGLU ff, each with a residual), the alpha merge, proj_out."""
    bt, c, hh, ww = x.shape
    t = bt if timesteps is None else timesteps
    h = F.group_norm(x, m.norm.num_groups, m.norm.weight, m.norm.bias, m.norm.eps)
    q, k, v = (_conv1x1(conv, h).flatten(2).transpose(1, 2) for conv in (m.q, m.k, m.v))  # [BT, HW, C]
    spatial = _softmax_attention(q, k, v)
    idx = torch.arange(t).repeat(bt // t).float()
    freqs = torch.exp(-math.log(10000) * torch.arange(c // 2) / (c // 2))
    emb = torch.cat([torch.cos(idx[:, None] * freqs), torch.sin(idx[:, None] * freqs)], dim=1)  # [BT, C]
    lin1, lin2 = m.video_time_embed[0], m.video_time_embed[2]
    emb = F.linear(F.silu(F.linear(emb, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    tok = (spatial + emb[:, None]).reshape(bt // t, t, hh * ww, c).transpose(1, 2).reshape(-1, t, c)  # [B*HW, T, C]
    blk = m.time_mix_block

    def ln(norm: torch.nn.LayerNorm, y: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(y, (c,), norm.weight, norm.bias, norm.eps)

    tok = tok + _ff(blk.ff_in, ln(blk.norm_in, tok))
    tok = tok + _self_attention(blk.attn1, ln(blk.norm1, tok))
    tok = tok + _self_attention(blk.attn2, ln(blk.norm2, tok))
    tok = tok + _ff(blk.ff, ln(blk.norm3, tok))
    temporal = tok.reshape(bt // t, hh * ww, t, c).transpose(1, 2).reshape(bt, hh * ww, c)
    alpha = torch.sigmoid(m.mix_factor) if m.merge_strategy == "learned" else m.mix_factor
    out = (alpha * spatial + (1 - alpha) * temporal).transpose(1, 2).reshape(bt, c, hh, ww)
    return x + _conv1x1(m.proj_out, out)


@pytest.mark.parametrize("merge_strategy", ["learned", "fixed"])
def test_attn_video_block_matches_hand(merge_strategy: str) -> None:
    torch.manual_seed(0)
    block = _wake(AttnVideoBlock(32, alpha=0.3, merge_strategy=merge_strategy))
    x = torch.randn(6, 32, 3, 4)
    with torch.no_grad():
        for t in (3, 2, 6):
            assert (block(x, timesteps=t) - hand_attn_video(block, x, t)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["attn-only", "all"])
def test_video_decoder_attention_modes_match_hand(mode: str) -> None:
    torch.manual_seed(0)
    dec = _wake(VideoDecoder(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3,
                             resolution=16, z_channels=4, time_mode=mode), 0.05)
    blocks = [m for m in dec.modules() if isinstance(m, AttnVideoBlock)]
    assert len(blocks) == 3  # mid, and two at resolution 8
    by_hand = copy.deepcopy(dec)
    for m in by_hand.modules():
        if isinstance(m, AttnVideoBlock):
            m.forward = functools.partial(hand_attn_video, m)
    z = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        assert (dec(z, timesteps=2) - by_hand(z, timesteps=2)).abs().max().item() <= 1e-4


# ---- regularizer, legacy engine, resnet ------------------------------------------------------------


def test_gaussian_regularizer_matches_diffusers() -> None:
    moments = torch.randn(3, 8, 4, 5)
    ref = DiffusersGaussian(moments)
    reg = DiagonalGaussianRegularizer()
    z, log = reg(moments, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(z, ref.sample(generator=torch.Generator().manual_seed(7)), atol=1e-6)
    assert torch.allclose(log["kl_loss"], ref.kl().sum() / 3, rtol=1e-5)
    mode, _ = DiagonalGaussianRegularizer(sample=False)(moments)
    assert torch.equal(mode, ref.mode())


def test_legacy_engine_max_batch_size_matches_diffusers() -> None:
    torch.manual_seed(0)
    ref = _wake(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4), 0.05)
    dd = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
          "num_res_blocks": 1, "attn_resolutions": []}
    ours = instantiate_from_config({"target": "sgm.models.autoencoder.AutoencodingEngineLegacy", "params": {
        "embed_dim": 4, "ddconfig": dd, "max_batch_size": 2}}).eval()
    ours.load_state_dict(to_original(ref.state_dict()), strict=True)
    calls: list[int] = []
    ours.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    ours.decoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    x, z = torch.randn(5, 3, 16, 16), torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        assert (ours.encode_moments(x) - ref.encode(x).latent_dist.parameters).abs().max().item() <= 1e-4
        assert (ours.decode(z) - ref.decode(z).sample).abs().max().item() <= 1e-4
    assert calls == [2, 2, 1, 2, 2, 1]


def test_resnet_block_with_timestep_and_conv_shortcut_matches_hand() -> None:
    torch.manual_seed(0)
    block = _wake(ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, temb_channels=16))
    assert block.conv_shortcut.kernel_size == (3, 3) and not hasattr(block, "nin_shortcut")
    x, temb = torch.randn(2, 32, 5, 6), torch.randn(2, 16)
    h = F.conv2d(F.silu(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight, block.conv1.bias, padding=1)
    h = h + F.linear(F.silu(temb), block.temb_proj.weight, block.temb_proj.bias)[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, 32, block.norm2.weight, block.norm2.bias, 1e-6)), block.conv2.weight, block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.conv_shortcut.weight, block.conv_shortcut.bias, padding=1) + h
    with torch.no_grad():
        assert (block(x, temb) - expected).abs().max().item() <= 1e-4
    assert (block(x, temb) - block(x, temb * 2)).abs().max().item() > 1e-3  # the timestep path is live
