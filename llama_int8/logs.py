"""Plain-words logging for the command-line scripts, with third-party chatter turned down."""

from __future__ import annotations

import logging
import warnings

NOISY_LIBRARIES = ("bitsandbytes", "transformers", "accelerate", "torch")


def setup_logging(level: int = logging.INFO) -> None:
    """Our messages to stderr as 'llama_int8: ...'; other libraries only when something is wrong."""
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="bitsandbytes")
