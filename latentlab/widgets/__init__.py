"""Notebook widgets (ipywidgets + two small anywidget front ends): the interactive half of latentlab.

The one owner of ipywidgets/anywidget; ``import latentlab`` never imports this package. Every widget takes a
backend (``latentlab.Lab.default()`` or any :class:`latentlab.Backend`), renders in a background worker that keeps
only the latest request (the kernel and the page never block), shows a busy indicator and shows errors inside
itself, and generates interactive single images at compute batch 1.

- :class:`SeedBrowser`: pages of seeds, picks, variations, code.
- :class:`Interpolator`: A -> B with lerp/slerp per path, the norm lesson, a diagnosed strip, a video render.
- :class:`DirectionSliders`: sliders along PCA and prompt directions in sigma units.
- :class:`Arithmetic`: A − B + C on prompts and noise with the in-distribution score.
- :class:`AtlasExplorer`: a 2-D map of an atlas: hover, lasso, click anywhere to generate, draw a path to a video.
- :class:`TimestepScrubber`, :class:`TokenView`, :class:`TrajectoryMap`: the explainers (x_t and predicted x0 at
  every step; prompt -> tokens -> conditioning; where two prompts' paths split), for one model or several.
- :class:`ToyLab`: train a 2-D diffusion and a 2-D flow model live and watch their fields and paths.
"""

from latentlab.widgets.browse import SeedBrowser
from latentlab.widgets.directions import Arithmetic, DirectionSliders
from latentlab.widgets.explain import TimestepScrubber, TokenView, TrajectoryMap
from latentlab.widgets.explore import AtlasExplorer
from latentlab.widgets.interpolate import Interpolator
from latentlab.widgets.toy import ToyLab

__all__ = ["Arithmetic", "AtlasExplorer", "DirectionSliders", "Interpolator", "SeedBrowser", "TimestepScrubber", "TokenView", "ToyLab",
           "TrajectoryMap"]
