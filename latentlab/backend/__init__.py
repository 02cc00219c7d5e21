"""The generation backend: :class:`Lab` over diffusers (an engine plus one adapter per model family), the
:class:`Backend` contract the upper layers use, and the records both hand out. ``import latentlab.backend`` does
not import diffusers (it is loaded on first use)."""

from latentlab.backend.engine import CPU_BATCH_SIZE
from latentlab.backend.lab import Lab
from latentlab.backend.protocol import Backend
from latentlab.backend.records import AttentionMix, Conditioning, Inversion, PredictionMix, Tokens, Trajectory
from latentlab.sampling import Sampling

__all__ = ["CPU_BATCH_SIZE", "AttentionMix", "Backend", "Conditioning", "Inversion", "Lab", "PredictionMix", "Sampling", "Tokens",
           "Trajectory"]
