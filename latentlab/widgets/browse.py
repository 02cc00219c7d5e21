"""SeedBrowser: pages of seeds at one prompt, pick some, explore variations around a pick, get the code."""

from __future__ import annotations

import ipywidgets as widgets
import torch
import traitlets

from latentlab import _checks
from latentlab.backend import Backend
from latentlab.ops import slerp
from latentlab.sampling import Sampling
from latentlab.widgets._base import Panel, check_text, data_url
from latentlab.widgets._front import ThumbGrid


class SeedBrowser(Panel):
    """A grid of thumbnails, one per seed, page by page; click to pick (``picked`` lists the picked seeds).

    Below, variations around the last pick: the pick's noise slerped towards other seeds' by ``strength``
    (variation seeds, as :func:`latentlab.variation_noise`, over the model's own noise for each seed). "Show code" prints the library lines that re-create the
    picked images.

    Examples
    --------
    >>> import latentlab as ll
    >>> from latentlab.widgets import SeedBrowser
    >>> browser = SeedBrowser(ll.Lab.default(), "a large red star on a blue background", page_size=4)
    >>> browser.wait()
    True
    >>> browser.grid.labels
    ['seed 0', 'seed 1', 'seed 2', 'seed 3']
    """

    picked = traitlets.List(traitlets.Int())

    def __init__(self, lab: Backend, prompt: str, *, first_seed: int = 0, page_size: int = 16, columns: int = 8,
                 variations: int = 8, sampling: Sampling | None = None, upscale: int = 1):
        super().__init__(lab, sampling=sampling, upscale=upscale)
        check_text(prompt)
        _checks.seed(first_seed, "first_seed")
        self.page_size = _checks.positive_int(page_size, "page_size")
        self.n_variations = _checks.positive_int(variations, "variations")
        _checks.positive_int(columns, "columns")
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="520px"))
        self.first = widgets.IntText(value=first_seed, description="first seed", layout=widgets.Layout(width="200px"))
        self.prev = widgets.Button(description="◀ page", layout=widgets.Layout(width="80px"))
        self.next = widgets.Button(description="page ▶", layout=widgets.Layout(width="80px"))
        self.grid = ThumbGrid(columns=columns, size=80)
        self.grid.add_class("ll-seed-grid")
        self.strength = widgets.FloatSlider(value=0.15, min=0.0, max=1.0, step=0.05, description="variation",
                                            continuous_update=False)
        self.variation_grid = ThumbGrid(columns=variations, size=80)
        self.variation_grid.add_class("ll-variation-grid")
        self.code_button = widgets.Button(description="Show code")
        self.code = widgets.HTML("")
        self.code.add_class("ll-code")
        self._page_seeds: list[int] = []
        self.children = [
            widgets.HBox([self.prompt]), widgets.HBox([self.first, self.prev, self.next, self.busy]), self.error,
            self.grid, widgets.HTML("<b>Variations around the last pick</b>"), self.strength, self.variation_grid,
            widgets.HBox([self.code_button]), self.code,
        ]
        self.prompt.observe(lambda _: self.refresh(), "value")
        self.first.observe(lambda _: self.refresh(), "value")
        self.prev.on_click(lambda _: self._turn(-1))
        self.next.on_click(lambda _: self._turn(1))
        self.grid.observe(self._grid_changed, "selected")
        self.strength.observe(lambda _: self._variations(), "value")
        self.code_button.on_click(lambda _: self._show_code())
        self.refresh()

    def _turn(self, step: int) -> None:
        self.first.value = max(0, self.first.value + step * self.page_size)

    def refresh(self) -> None:
        """Render the current page (in the background)."""
        try:
            prompt = check_text(self.prompt.value)
            first = _checks.seed(self.first.value, "first seed")
            _checks.seed(first + self.page_size - 1, "last seed of the page")
        except (TypeError, ValueError) as e:
            self.show_error(e)
            return
        seeds = list(range(first, first + self.page_size))

        def work():
            images = self.lab.generate(self.lab.noise(seeds), self.lab.encode_prompt(prompt), sampling=self.sampling)
            self._page_seeds = seeds
            self.grid.labels = [f"seed {s}" for s in seeds]
            self.grid.images = [data_url(im, upscale=self.upscale) for im in images]
            self.grid.selected = [i for i, s in enumerate(seeds) if s in self.picked]

        self.submit(work, tag="page")

    def _grid_changed(self, change) -> None:
        on_page = {self._page_seeds[i] for i in change["new"] if i < len(self._page_seeds)}
        kept = [s for s in self.picked if s not in self._page_seeds]
        new = kept + [s for s in self._page_seeds if s in on_page]
        if new != self.picked:
            self.picked = new
            self._variations()

    def _variations(self) -> None:
        if not self.picked:
            self.variation_grid.images, self.variation_grid.labels = [], []
            return
        seed, strength, prompt = self.picked[-1], float(self.strength.value), self.prompt.value
        subseeds = [seed + 1 + k for k in range(self.n_variations)]

        def work():
            base = self.lab.noise([seed] * self.n_variations, dtype=torch.float32).cpu()
            z = slerp(base, self.lab.noise(subseeds, dtype=torch.float32).cpu(), strength)
            images = self.lab.generate(z, self.lab.encode_prompt(check_text(prompt)), sampling=self.sampling)
            self.variation_grid.labels = [f"{seed}→{s} @{strength:.2f}" for s in subseeds]
            self.variation_grid.images = [data_url(im, upscale=self.upscale) for im in images]

        self.submit(work, tag="variations")

    def code_lines(self) -> list[str]:
        """Library code that re-creates the picked images."""
        s = self.sampling
        return [
            "import latentlab as ll",
            "lab = ll.Lab.default()" if self.lab.model_id == "latentlab/embedded-shapes"
            else f"lab = ll.Lab.from_pretrained({self.lab.model_id!r})",
            (f"sampling = ll.Sampling(num_inference_steps={s.num_inference_steps}, "
             f"guidance_scale={s.guidance_scale!r}, negative_prompt={s.negative_prompt!r}, scheduler={s.scheduler!r})"),
            (f"images = lab.generate(lab.noise({list(self.picked)}), lab.encode_prompt({self.prompt.value!r}), "
             "sampling=sampling)"),
        ]

    def _show_code(self) -> None:
        import html

        if not self.picked:
            self.show_error("pick at least one seed first (click a thumbnail)")
            return
        self.code.value = "<pre>" + html.escape("\n".join(self.code_lines())) + "</pre>"

    def images(self) -> torch.Tensor:
        """The picked images, generated again (what :meth:`code_lines` re-creates)."""
        return self.lab.generate(self.lab.noise(list(self.picked)), self.lab.encode_prompt(self.prompt.value),
                                 sampling=self.sampling)
