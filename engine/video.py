"""Which frames of a `video_url` the model sees: vLLM's rule, or the reference guides'.

AIDC-AI's models take a video as a list of frames; choosing them is the caller's, and the
guides do it differently from vLLM:
- "uniform" (default): vLLM's loader, num_frames frames at np.linspace(0, total - 1) (all
  frames when the video has no more; vLLM's default num_frames is 32);
- "ovis2": the Ovis2 guide (its model card, 12 frames there): the middle of num_frames equal
  strides, min(total - 1, int((stride * i + stride * (i + 1)) / 2)); all frames when the video
  has no more;
- "ovis2.5": ovis/serve/infer_basic_demo.py of AIDC-AI/Ovis (8 frames there):
  int(i * total / num_frames) for i < num_frames, repeating frames of a video that has fewer.
Chosen with the video media options, per server (`--media-io-kwargs '{"video": {"num_frames": 12,
"sampling": "ovis2"}}'`) or per request (`media_io_kwargs`, which vLLM takes only from a server
started with --trust-request-mm-kwargs). The plugin makes this loader vLLM's default
(VLLM_VIDEO_LOADER_BACKEND=ovis unless set): without a `sampling` it decodes and samples exactly
as vLLM's own ("opencv"), whose subclass it is.
"""

from __future__ import annotations

from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoBackend

SAMPLINGS = ("uniform", "ovis2", "ovis2.5")


def guide_frame_indices(sampling: str, total: int, num_frames: int) -> list[int]:
    """The frames the guide of `sampling` ("ovis2" or "ovis2.5") takes from a video of `total`."""
    if sampling == "ovis2":
        if total <= num_frames:
            return list(range(total))
        stride = total / num_frames
        return [min(total - 1, int((stride * i + stride * (i + 1)) / 2)) for i in range(num_frames)]
    return [int(i * total / num_frames) for i in range(num_frames)]


@VIDEO_LOADER_REGISTRY.register("ovis")
class OvisVideoLoader(VideoBackend):
    @classmethod
    def compute_frames_index_to_sample(cls, source, target, sampling: str = "uniform", **kwargs) -> list[int]:
        if sampling not in SAMPLINGS:
            raise ValueError(f"video sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
        if sampling == "uniform":
            return super().compute_frames_index_to_sample(source, target, **kwargs)
        if target.fps > 0:
            raise ValueError(f"video sampling {sampling!r} takes num_frames, not fps")
        total = source.total_frames_num
        num_frames = target.num_frames if target.num_frames > 0 else total
        return guide_frame_indices(sampling, total, num_frames)
