"""The SVD temporal decoder: parity with diffusers, time modes, AlphaBlender, transformer pieces."""

from __future__ import annotations

import math

import pytest
import torch

from vaetool.config import instantiate_from_config
from vaetool.keymaps import to_original
from vaetool.nn.attention import BACKENDS, use_attention
from vaetool.nn.blending import AlphaBlender
from vaetool.nn.coders import Decoder
from vaetool.nn.temporal import TIME_MODES, AE3DConv, AttnVideoBlock, VideoDecoder, VideoResBlock, partialclass
from vaetool.nn.transformer import BasicTransformerBlock, CrossAttention, FeedForward, timestep_embedding

# diffusers' temporal mid block has `layers_per_block` resnets, the original layout always two
# (block_1, attn_1, block_2), so layers_per_block must be 2 for the two layouts to correspond.
TINY = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [], "in_channels": 3,
        "out_ch": 3, "resolution": 32, "z_channels": 4, "double_z": True}


@pytest.fixture(scope="module")
def svd_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny diffusers AutoencoderKLTemporalDecoder with a live temporal path, and vaetool's twin."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2, latent_channels=4
    ).eval()
    with torch.no_grad():  # diffusers starts every mix_factor at 0 (alpha 1/2 hides the merge order)
        for name, p in ref.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn_like(p) * 1.5)
            elif "norm" in name or "temporal_res_block" in name or "time_conv_out" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = {"target": "vaetool.AutoencodingEngine", "params": {
        "encoder_config": {"target": "vaetool.Encoder", "params": TINY},
        "decoder_config": {"target": "vaetool.VideoDecoder", "params": {**TINY, "video_kernel_size": [3, 1, 1]}},
        "use_quant_conv": True, "use_post_quant_conv": False, "embed_dim": 4}}
    ours = instantiate_from_config(cfg).eval()
    ours.load_state_dict(to_original(ref.state_dict()), strict=True)
    return ref, ours


def test_encoder_moments_match_diffusers(svd_pair) -> None:
    ref, ours = svd_pair
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        diff = (ref.encode(x).latent_dist.parameters - ours.encode_moments(x)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("frames", [6, 3])  # one clip of 6, and two clips of 3
def test_decode_matches_diffusers(svd_pair, frames: int) -> None:
    ref, ours = svd_pair
    z = torch.randn(6, 4, 5, 7)  # non-square latent
    with torch.no_grad():
        expected = ref.decode(z, num_frames=frames).sample
        got = ours.decode(z, timesteps=frames)
    assert got.shape == expected.shape == (6, 3, 10, 14)
    assert (got - expected).abs().max().item() <= 1e-4


def test_mix_factor_weights_the_temporal_branch(svd_pair) -> None:
    # merged = sigmoid(mix_factor) * temporal + (1 - sigmoid) * spatial (the sgm code and diffusers agree)
    _, ours = svd_pair
    block = ours.decoder.mid.block_1
    x = torch.randn(3, 64, 3, 4)
    with torch.no_grad():
        spatial = block(x, None, skip_video=True, timesteps=3)
        temporal = block.time_stack(spatial.permute(1, 0, 2, 3)[None]).squeeze(0).permute(1, 0, 2, 3)
        a = torch.sigmoid(block.mix_factor)
        assert torch.allclose(block(x, None, timesteps=3), a * temporal + (1 - a) * spatial, atol=1e-5)


# ---- time modes and merge strategies ---------------------------------------------------------

SMALL = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "in_channels": 3,
         "out_ch": 3, "resolution": 16, "z_channels": 4}
RES_KEYS = [f"time_stack.{p}.{leaf}" for p in ("in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3")
            for leaf in ("weight", "bias")] + ["mix_factor"]
BLOCK_KEYS = ["norm_in", "ff_in.net.0.proj", "ff_in.net.2", "attn1.to_out.0", "attn2.to_out.0", "norm1", "norm2",
              "norm3", "ff.net.0.proj", "ff.net.2"]
ATTN_KEYS = ([f"time_mix_block.{m}.{leaf}" for m in BLOCK_KEYS for leaf in ("weight", "bias")]
             + [f"time_mix_block.attn{i}.to_{p}.weight" for i in (1, 2) for p in "qkv"]
             + [f"video_time_embed.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")] + ["mix_factor"])


def _expected_extra_keys(plain: dict[str, torch.Tensor], mode: str) -> set[str]:
    parts = TIME_MODES[mode]
    res = {k[: -len(".conv1.weight")] for k in plain if k.endswith(".conv1.weight")}
    attn = {k[: -len(".q.weight")] for k in plain if k.endswith(".q.weight")}
    extra = {f"{p}.{s}" for p in res for s in RES_KEYS} if parts.res else set()
    extra |= {f"{p}.{s}" for p in attn for s in ATTN_KEYS} if parts.attn else set()
    return extra | ({"conv_out.time_mix_conv.weight", "conv_out.time_mix_conv.bias"} if parts.conv else set())


