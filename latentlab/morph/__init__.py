"""Morphs and walks: keyframes (prompt and/or seed and/or image) -> per-frame (noise, prompt embedding) -> video +
manifest.

- :mod:`~latentlab.morph.settings`: :class:`Keyframe` and :class:`MorphSettings` (validated, serialisable).
- :mod:`~latentlab.morph.plan`: where every frame lies on the noise and prompt paths; perceptually even pacing.
- :mod:`~latentlab.morph.render`: frames in compute batches -> streamed video, frame cache, resume, lock.
- :mod:`~latentlab.morph.manifest`: the JSON record that re-creates any frame (:func:`render_frame`).
- :mod:`~latentlab.morph.music`: music videos: an audio track's analysis and the frame positions it (and ``--at``
  keyframe times) give.

All of it talks to the backend only through :class:`latentlab.backend.Backend`.
"""

from latentlab.morph.manifest import MANIFEST_VERSION, manifest_path, manifest_settings, read_manifest, render_frame
from latentlab.morph.plan import IMAGE_KEYFRAME_MIN_PSNR, Plan, clip_distance, pixel_distance, plan
from latentlab.morph.render import RenderLocked, cache_dir, check_render, frame_key, render_morph
from latentlab.morph.settings import (
                                      AUDIO_PACINGS,
                                      MAX_FRAMES,
                                      PACINGS,
                                      AudioTrack,
                                      Keyframe,
                                      Mix,
                                      MorphSettings,
                                      frames_for_duration,
)

__all__ = ["AUDIO_PACINGS", "IMAGE_KEYFRAME_MIN_PSNR", "MANIFEST_VERSION", "MAX_FRAMES", "PACINGS", "AudioTrack",
           "Keyframe", "Mix", "MorphSettings",
           "Plan", "RenderLocked", "cache_dir", "check_render", "clip_distance", "frame_key", "frames_for_duration",
           "manifest_path", "manifest_settings", "pixel_distance", "plan", "read_manifest", "render_frame",
           "render_morph"]
