"""Loading warnings that are expected here, silenced by their exact text so that the others mean something.

WanPipeline's type check wants AutoencoderKLWan and UMT5EncoderModel; the toy and tiny bases use two intended
stand-ins: PixelShuffleVAE (the toy world's exact latent) and T5EncoderModel (UMT5's architecture without its
per-layer position bias). A real Wan repository ships the expected classes and never hits these.
"""

from diffusers.utils import logging as diffusers_logging

STAND_INS = {"vae": "PixelShuffleVAE", "text_encoder": "T5EncoderModel"}


def _unexpected(record) -> bool:
    msg = record.getMessage()
    return not any(
        msg.startswith(f"Expected types for {kw}:") and msg.endswith(f".{cls}'>.") for kw, cls in STAND_INS.items()
    )


diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils").addFilter(_unexpected)
