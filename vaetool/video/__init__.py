"""Videos through the VAEs: frame sources and writers, chunked temporal decoding with overlap blending, and whole
clips through a causal video VAE (Wan 2.1, Qwen-Image)."""

from vaetool.video.causal import decode_causal, encode_causal, is_causal_vae, load_causal, save_causal
from vaetool.video.chunks import blend_weights, chunk_spans, decode_chunks, iter_decode_chunks
from vaetool.video.coding import DecodePlan, decode_video, encode_frames, frame_decoder, is_temporal, plan_decode
from vaetool.video.frames import VideoInfo, natural_key, open_frames
from vaetool.video.store import load_video_latents, save_video_latents, video_metadata
from vaetool.video.writers import check_output, open_writer

__all__ = [
    "DecodePlan", "VideoInfo", "blend_weights", "check_output", "chunk_spans", "decode_causal", "decode_chunks", "decode_video",
    "encode_causal", "encode_frames", "frame_decoder", "is_causal_vae", "is_temporal", "iter_decode_chunks", "load_causal",
    "load_video_latents", "natural_key", "open_frames", "open_writer", "plan_decode", "save_causal", "save_video_latents",
    "video_metadata",
]
