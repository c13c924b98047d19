"""The coders' seed options: Decoder resnet_op / attn_op / conv_out_op (from Python and YAML), linear attention,
IdentityRegularizer; the tiler refuses blocks it cannot reproduce."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaetool.config import instantiate_from_config
from vaetool.errors import ConfigError
from vaetool.nn.blocks import AttnBlock, make_attn
from vaetool.nn.coders import Decoder, Encoder
from vaetool.nn.spatial_transformer import SpatialTransformer
from vaetool.nn.temporal import AE3DConv, VideoDecoder, VideoResBlock, partialclass
from vaetool.tiling.program import TilingUnsupported, decoder_program

DD = {"ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "in_channels": 3,
      "resolution": 16, "z_channels": 4, "double_z": True}
VIDEO_OPS = {
    "resnet_op": {"target": "sgm.modules.autoencoding.temporal_ae.VideoResBlock", "params": {"video_kernel_size": [3, 1, 1]}},
    "conv_out_op": {"target": "comfy.ldm.modules.temporal_ae.AE3DConv", "params": {"video_kernel_size": [3, 1, 1]}},
}


def test_linear_attention_builds_the_vanilla_block() -> None:
    assert isinstance(make_attn(32, attn_type="linear"), AttnBlock)
    torch.manual_seed(0)
    plain = Encoder(**DD).eval()
    linear = Encoder(**DD, use_linear_attn=True).eval()
    linear.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), linear(x))
    assert isinstance(Decoder(**DD, attn_type="linear").mid.attn_1, AttnBlock)


def test_decoder_ops_from_yaml_build_the_video_decoder() -> None:
    torch.manual_seed(0)
    video = VideoDecoder(**DD, time_mode="conv-only", video_kernel_size=[3, 1, 1]).eval()
    with torch.no_grad():
        for p in video.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # wake the zero-initialised temporal convs
    ops = instantiate_from_config({"target": "sgm.modules.diffusionmodules.model.Decoder", "params": {**DD, **VIDEO_OPS}}).eval()
    assert isinstance(ops.mid.block_1, VideoResBlock) and isinstance(ops.conv_out, AE3DConv)
    ops.load_state_dict(video.state_dict(), strict=True)
    z = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(ops(z, timesteps=2), video(z, timesteps=2))


def test_decoder_ops_from_python() -> None:
    dec = Decoder(**DD, resnet_op=partialclass(VideoResBlock, merge_strategy="fixed", alpha=0.25),
                  attn_op=lambda c: SpatialTransformer(c, n_heads=2, d_head=16), conv_out_op=nn.Conv2d).eval()
    assert isinstance(dec.mid.attn_1, SpatialTransformer) and isinstance(dec.up[1].attn[0], SpatialTransformer)
    assert dec.mid.block_2.get_alpha().item() == 0.25
    with torch.no_grad():
        assert dec(torch.randn(2, 4, 8, 8)).shape == (2, 3, 16, 16)  # no timesteps: one clip (a Conv2d takes no keywords)


def test_spatial_transformer_as_attn_op_from_yaml() -> None:
    dec = instantiate_from_config({"target": "vaetool.Decoder", "params": {**DD, "attn_op": {
        "target": "ldm.modules.attention.SpatialTransformer", "params": {"n_heads": 2, "d_head": 16}}}}).eval()
    assert isinstance(dec.mid.attn_1, SpatialTransformer)
    with torch.no_grad():
        assert torch.isfinite(dec(torch.randn(1, 4, 8, 8))).all()


@pytest.mark.parametrize(("op", "message"), [
    ({"resnet_op": "os.system"}, "'os.system' is not allowed"),
    ({"attn_op": 42}, "attn_op must be a target name or a mapping"),
    ({"conv_out_op": {"target": "torch.nn.Conv2d", "params": [1]}}, "conv_out_op: 'params' must be a mapping"),
])
def test_bad_ops_are_config_errors(op: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Decoder(**DD, **op)


def test_tiling_refuses_blocks_it_cannot_reproduce() -> None:
    class OwnResBlock(VideoResBlock):
        def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return x

    class OwnConv(nn.Conv2d):
        def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
            return super().forward(x) * 2

    cases = [({"resnet_op": OwnResBlock}, "res block OwnResBlock"), ({"conv_out_op": OwnConv}, "output conv OwnConv"),
             ({"attn_op": lambda c: SpatialTransformer(c, 2, 16)}, "attention block SpatialTransformer")]
    for op, message in cases:
        model = nn.Module()
        model.decoder = Decoder(**DD, **op)
        with pytest.raises(TilingUnsupported, match=message):
            decoder_program(model)
    model = nn.Module()
    model.decoder = instantiate_from_config({"target": "vaetool.Decoder", "params": {**DD, **VIDEO_OPS}})
    assert decoder_program(model, frames=2).ops  # the seeds' own video blocks tile


def test_identity_regularizer_passes_the_latent_through() -> None:
    enc = {**DD, "double_z": False}
    engine = instantiate_from_config({"target": "sgm.models.autoencoder.AutoencodingEngine", "params": {
        "encoder_config": {"target": "vaetool.Encoder", "params": enc},
        "decoder_config": {"target": "vaetool.Decoder", "params": enc},
        "regularizer_config": {"target": "sgm.modules.autoencoding.regularizers.IdentityRegularizer"}}}).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z, reg_log = engine.encode(x, return_reg_log=True)
        assert torch.equal(z, engine.encoder(x)) and reg_log == {}
        z2, dec, _ = engine(x)
    assert torch.equal(z2, z) and dec.shape == x.shape
    assert engine.regularization.get_trainable_parameters() == []
