"""What every latentlab widget shares (widgets layer, private): the backend and its resolved sampling, one
latest-request worker, a busy indicator and an error line inside the widget, and image encoding."""

from __future__ import annotations

import base64
import html
import itertools
from pathlib import Path

import ipywidgets as widgets
import torch

from latentlab import _tensors
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
        self.upscale = upscale
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

    def submit(self, fn) -> None:
        """Run ``fn`` on this widget's worker (only the latest request waits), clearing the last error first."""
        def run():
            self.clear_error()
            if self.torch_threads is None:
                fn()
            else:
                with _tensors.threads(self.torch_threads):
                    fn()

        self._worker.submit(run)

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until this widget's pending work is done (for scripts and tests)."""
        return self._worker.wait(timeout)

    def png(self, image: torch.Tensor) -> bytes:
        return png_bytes(image, upscale=self.upscale)


class Panel(WorkerPanel):
    """A :class:`WorkerPanel` over a backend and its resolved sampling."""

    def __init__(self, lab: Backend, *, sampling: Sampling | None = None, upscale: int = 4, **kw):
        if not isinstance(lab, Backend):
            raise TypeError(f"`lab` must be a latentlab backend (e.g. latentlab.Lab.default()), got {type(lab).__name__}")
        self.lab = lab
        self.sampling = lab.sampling(sampling)  # validated and complete before anything is drawn
        super().__init__(upscale=upscale, **kw)

    def one(self, latents: torch.Tensor, conditioning, sampling: Sampling | None = None) -> torch.Tensor:
        """Generate interactively: compute batch 1, so a single image pays for one item."""
        return self.lab.generate(latents, conditioning, sampling=sampling or self.sampling, batch_size=1)


def free_path(folder: Path, stem: str, suffix: str = ".mp4") -> Path:
    """``folder/stem-N.suffix`` for the first N whose file and manifest do not exist: never overwrite a user's file."""
    for k in itertools.count(1):
        p = folder / f"{stem}-{k}{suffix}"
        if not p.exists() and not p.with_name(p.name + ".json").exists():
            return p
    raise AssertionError("unreachable")


def check_text(prompt: object, name: str = "prompt") -> str:
    from latentlab.sampling import check_prompt

    check_prompt(prompt, name)
    if not prompt.strip():
        raise ValueError(f"`{name}` is empty: type a prompt")
    return prompt
