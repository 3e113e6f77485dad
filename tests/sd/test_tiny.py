"""The tiny random pipeline: quiet, with CLIP's prompt length, cast like ``pipe.to(dtype)``."""

import logging
import warnings

import torch

from sagkit.sd.notices import LOGGER, ProcessorFallbackFilter, quiet_processor_fallback
from sagkit.sd.pipeline import GuidedStableDiffusion
from sagkit.sd.tiny import cast_components, tiny_clip_vision, tiny_pipeline, tiny_tokenizer

PROMPT = "a lighthouse on a cliff at dusk"  # 25 letters: more than 16 tokens, fewer than 77


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_building_and_encoding_with_the_tiny_pipeline_logs_and_warns_nothing():
    """No warning from diffusers' dtype cast nor about a truncated prompt: a bfloat16 pipeline
    is built and encodes a prompt longer than 16 letters without a log record from diffusers
    or transformers, or a Python warning. (transformers' image-processor notice, logged once per
    process, is the filter's, tested below.)"""
    seen = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(seen)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = tiny_pipeline(latent_size=8, dtype=torch.bfloat16)
            tiny_clip_vision(dtype=torch.bfloat16)
            GuidedStableDiffusion.from_pipe(pipe).encode(PROMPT)
    finally:
        for logger in loggers:
            logger.removeHandler(seen)
    assert seen.messages == [] and [str(w.message) for w in caught] == []
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


def test_the_tokenizer_holds_a_prompt_of_up_to_75_letters():
    tokenizer = tiny_tokenizer()
    assert tokenizer.model_max_length == 77
    ids = tokenizer(PROMPT).input_ids  # start, one token a letter, end
    assert len(ids) == 2 + sum(c.isalpha() for c in PROMPT)
    assert tiny_tokenizer(max_length=16).model_max_length == 16


def test_cast_components_is_the_cast_of_pipe_to():
    reference = tiny_pipeline(latent_size=8).to(dtype=torch.float64)
    cast = cast_components(tiny_pipeline(latent_size=8), torch.float64)
    for name in ("unet", "vae", "text_encoder"):
        want, got = reference.components[name].state_dict(), cast.components[name].state_dict()
        assert want.keys() == got.keys()
        for key in want:  # float tensors cast, integer buffers (position ids) kept
            assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key


def test_the_filter_drops_the_processor_fallback_notice_and_nothing_else():
    logger = logging.getLogger(LOGGER)
    seen = Records()
    logger.addHandler(seen)
    try:
        quiet_processor_fallback()
        quiet_processor_fallback()  # installed once
        assert sum(isinstance(f, ProcessorFallbackFilter) for f in logger.filters) == 1
        notice = (
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        logger.warning(notice)
        logger.warning("`CLIPImageProcessor` requires torchvision")  # another message
        logger.warning("something else entirely")
    finally:
        logger.removeHandler(seen)
    assert seen.messages == ["`CLIPImageProcessor` requires torchvision", "something else entirely"]
