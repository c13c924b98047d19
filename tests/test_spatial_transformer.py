"""SpatialTransformer and SpatialVideoTransformer against diffusers' Transformer2DModel and
TransformerSpatioTemporalModel at small random configs (fp32, 1e-4); context masks; checkpoint flags."""

from __future__ import annotations

import pytest
import torch

from vaetool.config import instantiate_from_config
from vaetool.nn.attention import use_attention
from vaetool.nn.spatial_transformer import SpatialTransformer, SpatialVideoTransformer

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel  # noqa: E402


def _wake(model: torch.nn.Module) -> None:
    """Random norms and mixers: diffusers starts LayerNorm at (1, 0) and mix factors at 0.5, which hides mistakes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "mix_factor" in name:
                p.add_(torch.randn_like(p) * 0.3)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(("context_dim", "depth", "use_linear"), [(None, 1, False), (24, 1, True), (24, 2, False), (None, 3, True)])
def test_spatial_transformer_matches_transformer2d(use_linear: bool, context_dim: int | None, depth: int) -> None:
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=depth, cross_attention_dim=context_dim,
        use_linear_projection=use_linear, double_self_attention=context_dim is None,  # attn2 self-attends without context
    ).eval()
    _wake(ref)
    ours = instantiate_from_config({"target": "ldm.modules.attention.SpatialTransformer", "params": {
        "in_channels": 32, "n_heads": 2, "d_head": 16, "depth": depth, "context_dim": context_dim, "use_linear": use_linear}})
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 32, 5, 7)
    ctx = torch.randn(2, 6, context_dim) if context_dim else None
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx).sample
        got = ours(x, context=ctx)
    assert got.shape == x.shape
    assert _max_diff(got, expected) <= 1e-4


def test_disable_self_attn_matches_only_cross_attention() -> None:
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, cross_attention_dim=24,
                                       only_cross_attention=True).eval()
    _wake(ref)
    ours = SpatialTransformer(32, 2, 16, context_dim=24, disable_self_attn=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 32, 4, 3), torch.randn(2, 5, 24)
    with torch.no_grad():
        assert _max_diff(ours(x, context=ctx), ref(x, encoder_hidden_states=ctx).sample) <= 1e-4


def test_context_mask_matches_encoder_attention_mask() -> None:
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
                                       cross_attention_dim=24).eval()
    _wake(ref)
    ours = SpatialTransformer(32, 2, 16, depth=2, context_dim=24).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 32, 4, 5), torch.randn(2, 6, 24)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)  # padded context tokens
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=keep.float()).sample
        unmasked = ours(x, context=ctx)
        for name in ("basic", "chunked", "sdpa", "split"):
            with use_attention(name):
                got = ours(x, context=ctx, context_mask=keep)
            assert _max_diff(got, expected) <= 1e-4, name
        trimmed = ours(x[:1], context=ctx[:1, :3])  # a mask is the same as leaving the tokens out
    assert _max_diff(got[:1], trimmed) <= 1e-5
    assert _max_diff(unmasked, expected) > 1e-3


def test_per_block_contexts_and_bad_lengths() -> None:
    st = SpatialTransformer(32, 2, 8, depth=2, context_dim=[12, 20]).eval()
    x = torch.randn(1, 32, 3, 3)
    c1, c2 = torch.randn(1, 4, 12), torch.randn(1, 5, 20)
    with torch.no_grad():
        out = st(x, context=[c1, c2])
        h = st.tokens(x)
        h = st.transformer_blocks[1](st.transformer_blocks[0](h, context=c1), context=c2)
        assert torch.allclose(out, st.image(h, 3, 3) + x, atol=1e-6)
    with pytest.raises(ValueError, match="context has 1 entries for 2 transformer blocks"):
        st(x, context=[c1])
    with pytest.raises(ValueError, match="context_dim has 3 entries"):
        SpatialTransformer(32, 2, 8, depth=2, context_dim=[1, 2, 3])


def _to_sgm_video(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers TransformerSpatioTemporalModel keys -> sgm SpatialVideoTransformer keys."""
    renames = {"temporal_transformer_blocks.": "time_stack.", "time_pos_embed.linear_1.": "time_pos_embed.0.",
               "time_pos_embed.linear_2.": "time_pos_embed.2."}
    out = {}
    for key, value in sd.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


@pytest.mark.parametrize(("frames", "depth"), [(3, 1), (2, 2)])
def test_spatial_video_transformer_matches_diffusers(frames: int, depth: int) -> None:
    torch.manual_seed(0)
    ref = TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                                   num_layers=depth, cross_attention_dim=24).eval()
    _wake(ref)
    ours = instantiate_from_config({"target": "sgm.modules.video_attention.SpatialVideoTransformer", "params": {
        "in_channels": 32, "n_heads": 2, "d_head": 16, "depth": depth, "context_dim": 24, "use_linear": True,
        "use_spatial_context": True, "merge_strategy": "learned_with_images", "ff_in": True}}).eval()
    ours.load_state_dict(_to_sgm_video(ref.state_dict()), strict=True)
    clips = 2
    x = torch.randn(clips * frames, 32, 3, 4)
    ctx = torch.randn(clips * frames, 5, 24)
    indicator = torch.zeros(clips, frames)
    indicator[1, 0] = 1.0  # one frame of the second clip is a still image: spatial only
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx, image_only_indicator=indicator).sample
        got = ours(x, context=ctx, timesteps=frames, image_only_indicator=indicator)
        still = ours(x, context=ctx, timesteps=frames, image_only_indicator=torch.ones(clips, frames))
        spatial = SpatialTransformer(32, 2, 16, depth=depth, context_dim=24, use_linear=True).eval()
        spatial.load_state_dict({k: v for k, v in ours.state_dict().items() if k in spatial.state_dict()})
    assert got.shape == x.shape
    assert _max_diff(got, expected) <= 1e-4
    assert _max_diff(still, spatial(x, context=ctx)) <= 1e-5  # all images: the temporal path drops out


def test_video_frames_mix_only_within_a_clip() -> None:
    torch.manual_seed(0)
    svt = SpatialVideoTransformer(32, 2, 16, merge_strategy="fixed", merge_factor=0.3).eval()
    x = torch.randn(4, 32, 2, 3)
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])  # not a constant: GroupNorm would remove it
    with torch.no_grad():
        a, b = svt(x, timesteps=2), svt(x2, timesteps=2)
    changed = (a - b).flatten(1).abs().amax(1)
    assert changed[1] > 1e-6 and (changed[2:] == 0).all()
    with pytest.raises(ValueError, match="timesteps=3"):
        svt(x, timesteps=3)
    with pytest.raises(ValueError, match="use_spatial_context needs a context"):
        SpatialVideoTransformer(32, 2, 16, context_dim=8, use_spatial_context=True)(x, timesteps=2)
    with pytest.raises(ValueError, match=r"n_heads \* d_head == in_channels"):
        SpatialVideoTransformer(32, 2, 8)


def test_checkpoint_flags_default_as_upstream() -> None:
    assert all(b.checkpoint for b in SpatialTransformer(32, 2, 8, depth=2).transformer_blocks)
    svt = SpatialVideoTransformer(32, 2, 16)
    assert not any(b.checkpoint for b in [*svt.transformer_blocks, *svt.time_stack])
