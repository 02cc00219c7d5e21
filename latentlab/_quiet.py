"""Silence one known-harmless log line of transformers (layer 0, private; used by every owner of transformers).

transformers 5 warns on import that image processors fall back to PIL without torchvision; latentlab never uses
those processors (torchvision is deliberately absent, see the install notes), so the line is noise for our users.
"""

from __future__ import annotations

import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_transformers_image_processor_warning() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionFallbackNotice())
