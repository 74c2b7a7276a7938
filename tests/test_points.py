"""Point prompts from phrase maps in the three fit modes (pixfound.grounding.points)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pixfound.grounding.points import default_min_distance, phrase_points, upsample_phrase_maps
from pixfound.models.base import ImageGeometry


def _reference_upsampled(maps: torch.Tensor, geometry: ImageGeometry) -> tuple[torch.Tensor, int, int]:
    """The published recipe spelled out: bicubic to the grid's frame, crop, plus the frame's offset."""
    height, width = geometry.image_h, geometry.image_w
    if geometry.fit == "pad":
        side = max(height, width)
        full = F.interpolate(maps[None].float(), (side, side), mode="bicubic", align_corners=False)[0]
        top, left = (side - height) // 2, (side - width) // 2
        return full[:, top:top + height, left:left + width], 0, 0
    if geometry.fit == "resize":
        return F.interpolate(maps[None].float(), (height, width), mode="bicubic", align_corners=False)[0], 0, 0
    side = min(height, width)
    full = F.interpolate(maps[None].float(), (side, side), mode="bicubic", align_corners=False)[0]
    return full, (width - side) // 2, (height - side) // 2


def _reference_points(maps: torch.Tensor, geometry: ImageGeometry, rank: int) -> torch.Tensor:
    upsampled, x_offset, y_offset = _reference_upsampled(maps, geometry)
    width = upsampled.shape[2]
    flat = torch.sort(upsampled.reshape(upsampled.shape[0], -1), dim=1, descending=True, stable=True).indices
    chosen = flat[:, rank - 1]
    return torch.stack([chosen % width + x_offset, chosen // width + y_offset], dim=-1)[:, None]


def _cell_centre(geometry: ImageGeometry, row: int, col: int) -> tuple[float, float]:
    """Continuous (x, y) image coordinates of a grid cell's centre."""
    height, width = geometry.image_h, geometry.image_w
    if geometry.fit == "pad":
        side = max(height, width)
        return ((col + 0.5) * side / geometry.grid_w - (side - width) // 2,
                (row + 0.5) * side / geometry.grid_h - (side - height) // 2)
    if geometry.fit == "resize":
        return (col + 0.5) * width / geometry.grid_w, (row + 0.5) * height / geometry.grid_h
    side = min(height, width)
    return ((col + 0.5) * side / geometry.grid_w + (width - side) // 2,
            (row + 0.5) * side / geometry.grid_h + (height - side) // 2)


def _cell_region(geometry: ImageGeometry, row: int, col: int) -> tuple[float, float, float, float]:
    """Continuous (x0, y0, x1, y1) image region a grid cell covers."""
    centre_x, centre_y = _cell_centre(geometry, row, col)
    height, width = geometry.image_h, geometry.image_w
    side = {"pad": max(height, width), "crop": min(height, width)}.get(geometry.fit)
    cell_w = (side or width) / geometry.grid_w
    cell_h = (side or height) / geometry.grid_h
    return centre_x - cell_w / 2, centre_y - cell_h / 2, centre_x + cell_w / 2, centre_y + cell_h / 2


# Hot cells that lie inside the image in both orientations (pad: rows/cols 2-3 of 6 are never padding).
KNOWN_MAP_CASES = [
    ("pad", (6, 6), (2, 3)),
    ("pad", (6, 6), (3, 2)),
    ("resize", (6, 10), (4, 7)),
    ("resize", (6, 10), (0, 0)),
    ("crop", (6, 6), (1, 4)),
    ("crop", (6, 6), (5, 0)),
]


@pytest.mark.parametrize("image_size", [(90, 150), (150, 90)])
@pytest.mark.parametrize("fit, grid, cell", KNOWN_MAP_CASES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_single_hot_cell_points_into_its_region(fit, grid, cell, image_size, backend):
    geometry = ImageGeometry(grid_h=grid[0], grid_w=grid[1], image_h=image_size[0], image_w=image_size[1], fit=fit)
    maps = torch.zeros((1,) + grid)
    maps[0, cell[0], cell[1]] = 1.0
    (x, y), = phrase_points(maps, geometry, backend=backend)[0].tolist()
    x0, y0, x1, y1 = _cell_region(geometry, *cell)
    assert x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1, (x, y, (x0, y0, x1, y1))
    interior = 0 < cell[0] < grid[0] - 1 and 0 < cell[1] < grid[1] - 1
    if interior:
        # pixel p covers [p, p + 1), centre p + 0.5; a cell centre on a pixel edge has two equal neighbours.
        # (A border cell's peak leans outwards: clamped bicubic overshoots towards the edge.)
        centre_x, centre_y = _cell_centre(geometry, *cell)
        assert abs(x + 0.5 - centre_x) <= 1.0 and abs(y + 0.5 - centre_y) <= 1.0, (x, y, centre_x, centre_y)


@pytest.mark.parametrize("fit", ["pad", "resize", "crop"])
@pytest.mark.parametrize("image_size", [(33, 50), (50, 33), (1, 1), (17, 17)])
@pytest.mark.parametrize("rank", [1, 3])
def test_points_match_the_spelled_out_recipe(fit, image_size, rank):
    generator = torch.Generator().manual_seed(hash((fit, image_size, rank)) % 2**31)
    grid = (5, 7) if fit == "resize" else (6, 6)
    geometry = ImageGeometry(grid_h=grid[0], grid_w=grid[1], image_h=image_size[0], image_w=image_size[1], fit=fit)
    rank = min(rank, image_size[0] * image_size[1])
    maps = torch.randn((4,) + grid, generator=generator)
    got = phrase_points(maps, geometry, point_rank=rank, backend="reference")
    assert got.shape == (4, 1, 2) and got.dtype == torch.int64
    assert torch.equal(got, _reference_points(maps, geometry, rank))


def test_fused_backend_matches_torch_backend():
    generator = torch.Generator().manual_seed(11)
    for fit, grid in (("pad", (6, 6)), ("resize", (4, 7)), ("crop", (5, 5))):
        geometry = ImageGeometry(grid_h=grid[0], grid_w=grid[1], image_h=37, image_w=52, fit=fit)
        maps = torch.randn((3,) + grid, generator=generator)
        for rank in (1, 2):
            fused = phrase_points(maps, geometry, point_rank=rank, backend="auto")
            assert torch.equal(fused, phrase_points(maps, geometry, point_rank=rank, backend="reference"))


def test_point_rank_walks_down_the_ranking():
    geometry = ImageGeometry(grid_h=4, grid_w=4, image_h=20, image_w=20, fit="resize")
    maps = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5))
    upsampled, _, _ = _reference_upsampled(maps, geometry)
    values = []
    for rank in (1, 2, 3):
        point = phrase_points(maps, geometry, point_rank=rank, backend="reference")
        values.append(upsampled[torch.arange(2), point[:, 0, 1], point[:, 0, 0]])
    assert torch.all(values[0] >= values[1]) and torch.all(values[1] >= values[2])


def test_several_points_are_distinct_local_maxima():
    geometry = ImageGeometry(grid_h=8, grid_w=8, image_h=64, image_w=96, fit="pad")
    maps = torch.zeros(2, 8, 8)
    maps[0, 3, 1], maps[0, 4, 6] = 1.0, 0.6   # two blobs, the left one stronger
    maps[1, 4, 4] = 1.0
    points = phrase_points(maps, geometry, num_points=3, backend="reference")
    assert points.shape == (2, 3, 2)
    first, second = points[0, 0].tolist(), points[0, 1].tolist()
    for (x, y), cell in ((first, (3, 1)), (second, (4, 6))):
        centre_x, centre_y = _cell_centre(geometry, *cell)
        assert abs(x + 0.5 - centre_x) <= 1.0 and abs(y + 0.5 - centre_y) <= 1.0
    assert points[1, 0].tolist() == phrase_points(maps[1:], geometry, backend="reference")[0, 0].tolist()
    distance = default_min_distance(geometry)
    for row in points:
        found = [p for p in row.tolist() if p != [-1, -1]]
        for i in range(len(found)):
            for j in range(i):
                assert max(abs(found[i][0] - found[j][0]), abs(found[i][1] - found[j][1])) >= distance


def test_flat_map_still_gives_one_point():
    geometry = ImageGeometry(grid_h=3, grid_w=3, image_h=12, image_w=12, fit="resize")
    points = phrase_points(torch.zeros(1, 3, 3), geometry, num_points=2, backend="reference")
    # a flat map has no strict local maximum: its argmax (first pixel) stands in, the rest is missing
    assert points[0].tolist() == [[0, 0], [-1, -1]]


def test_crop_points_are_shifted_by_the_crop_offset():
    geometry = ImageGeometry(grid_h=4, grid_w=4, image_h=40, image_w=100, fit="crop")
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0
    x, y = phrase_points(maps, geometry, backend="reference")[0, 0].tolist()
    assert 30 <= x < 40 and 0 <= y < 10  # the covered square starts at x = (100 - 40) // 2


def test_no_phrases_gives_no_points():
    geometry = ImageGeometry(grid_h=4, grid_w=4, image_h=10, image_w=10, fit="pad")
    assert phrase_points(torch.zeros(0, 4, 4), geometry).shape == (0, 1, 2)
    assert phrase_points(torch.zeros(0, 4, 4), geometry, num_points=3).shape == (0, 3, 2)
    assert upsample_phrase_maps(torch.zeros(0, 4, 4), geometry).shape == (0, 10, 10)


@pytest.mark.parametrize(
    "kwargs, maps_shape, message",
    [
        ({}, (2, 4, 5), "do not match"),
        ({}, (4, 4), r"\[G, h, w\]"),
        ({"point_rank": 0}, (1, 4, 4), "point_rank"),
        ({"num_points": 0}, (1, 4, 4), "num_points"),
        ({"point_rank": 2, "num_points": 2}, (1, 4, 4), "cannot both"),
        ({"num_points": 2, "min_distance": 0}, (1, 4, 4), "min_distance"),
        ({"point_rank": 101}, (1, 4, 4), "exceeds"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, maps_shape, message):
    geometry = ImageGeometry(grid_h=4, grid_w=4, image_h=10, image_w=10, fit="pad")
    with pytest.raises(ValueError, match=message):
        phrase_points(torch.zeros(maps_shape), geometry, **kwargs)


@pytest.mark.parametrize("fit", ["pad", "resize", "crop"])
def test_upsampled_maps_in_the_image_frame(fit):
    geometry = ImageGeometry(grid_h=5, grid_w=5, image_h=24, image_w=40, fit=fit)
    maps = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(2))
    out = upsample_phrase_maps(maps, geometry, backend="reference")
    assert out.shape == (2, 24, 40) and out.dtype == torch.float32
    expected, x_offset, y_offset = _reference_upsampled(maps, geometry)
    window = out[:, y_offset:y_offset + expected.shape[1], x_offset:x_offset + expected.shape[2]]
    torch.testing.assert_close(window, expected, atol=1e-5, rtol=1e-5)
    if fit == "crop":
        assert math.isnan(out[0, 0, 0].item()) and math.isnan(out[0, 0, -1].item())
        assert torch.isnan(out).sum() == 2 * 24 * (40 - 24)
