"""DirectionSliders (move along directions in sigma units, live) and Arithmetic (A - B + C on prompts and noise,
with the in-distribution score beside the result)."""

from __future__ import annotations

import html

import ipywidgets as widgets
import torch

from latentlab import _checks
from latentlab.backend import Backend, Conditioning
from latentlab.ops import expected_norm, norm_zscore, renormalize
from latentlab.sampling import Sampling
from latentlab.widgets._base import Panel, check_key, check_text


class DirectionSliders(Panel):
    """One slider per direction; the image follows them live.

    ``noise_directions`` are shaped like one latent (e.g. :func:`latentlab.project.pca_direction` of a PCA of
    noise: one unit = one standard deviation of the data along it); the moved noise is put back on the Gaussian
    shell. ``prompt_directions`` are :class:`~latentlab.backend.Conditioning` differences (e.g.
    :func:`latentlab.atlas.prompt_direction`: one unit = the whole difference between two prompts).
    :meth:`from_atlas` builds both from an atlas.
    """

    def __init__(self, lab: Backend, prompt: str, seed: int, *, noise_directions: dict | None = None,
                 prompt_directions: dict | None = None, limit: float = 3.0, sampling: Sampling | None = None,
                 upscale: int = 4, preview: object = "auto"):
        super().__init__(lab, sampling=sampling, upscale=upscale, preview=preview)
        check_text(prompt)
        _checks.seed(seed)
        _checks.real(limit, "limit", low=0.0, low_inclusive=False)
        for name, value in (("noise_directions", noise_directions), ("prompt_directions", prompt_directions)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"`{name}` must be a dict of name -> direction or None, got {type(value).__name__}")
        self.base_prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                        layout=widgets.Layout(width="460px"))
        self.base_seed = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="180px"))
        self.noise_directions = dict(noise_directions or {})
        self.prompt_directions = dict(prompt_directions or {})
        shape = tuple(lab.latent_shape())
        for name, d in self.noise_directions.items():
            if not isinstance(d, torch.Tensor) or tuple(d.shape) != shape:
                raise ValueError(f"`noise_directions[{name!r}]` must be a tensor of shape {shape}, got "
                                 f"{tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__}")
        for name, d in self.prompt_directions.items():
            if not isinstance(d, Conditioning):
                raise TypeError(f"`prompt_directions[{name!r}]` must be a Conditioning, got {type(d).__name__}")
        self.sliders = {}
        for kind, dirs in (("noise", self.noise_directions), ("prompt", self.prompt_directions)):
            for name in dirs:
                s = widgets.FloatSlider(value=0.0, min=-limit, max=limit, step=0.1, description=f"{name}",
                                        continuous_update=True, style={"description_width": "140px"},
                                        layout=widgets.Layout(width="460px"))
                s.add_class(f"ll-slider-{kind}")
                self.sliders[(kind, name)] = s
                s.observe(lambda _: self.update(), "value")
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="256px", height="256px"))
        self.image.add_class("ll-frame")
        self.info = widgets.HTML("")
        self.base_prompt.observe(lambda _: self.update(), "value")
        self.base_seed.observe(lambda _: self.update(), "value")
        self.children = [widgets.HBox([self.base_prompt, self.base_seed]), *self.sliders.values(),
                         widgets.HBox([self.busy, self.frame_state]), self.error, widgets.HBox([self.image, self.info])]
        self.update()

    @classmethod
    def from_atlas(cls, lab: Backend, atlas, prompt: str, seed: int, *, n_components: int = 3,
                   prompt_pairs: list[tuple[str, str]] = (), **kw) -> DirectionSliders:
        """PCA directions of the atlas's noise (in sigma units) and prompt-difference directions."""
        from latentlab.atlas import prompt_direction
        from latentlab.project import PCA, pca_direction

        pca = PCA(n_components).fit(atlas.noise)
        noise = {f"noise PC{i + 1} (σ)": pca_direction(pca, i) for i in range(n_components)}
        prompts = {f"{a} − {b}": prompt_direction(lab, a, b) for a, b in prompt_pairs}
        return cls(lab, prompt, seed, noise_directions=noise, prompt_directions=prompts, **kw)

    def values(self) -> dict:
        return {f"{k}:{n}": s.value for (k, n), s in self.sliders.items()}

    def update(self) -> None:
        try:
            prompt, seed = check_text(self.base_prompt.value), _checks.seed(self.base_seed.value)
        except (TypeError, ValueError) as e:
            self.show_error(e)
            return
        amounts = {key: float(s.value) for key, s in self.sliders.items()}

        def work():
            z = self.lab.noise(seed).float()
            for (kind, name), k in amounts.items():
                if kind == "noise" and k:
                    z = z + k * self.noise_directions[name].to(z)
            z = renormalize(z)
            cond = self.lab.encode_prompt(prompt)
            for (kind, name), k in amounts.items():
                if kind == "prompt" and k:
                    d = self.prompt_directions[name]
                    cond = Conditioning.cat([cond, d]).map(lambda t, k=k: t[:1] + k * t[1:])
            moved = ", ".join(f"{n} {k:+.1f}" for (_, n), k in amounts.items() if k) or "no move"
            self.info.value = html.escape(moved)
            self.live(z, cond, lambda image: setattr(self.image, "value", self.png(image)))

        self.submit(work, tag="live")


