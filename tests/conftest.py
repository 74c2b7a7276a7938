import os
import pathlib

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before
# any pixfound kernel module is imported. Without a GPU, kernels run in the interpreter.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
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
