"""JPEG draft mode: decode large JPEGs at a reduced size before the evaluation resize.

A JPEG decoder can scale by 1/2, 1/4 or 1/8 while it decodes, by dropping high-frequency DCT
coefficients, which costs a fraction of a full decode. Pillow exposes this as ``Image.draft``.
Stage one requests the largest reduction that keeps both sides at least the resize target, so the
antialiased resize that follows still shrinks the image and never enlarges it. The features differ
slightly from those of a full decode; ``benchmarks/draft_features.py`` measures by how much.
"""

from __future__ import annotations

import logging

from PIL import Image

logger = logging.getLogger(__name__)


def apply_draft(image: Image.Image, min_side: int) -> bool:
    """Configure a not-yet-loaded JPEG to decode at a reduced size with both sides at least ``min_side``.

    Return True when the decoded size is reduced. Other formats, and JPEGs smaller than twice
    ``min_side`` on either side, decode at full size.
    """
    if image.format != "JPEG" or min_side < 1:
        return False
    original = image.size
    # The request is square, so the guarantee stays true after an EXIF rotation swaps the sides.
    image.draft(None, (min_side, min_side))
    return image.size != original
