"""What every latentlab widget shares (widgets layer, private): the backend and its resolved sampling, one
latest-request worker, a busy indicator and an error line inside the widget, and image encoding."""

from __future__ import annotations

import base64
import html
import itertools
from pathlib import Path

import ipywidgets as widgets
import torch

from latentlab import _checks, _tensors
from latentlab.backend import Backend
from latentlab.sampling import Sampling
from latentlab.video import png_bytes
from latentlab.widgets._worker import LatestWorker


def data_url(image: torch.Tensor, *, upscale: int = 1) -> str:
    """A (3, H, W) image in [0, 1] as a PNG data URL (for thumbnails in the front ends)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, upscale=upscale)).decode()


class WorkerPanel(widgets.VBox):
    """A VBox with a latest-request worker, a busy indicator and an error line (no model: the toy lessons)."""

    #: Torch threads the worker's jobs run with (None: the process's setting). Widgets whose work is one image at
    #: a time set 1: latency-bound work gains nothing from a second thread and loses a lot when the other core is
    #: busy (see :func:`latentlab._tensors.threads`).
    torch_threads: int | None = None

    def __init__(self, *, upscale: int = 4, **kw):
        self.upscale = _checks.positive_int(upscale, "upscale")
        self.busy = widgets.HTML("", layout=widgets.Layout(min_height="20px"))
        self.busy.add_class("ll-busy")
        self.error = widgets.HTML("")
        self.error.add_class("ll-error")
        self._worker = LatestWorker(self._set_busy, self.show_error)
        super().__init__(**kw)

    def _set_busy(self, busy: bool) -> None:
        self.busy.value = "<span style='color:#1c7ed6'>working…</span>" if busy else ""

    def show_error(self, e: BaseException | str) -> None:
        """Show an error inside the widget (the kernel stays usable)."""
        text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        self.error.value = f"<span style='color:#c92a2a'>{html.escape(text)}</span>"

    def clear_error(self) -> None:
        self.error.value = ""

    def submit(self, fn, *, tag: str | None = None) -> None:
        """Run ``fn`` on this widget's worker (only the latest request waits), clearing the last error first;
        ``tag``: the kind of request (:meth:`LatestWorker.submit`; "live" for :meth:`Panel.live` jobs)."""
        def run():
            self.clear_error()
            if self.torch_threads is None:
                fn()
            else:
                with _tensors.threads(self.torch_threads):
                    fn()

        self._worker.submit(run, tag=tag)

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until this widget's pending work is done (for scripts and tests)."""
        return self._worker.wait(timeout)

    def png(self, image: torch.Tensor) -> bytes:
        return png_bytes(image, upscale=self.upscale)


_FAST: dict[str, Backend] = {}


def preview_lab(lab: Backend, preview: object) -> Backend | None:
    """The model that draws previews while a control moves: ``None`` (off), a backend whose latents and
    conditioning fit ``lab``'s (e.g. a few-step distillation of it), or ``"auto"``: the embedded few-step model
    when ``lab`` is the embedded default model (they share the text encoder and the latent space), else off."""
    if preview is None:
        return None
    if isinstance(preview, str):
        if preview != "auto":
            raise ValueError(f"`preview` must be None, 'auto' or a latentlab backend, got {preview!r}")
        from latentlab import embedded

        if embedded.resolve(getattr(lab, "model_id", None)) != "embedded-shapes" or not embedded.is_available(
                "embedded-shapes-fast") or lab.device.type != "cpu":
            return None
        if "fast" not in _FAST:
            from latentlab.backend import Lab

            _FAST["fast"] = Lab.default("embedded-shapes-fast")
        return _FAST["fast"]
    if not isinstance(preview, Backend):
        raise TypeError(f"`preview` must be None, 'auto' or a latentlab backend, got {type(preview).__name__}")
    if tuple(preview.latent_shape()) != tuple(lab.latent_shape()):
        raise ValueError(f"`preview` makes latents of shape {tuple(preview.latent_shape())}, but `lab` makes "
                         f"{tuple(lab.latent_shape())}: a preview model must share the latent space")
    a, b = preview.encode_prompt(""), lab.encode_prompt("")
    if a.prompt_embeds.shape[1:] != b.prompt_embeds.shape[1:]:
        raise ValueError(f"`preview` conditioning has shape {tuple(a.prompt_embeds.shape[1:])}, `lab`'s "
                         f"{tuple(b.prompt_embeds.shape[1:])}: a preview model must share the text encoder")
    return preview


