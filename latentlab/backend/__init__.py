"""The generation backend: :class:`Lab` over diffusers, the :class:`Backend` contract the upper layers use, and
the records both hand out. ``import latentlab.backend`` does not import diffusers (it is loaded on first use)."""

from latentlab.backend.lab import CPU_BATCH_SIZE, Lab
from latentlab.backend.protocol import Backend
from latentlab.backend.records import Conditioning, Inversion, Trajectory
from latentlab.sampling import Sampling

__all__ = ["CPU_BATCH_SIZE", "Backend", "Conditioning", "Inversion", "Lab", "Sampling", "Trajectory"]
