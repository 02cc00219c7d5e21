"""The latent atlas: many generations over seeds x prompts, with everything needed to map and explain them.

:mod:`~latentlab.atlas.core` holds the in-memory :class:`Atlas` (one file), its builder and its plot;
:mod:`~latentlab.atlas.shards` the sharded layout for atlases larger than memory or built by several processes;
:mod:`~latentlab.atlas.inverse` the generative map (:class:`AtlasMap`: a click -> the image that lands there).
"""

from latentlab.atlas.core import Atlas, apply_direction, build_atlas, plot_atlas, prompt_direction
from latentlab.atlas.inverse import AtlasMap, Landing
from latentlab.atlas.shards import ShardedAtlas, build_atlas_shards

__all__ = ["Atlas", "AtlasMap", "Landing", "ShardedAtlas", "apply_direction", "build_atlas", "build_atlas_shards", "plot_atlas",
           "prompt_direction"]
