"""The DDPM `Model` against diffusers' UNet2DModel (weights converted by keymaps.unet_to_original), fp32 to 1e-4."""

from __future__ import annotations

import pytest
import torch

from vaetool.config import instantiate_from_config
from vaetool.errors import CheckpointError
from vaetool.keymaps import unet_to_original
from vaetool.nn.blocks import AttnBlock, NoAttn

diffusers = pytest.importorskip("diffusers")
from diffusers.models.downsampling import Downsample2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D  # noqa: E402

# (vaetool Model params, the UNet2DModel of the same layout); attention at resolution 8 = level 1 of 2
WITH_ATTN = (
    {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [8], "resolution": 16},
    {"block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
     "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "layers_per_block": 2},
)
NO_ATTN = (  # attn_type none: no attention anywhere, the mid block too
    {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16, "attn_type": "none"},
    {"block_out_channels": (32, 64, 64), "down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3,
     "layers_per_block": 1, "add_attention": False},
)


def reference(unet_kwargs: dict, resamp_with_conv: bool) -> torch.nn.Module:
    """A random UNet2DModel in the DDPM layout: sin-first embedding with divisor half-1, one attention head, pad-then-conv downsampling."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(in_channels=3, out_channels=3, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                                downsample_padding=0, attention_head_dim=None, **unet_kwargs)
    if not resamp_with_conv:  # diffusers' blocks always resample with a conv: swap in its conv-free resamplers
        for block in ref.down_blocks[:-1]:
            block.downsamplers[0] = Downsample2D(block.resnets[-1].out_channels, use_conv=False)
        for block in ref.up_blocks[:-1]:
            block.upsamplers[0] = Upsample2D(block.resnets[-1].out_channels, use_conv=False)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return ref.eval()


def ours_for(params: dict, ref: torch.nn.Module, **extra: object) -> torch.nn.Module:
    cfg = {"target": "ldm.modules.diffusionmodules.model.Model",
           "params": {"out_ch": 3, "in_channels": 3, **params, **extra}}
    model = instantiate_from_config(cfg).eval()
    model.load_state_dict(unet_to_original(ref.state_dict()), strict=True)
    return model


@pytest.mark.parametrize("resamp_with_conv", [True, False], ids=["conv", "pool"])
@pytest.mark.parametrize("layout", [WITH_ATTN, NO_ATTN], ids=["attn", "no-attn"])
def test_model_matches_unet2d(layout: tuple[dict, dict], resamp_with_conv: bool) -> None:
    params, unet_kwargs = layout
    ref = reference(unet_kwargs, resamp_with_conv)
    ours = ours_for(params, ref, resamp_with_conv=resamp_with_conv)
    blocks = [m for m in ours.modules() if isinstance(m, (AttnBlock, NoAttn))]
    assert isinstance(ours.mid.attn_1, AttnBlock if params.get("attn_type") is None else NoAttn) and blocks
    x = torch.randn(3, 3, 16, 24)
    t = torch.tensor([0, 17, 999])
    with torch.no_grad():
        expected = ref(x, t).sample
        got = ours(x, t)
        other_t = ours(x, torch.tensor([500, 3, 42]))
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() <= 1e-4
    assert (other_t - got).abs().max().item() > 1e-3  # the timestep matters


def test_model_without_timestep() -> None:
    params, unet_kwargs = WITH_ATTN
    ref = reference(unet_kwargs, True)
    with torch.no_grad():  # a reference whose time path adds nothing: temb=None in every res block
        for name, p in ref.named_parameters():
            if "time_emb_proj" in name:
                p.zero_()
    ours = instantiate_from_config({"target": "sgm.modules.diffusionmodules.model.Model", "params": {
        "out_ch": 3, "in_channels": 3, "use_timestep": False, **params}}).eval()
    sd = {k: v for k, v in unet_to_original(ref.state_dict()).items() if not k.startswith("temb.")}
    ours.load_state_dict(sd, strict=True)
    assert not hasattr(ours, "temb")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (ours(x) - ref(x, torch.tensor([5, 900])).sample).abs().max().item() <= 1e-4


def test_context_is_concatenated_and_last_layer() -> None:
    torch.manual_seed(0)
    model = instantiate_from_config({"target": "comfy.ldm.modules.diffusionmodules.model.Model", "params": {
        "ch": 32, "out_ch": 2, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "in_channels": 5,
        "resolution": 8, "use_linear_attn": True}}).eval()
    x, ctx, t = torch.randn(1, 3, 8, 8), torch.randn(1, 2, 8, 8), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(model(x, t, context=ctx), model(torch.cat([x, ctx], 1), t))
    assert model.get_last_layer() is model.conv_out.weight
    assert isinstance(model.mid.attn_1, AttnBlock)  # use_linear_attn builds the vanilla block, as the seed does
    with pytest.raises(ValueError, match="pass t"):
        model(torch.cat([x, ctx], 1))


def test_unmapped_unet_keys_are_named() -> None:
    with pytest.raises(CheckpointError, match="class_embedding.weight"):
        unet_to_original({"conv_in.weight": torch.zeros(1), "class_embedding.weight": torch.zeros(1)})
