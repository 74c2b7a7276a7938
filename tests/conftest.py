import os
import pathlib

from pixfound.triton_kernels import default_to_interpreter_without_cuda  # noqa: E402

default_to_interpreter_without_cuda()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

SHARED_ANNOTATIONS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "pixfoundation-annotations"


@pytest.fixture(scope="session")
def annotations_root() -> pathlib.Path:
    """The real PixMMVP / PixCV-Bench annotation files, next to the checkout."""
    root = pathlib.Path(os.environ.get("PIXFOUND_ANNOTATIONS", SHARED_ANNOTATIONS))
    if not root.is_dir():
        pytest.skip(f"real annotations not found at {root} (../shared is absent); set PIXFOUND_ANNOTATIONS")
    return root