@pytest.mark.parametrize("merge_strategy", ["fixed", "learned"])
@pytest.mark.parametrize("mode", list(TIME_MODES))
def test_time_modes_build_and_run(mode: str, merge_strategy: str) -> None:
    torch.manual_seed(0)
    plain = Decoder(**SMALL).state_dict()
    dec = VideoDecoder(**SMALL, time_mode=mode, merge_strategy=merge_strategy, alpha=0.3,
                       video_kernel_size=[3, 1, 1]).eval()
    sd = dec.state_dict()
    assert set(plain) <= set(sd)
    assert set(sd) - set(plain) == _expected_extra_keys(plain, mode)
    mixers = [k for k in sd if k.endswith("mix_factor")]
    assert all(sd[k].item() == pytest.approx(0.3) for k in mixers)
    params = dict(dec.named_parameters())
    assert all((k in params) == (merge_strategy == "learned") for k in mixers)  # "fixed": a buffer
    z = torch.randn(4, 4, 8, 6)
    with torch.no_grad():
        out = dec(z, timesteps=2)
        assert out.shape == (4, 3, 16, 12) and torch.isfinite(out).all()
        assert torch.equal(dec(z), dec(z, timesteps=4))  # no timesteps: the whole batch is one clip
    last = dec.get_last_layer()
    assert last.ndim == (5 if TIME_MODES[mode].conv else 4)


@pytest.mark.parametrize("mode", ["all", "conv-only", "attn-only"])
def test_clips_are_independent(mode: str) -> None:
    torch.manual_seed(0)
    dec = VideoDecoder(**SMALL, time_mode=mode, video_kernel_size=3).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # wake the zero-initialised temporal convs
        z = torch.randn(6, 4, 4, 4)
        z2 = z.clone()
        z2[0] += 1.0
        a, b = dec(z, timesteps=3), dec(z2, timesteps=3)
    changed = (a - b).flatten(1).abs().amax(1)
    assert (changed[1:3] > 1e-6).all()  # frames of the same clip see frame 0
    assert (changed[3:] == 0).all()  # the other clip does not


def test_neutral_temporal_parts_reduce_to_the_image_decoder() -> None:
    torch.manual_seed(0)
    dec = VideoDecoder(**SMALL, time_mode="conv-only", merge_strategy="fixed", alpha=0.0).eval()
    with torch.no_grad():
        w = dec.conv_out.time_mix_conv.weight
        w.zero_()
        w[range(3), range(3), 1, 1, 1] = 1.0  # identity over time
        dec.conv_out.time_mix_conv.bias.zero_()
        plain = Decoder(**SMALL).eval()
        plain.load_state_dict({k: v for k, v in dec.state_dict().items() if k in plain.state_dict()})
        z = torch.randn(3, 4, 4, 5)
        assert torch.allclose(dec(z, timesteps=3), plain(z), atol=1e-5)


@pytest.mark.parametrize("bad", [{"time_mode": "sometimes"}, {"merge_strategy": "learned_with_images"},
                                 {"merge_strategy": "average"}, {"video_kernel_size": [3, 1]}])
def test_bad_config_is_a_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        VideoDecoder(**SMALL, **bad)


def test_frames_must_divide_the_batch() -> None:
    dec = VideoDecoder(**SMALL)
    with pytest.raises(ValueError, match="timesteps=4"):
        dec(torch.randn(6, 4, 4, 4), timesteps=4)


def test_partialclass_binds_arguments() -> None:
    cls = partialclass(AE3DConv, video_kernel_size=[3, 1, 1])
    conv = cls(8, 3, kernel_size=3, padding=1)
    assert isinstance(conv, AE3DConv) and cls.__name__ == "AE3DConv"
    assert conv.time_mix_conv.kernel_size == (3, 1, 1) and conv.time_mix_conv.padding == (1, 0, 0)
    block = partialclass(VideoResBlock, merge_strategy="fixed", alpha=0.25)(in_channels=32, out_channels=64,
                                                                           temb_channels=0)
    assert "mix_factor" in dict(block.named_buffers()) and block.get_alpha().item() == 0.25


# ---- AlphaBlender ------------------------------------------------------------------------------

def test_alpha_blender_fixed_and_learned() -> None:
    s, t = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    fixed = AlphaBlender(0.3, merge_strategy="fixed")
    assert "mix_factor" in fixed.state_dict() and not list(fixed.parameters())
    assert torch.allclose(fixed(s, t), 0.3 * s + 0.7 * t)
    learned = AlphaBlender(0.5, merge_strategy="learned")
    a = 1 / (1 + math.exp(-0.5))
    assert [n for n, _ in learned.named_parameters()] == ["mix_factor"]
    assert torch.allclose(learned(s, t), a * s + (1 - a) * t)