class Panel(WorkerPanel):
    """A :class:`WorkerPanel` over a backend and its resolved sampling.

    With a ``preview`` model (the live widgets pass ``"auto"``: the embedded few-step model for the embedded default
    model; see :func:`preview_lab`),
    :meth:`live` draws its image first while a control is moving, and the full model's image once the control has
    rested for :attr:`settle` seconds; :attr:`frame_state` says which is on screen.
    """

    #: Seconds without a new request before the full model's image replaces the preview.
    settle: float = 0.25
    #: Denoising steps of a preview.
    preview_steps: int = 2

    def __init__(self, lab: Backend, *, sampling: Sampling | None = None, upscale: int = 4, preview: object = None,
                 **kw):
        if not isinstance(lab, Backend):
            raise TypeError(f"`lab` must be a latentlab backend (e.g. latentlab.Lab.default()), got {type(lab).__name__}")
        self.lab = lab
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"`sampling` must be a latentlab.Sampling or None, got {type(sampling).__name__}")
        self.sampling = lab.sampling(sampling)  # validated and complete before anything is drawn
        self.preview = preview_lab(lab, preview)
        self.frame_state = widgets.HTML("")
        self.frame_state.add_class("ll-frame-state")
        self.drawn = {"preview": 0, "final": 0}
        super().__init__(upscale=upscale, **kw)

    def live(self, latents: torch.Tensor, conditioning, draw, sampling: Sampling | None = None) -> None:
        """From inside a worker job submitted with ``tag="live"``: ``draw(image)`` the preview model's image now (if
        there is one), then the full model's once no newer live request has come for :attr:`settle` seconds (a newer
        live request drops it)."""
        if self.preview is not None:
            self._draw_preview(latents, conditioning, draw, "the full image follows when you stop")
            # Only a newer move of the control replaces the final image; another kind of request (a strip, a
            # render) waits for it, or the preview would stay on screen under a "preview" label.
            if not self._worker.quiet(self.settle) and "live" in self._worker.pending_tags:
                return
        draw(self.one(latents, conditioning, sampling))
        s = sampling or self.sampling
        self._state("final", f"final · {s.num_inference_steps} steps")

    def _draw_preview(self, latents: torch.Tensor, conditioning, draw, then: str) -> None:
        """``draw`` the preview model's image of one item (one thread: latency-bound, see
        WorkerPanel.torch_threads) and label it a preview, saying what follows (``then``)."""
        s = self.preview.sampling(num_inference_steps=self.preview_steps)
        with _tensors.threads(1):
            image = self.preview.generate_live(latents, conditioning, sampling=s, preview=True)
        draw(image)
        self._state("preview", f"preview · {html.escape(str(self.preview.model_id))} · {s.num_inference_steps} "
                    f"steps ({then})")

    def _state(self, state: str, text: str) -> None:
        self.drawn[state] += 1
        colour = "#e8590c" if state == "preview" else "#2f9e44"
        self.frame_state.value = f"<span class='ll-{state}' style='color:{colour}'>{text}</span>"

    def one(self, latents: torch.Tensor, conditioning, sampling: Sampling | None = None) -> torch.Tensor:
        """Generate interactively: compute batch 1, so a single image pays for one item (``generate_live``: the same
        image as ``generate(..., batch_size=1)``, faster)."""
        return self.lab.generate_live(latents, conditioning, sampling=sampling or self.sampling)


def free_path(folder: Path, stem: str, suffix: str = ".mp4") -> Path:
    """``folder/stem-N.suffix`` for the first N whose file and manifest do not exist: never overwrite a user's file."""
    for k in itertools.count(1):
        p = folder / f"{stem}-{k}{suffix}"
        if not p.exists() and not p.with_name(p.name + ".json").exists():
            return p
    raise AssertionError("unreachable")


def check_key(value: object, name: str) -> tuple[str, int]:
    """A ``(prompt, seed)`` pair given to a widget (a keyframe): a non-empty prompt and a valid seed."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"`{name}` must be a (prompt, seed) pair, got {value!r}")
    return check_text(value[0], f"{name}[0]"), _checks.seed(value[1], f"{name}[1]")


def check_folder_arg(value: object, name: str):
    """A folder argument: a str or path-like (it may not exist yet)."""
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a folder path (str or Path), got {type(value).__name__}")
    return Path(value)


def check_text(prompt: object, name: str = "prompt") -> str:
    from latentlab.sampling import check_prompt

    check_prompt(prompt, name)
    if not prompt.strip():
        raise ValueError(f"`{name}` is empty: type a prompt")
    return prompt
