"""A known-harmless notice of the libraries under :mod:`sagkit.sd`, silenced narrowly.

transformers logs, when something first imports a ``<Model>ImageProcessor`` while torchvision is
not installed, that it falls back to the PIL implementation ("`CLIPImageProcessor` requires
torchvision (not installed); falling back to `CLIPImageProcessorPil` ..."). diffusers' Stable
Diffusion pipeline module imports ``CLIPImageProcessor`` (for its optional feature extractor),
so importing it logs the notice. sagkit never uses an image processor: images reach CLIP
through :func:`sagkit.sd.clip.preprocess`, and the tiny pipeline has no feature extractor. So
the notice says nothing about a sagkit run; :func:`quiet_processor_fallback` drops exactly
that record from exactly that logger, and every other message passes.
"""

from __future__ import annotations

import logging

__all__ = ["LOGGER", "ProcessorFallbackFilter", "quiet_processor_fallback"]

LOGGER = "transformers.utils.import_utils"
"""The logger that emits the notice."""


class ProcessorFallbackFilter(logging.Filter):
    """Drops the records of an image processor falling back to PIL for lack of torchvision."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "requires torchvision (not installed); falling back to" in message
            and "ImageProcessorPil" in message
        )


def quiet_processor_fallback() -> None:
    """Install :class:`ProcessorFallbackFilter` on transformers' import logger (once)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, ProcessorFallbackFilter) for f in logger.filters):
        logger.addFilter(ProcessorFallbackFilter())
