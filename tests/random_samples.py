"""Samples with a random RGB image, for tests that run a tiny model on them."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pixfound.data.sample import Sample


def random_image_sample(index: int, size: tuple[int, int], *, seed_base: int, id_prefix: str) -> Sample:
    """Sample ``{id_prefix}{index}`` whose (H, W) = ``size`` image is uniform noise from seed ``seed_base + index``."""
    rng = np.random.default_rng(seed_base + index)
    image = Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))
    return Sample(
        id=f"{id_prefix}{index}", index=index, benchmark="synthetic", question="q", options=["a", "b"], answer="A",
        expression=None, image_size=size, image_loader=lambda: image,
    )
