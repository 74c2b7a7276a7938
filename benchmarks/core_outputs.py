"""Outputs of every op of the compiled core on fixed inputs, to compare two builds bit for bit.

The inputs are large enough for the threaded paths. Run it once per build (e.g. two installed
wheels, from outside the source tree), then compare:

    python benchmarks/core_outputs.py save before.npz      # with the first build
    python benchmarks/core_outputs.py save after.npz       # with the second
    python benchmarks/core_outputs.py compare before.npz after.npz
"""
from __future__ import annotations

import sys

import numpy as np


def outputs() -> dict[str, np.ndarray]:
    import torch

    from pixfound import _C, ops

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    out = {}
    masks = rng.random((24, 480, 640)) > 0.6
    gt = rng.random((5, 480, 640)) > 0.5
    out["mask_iou"] = ops.mask_iou(masks, gt)
    packed = ops.pack_masks(masks)
    out["pack_words"], out["pack_areas"] = packed.words, packed.areas
    big = ops.pack_masks(rng.random((300, 256, 256)) > 0.5)
    out["packed_iou"] = ops.packed_iou(big, big)
    maps = rng.standard_normal((40, 200, 300)).astype(np.float32)
    out["topk1"], out["topk5"] = ops.topk_peaks(maps, 1), ops.topk_peaks(maps, 5)
    out["topk3_f64"] = ops.topk_peaks(maps.astype(np.float64), 3)
    b, h, r, keys, d, n = 4, 8, 8, 1024, 64, 300  # 2^24 multiply-adds: the capture's threaded branch
    q = rng.standard_normal((b, h, r, d)).astype(np.float32)
    k = rng.standard_normal((b, h, keys, d)).astype(np.float32)
    start, length, first = np.full(b, 100, np.int64), np.full(b, n, np.int64), np.zeros(b, np.int64)
    ends = np.tile(np.arange(keys - r + 1, keys + 1, dtype=np.int64), (b, 1))
    for threads in (0, 1, 2):
        out[f"image_attention_t{threads}"] = _C.image_attention(q, k, start, length, first, ends, 0.125, n,
                                                                num_threads=threads)
    out["image_attention_gap"] = _C.image_attention(q, k, start, length, first, ends, 0.125, n,
                                                    np.full(b, 500, np.int64), np.full(b, 600, np.int64),
                                                    num_threads=2)
    out["image_attention_layers"] = _C.image_attention_layers(
        [q, q * 0.5], [k, k[:, :, ::-1].copy()], [0.125, 0.2], start, length, first, ends, n, num_threads=2)
    out["upsample_topk"] = _C.upsample_topk(maps[:6, :24, :24].copy(), 336, 336, 0, 0, 336, 336, 2)
    out["local_peaks"] = _C.local_peaks(maps[0].astype(np.float64), 3, 0.5, 2, 10)
    out["rle"] = np.frombuffer(b"\0".join(_C.rle_encode(np.ascontiguousarray(masks[:4]))), dtype=np.uint8)
    return {name: np.asarray(value) for name, value in out.items()}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "save":
        np.savez(argv[1], **outputs())
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        a, b = np.load(argv[1]), np.load(argv[2])
        different = [k for k in sorted(set(a.files) | set(b.files))
                     if k not in a.files or k not in b.files or a[k].dtype != b[k].dtype
                     or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
        print(f"{len(a.files)} outputs, {len(different)} different{': ' + ', '.join(different) if different else ''}")
        return 1 if different else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