def test_alpha_blender_learned_with_images() -> None:
    indicator = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # [b=2, t=3]
    a = 1 / (1 + math.exp(0.4))
    tokens = AlphaBlender(-0.4)  # default pattern: [(b t), tokens, channels]
    s, t = torch.randn(6, 5, 3), torch.randn(6, 5, 3)
    out = tokens(s, t, image_only_indicator=indicator)
    for i, is_image in enumerate(indicator.flatten().tolist()):
        w = 1.0 if is_image else a
        assert torch.allclose(out[i], w * s[i] + (1 - w) * t[i])
    video = AlphaBlender(-0.4, rearrange_pattern="b t -> b 1 t 1 1")  # [b, c, t, h, w]
    s5, t5 = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    out5 = video(s5, t5, image_only_indicator=indicator)
    assert torch.equal(out5[0, :, 0], s5[0, :, 0]) and torch.allclose(out5[1, :, 0], a * s5[1, :, 0] + (1 - a) * t5[1, :, 0])
    with pytest.raises(ValueError, match="image_only_indicator"):
        tokens(s, t)
    with pytest.raises(ValueError, match="merge_strategy"):
        AlphaBlender(0.0, merge_strategy="average")


# ---- transformer pieces ------------------------------------------------------------------------

def test_timestep_embedding_known_values() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 2.0]), 4)
    c, s = math.cos, math.sin
    expected = torch.tensor([[1, 1, 0, 0], [c(1), c(0.01), s(1), s(0.01)], [c(2), c(0.02), s(2), s(0.02)]])
    assert torch.allclose(emb, expected.float(), atol=1e-6)
    odd = timestep_embedding(torch.tensor([3.0]), 5)
    assert odd.shape == (1, 5) and odd[0, 4] == 0 and torch.allclose(odd[0, :4], timestep_embedding(torch.tensor([3.0]), 4)[0])
    assert torch.equal(timestep_embedding(torch.tensor([2, 7]), 3, repeat_only=True), torch.tensor([[2, 2, 2], [7, 7, 7]]))
    emb_d = pytest.importorskip("diffusers.models.embeddings").get_timestep_embedding(
        torch.arange(5), 16, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    assert torch.allclose(timestep_embedding(torch.arange(5), 16), emb_d, atol=1e-6)


def test_transformer_state_dict_names() -> None:
    block = BasicTransformerBlock(dim=16, n_heads=2, d_head=8, ff_in=True)
    names = set(block.state_dict())
    assert {"ff.net.0.proj.weight", "ff.net.2.weight", "ff_in.net.0.proj.weight", "norm_in.weight",
            "attn1.to_q.weight", "attn2.to_out.0.bias"} <= names
    assert "attn1.to_q.bias" not in names
    plain = FeedForward(16, glu=False)
    assert set(plain.state_dict()) == {"net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"}
    with pytest.raises(ValueError):
        BasicTransformerBlock(16, 2, 8, disable_temporal_crossattention=True, switch_temporal_ca_to_sa=True)


@pytest.mark.parametrize("kwargs", [{"ff_in": True}, {"context_dim": 12}, {"inner_dim": 24, "n_heads": 3},
                                    {"context_dim": 12, "switch_temporal_ca_to_sa": True, "disable_self_attn": True}])
def test_transformer_block_same_on_every_backend(kwargs: dict) -> None:
    torch.manual_seed(0)
    params = {"dim": 16, "n_heads": 2, "d_head": 8, **kwargs}
    block = BasicTransformerBlock(**params).eval()
    x, ctx = torch.randn(3, 7, 16), torch.randn(3, 5, 12)
    context = ctx if "context_dim" in kwargs else None
    outs = {}
    with torch.no_grad():
        for name in BACKENDS:
            with use_attention(name):
                outs[name] = block(x, context=context)
    ref = outs.pop("basic")
    assert ref.shape == x.shape
    for name, out in outs.items():
        assert (out - ref).abs().max().item() <= 1e-5, name


def test_cross_attention_matches_manual() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(8, context_dim=6, heads=2, dim_head=4).eval()
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    q, k, v = (t.view(2, -1, 2, 4).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
    w = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    manual = attn.to_out((w @ v).transpose(1, 2).reshape(2, 3, 8))
    with torch.no_grad():
        assert torch.allclose(attn(x, context=ctx), manual, atol=1e-6)


def test_attn_video_block_same_on_every_backend() -> None:
    torch.manual_seed(0)
    block = AttnVideoBlock(32, alpha=0.2).eval()
    x = torch.randn(4, 32, 3, 2)
    with torch.no_grad():
        outs = {}
        for name in BACKENDS:
            with use_attention(name):
                outs[name] = block(x, timesteps=2)
        assert torch.allclose(block(x, skip_time_block=True), x + block.proj_out(block.attention(x)))
    ref = outs.pop("basic")
    assert all((o - ref).abs().max().item() <= 1e-5 for o in outs.values())
