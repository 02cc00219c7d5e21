"""The latent atlas: many generations over seeds x prompts, with everything needed to map and explain them.

:mod:`~latentlab.atlas.core` holds the in-memory :class:`Atlas` (one file), its builder and its plot;
:mod:`~latentlab.atlas.shards` the sharded layout for atlases larger than memory or built by several processes.
"""

from latentlab.atlas.core import Atlas, apply_direction, build_atlas, plot_atlas, prompt_direction
from latentlab.atlas.shards import ShardedAtlas, build_atlas_shards

__all__ = ["Atlas", "ShardedAtlas", "apply_direction", "build_atlas", "build_atlas_shards", "plot_atlas",
           "prompt_direction"]