class Arithmetic(Panel):
    """``wA·A − wB·B + wC·C`` on prompt embeddings and/or on noise, with each term's image and the result's
    in-distribution score: the noise norm z-score (|z| < 3 is typical noise; the raw sum of three seeds is far
    outside) and the prompt embedding's norm relative to A's."""

    def __init__(self, lab: Backend, a: tuple[str, int], b: tuple[str, int], c: tuple[str, int], *,
                 sampling: Sampling | None = None, upscale: int = 2):
        super().__init__(lab, sampling=sampling, upscale=upscale)
        check_key(a, "a"), check_key(b, "b"), check_key(c, "c")
        self.terms = []
        for name, (prompt, seed), w in (("A", a, 1.0), ("B", b, 1.0), ("C", c, 1.0)):
            p = widgets.Text(value=prompt, description=f"{name} prompt", continuous_update=False,
                             layout=widgets.Layout(width="400px"))
            s = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="160px"))
            wt = widgets.FloatSlider(value=w, min=0.0, max=2.0, step=0.05, description="weight",
                                     continuous_update=False, layout=widgets.Layout(width="300px"))
            img = widgets.Image(format="png", layout=widgets.Layout(width="96px", height="96px"))
            self.terms.append((p, s, wt, img))
        self.on_prompts = widgets.Checkbox(value=True, description="on prompt embeddings")
        self.on_noise = widgets.Checkbox(value=False, description="on noise")
        self.renormalize = widgets.Checkbox(value=True, description="put the noise back on the Gaussian shell")
        self.result = widgets.Image(format="png", layout=widgets.Layout(width="192px", height="192px"))
        self.result.add_class("ll-frame")
        self.score = widgets.HTML("")
        self.score.add_class("ll-score")
        rows = [widgets.HBox([p, s, wt, img]) for p, s, wt, img in self.terms]
        self.children = [*rows, widgets.HBox([self.on_prompts, self.on_noise, self.renormalize]),
                         widgets.HBox([self.busy]), self.error,
                         widgets.HBox([self.result, self.score])]
        for p, s, wt, _ in self.terms:
            for w in (p, s, wt):
                w.observe(lambda _: self.update(), "value")
        for w in (self.on_prompts, self.on_noise, self.renormalize):
            w.observe(lambda _: self.update(), "value")
        self.update()

    def compute(self):
        """(noise, conditioning, noise z-score, prompt norm ratio) of the current expression."""
        prompts = [check_text(p.value, f"{'ABC'[i]} prompt") for i, (p, _, _, _) in enumerate(self.terms)]
        seeds = [_checks.seed(s.value, f"{'ABC'[i]} seed") for i, (_, s, _, _) in enumerate(self.terms)]
        w = torch.tensor([float(wt.value) for _, _, wt, _ in self.terms]) * torch.tensor([1.0, -1.0, 1.0])
        cs = self.lab.encode_prompt(prompts)
        zs = self.lab.noise(seeds).float()
        if self.on_prompts.value:
            cond = cs.weighted_sum(w)
        else:
            cond = cs[0]
        if self.on_noise.value:
            z = (w.view(-1, 1, 1, 1) * zs).sum(0, keepdim=True)
            if self.renormalize.value:
                z = renormalize(z)
        else:
            z = zs[:1]
        ratio = float(cond.prompt_embeds.norm() / cs.prompt_embeds[0].norm())
        return z, cond, float(norm_zscore(z)[0]), ratio

    def update(self) -> None:
        try:
            z, cond, zscore, ratio = self.compute()
        except (TypeError, ValueError) as e:
            self.show_error(e)
            return

        def work():
            terms = self.lab.generate(self.lab.noise([int(s.value) for _, s, _, _ in self.terms]),
                                      self.lab.encode_prompt([p.value for p, _, _, _ in self.terms]),
                                      sampling=self.sampling, batch_size=3)
            for (_, _, _, img), im in zip(self.terms, terms):
                img.value = self.png(im)
            self.result.value = self.png(self.one(z, cond))
            typical = "typical noise" if abs(zscore) < 3 else "<b>out of distribution</b>"
            self.score.value = (f"noise norm z-score <b>{zscore:+.1f}</b> ({typical}; expected norm "
                                f"{expected_norm(z[0].numel()):.1f}, got {float(z.norm()):.1f})<br>"
                                f"prompt embedding norm: {ratio:.2f}× A's")

        self.submit(work, tag="score")
