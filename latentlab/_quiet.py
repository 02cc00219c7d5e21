"""Silence one known-harmless log line of transformers (layer 0, private; used by every owner of transformers).

transformers 5 warns on import that image processors fall back to PIL without torchvision; latentlab never uses
those processors (torchvision is deliberately absent, see the install notes), so the line is noise for our users.
"""

from __future__ import annotations

import contextlib
import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_transformers_image_processor_warning() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionFallbackNotice())


@contextlib.contextmanager
def no_progress_bars(*loggings):
    """Hide the progress bars of the libraries whose ``utils.logging`` modules are given (diffusers', transformers')
    for a block -- loading a small model is quick, and a "Loading weights" bar is noise in a notebook -- then give
    each library back its own setting."""
    was = [m.is_progress_bar_enabled() for m in loggings]
    for m in loggings:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(loggings, was):
            if on:
                m.enable_progress_bar()
