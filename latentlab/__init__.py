"""latentlab: explore the latent space of diffusion models.

``import latentlab`` loads torch and nothing heavier; diffusers, transformers, scikit-learn, umap, imageio and the
notebook packages are imported by the modules that own them, when first used.

>>> import latentlab
>>> z = latentlab.noise([1, 2], (2, 4, 8, 8))
>>> latentlab.slerp(z[:1], z[1:], 0.5).shape
torch.Size([1, 4, 8, 8])
"""

from latentlab._version import __version__ as __version__
from latentlab.backend import AttentionMix, Backend, Conditioning, Inversion, Lab, PredictionMix
from latentlab.clip import CLIP
from latentlab.ops import (
    add_direction,
    analogy,
    blend,
    expected_norm,
    grid,
    lerp,
    norm_zscore,
    renormalize,
    slerp,
)
from latentlab.paths import EASINGS, Schedule, circular_walk, ease, keyframe_path, schedule
from latentlab.sampling import Sampling
from latentlab.seeds import noise, variation_noise

__all__ = [
    "CLIP",
    "EASINGS",
    "AttentionMix",
    "Backend",
    "Conditioning",
    "Inversion",
    "Lab",
    "PredictionMix",
    "Sampling",
    "Schedule",
    "add_direction",
    "analogy",
    "blend",
    "circular_walk",
    "ease",
    "expected_norm",
    "grid",
    "keyframe_path",
    "lerp",
    "noise",
    "norm_zscore",
    "renormalize",
    "schedule",
    "slerp",
    "variation_noise",
]
