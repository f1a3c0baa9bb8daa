"""The cell localiser, the cell-centric window, the OD colour normalisation and the HED jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CNMC, DATA, require

from leukoscope import localise
from leukoscope.images import View, frame, load_rgb, load_view
from leukoscope.localise import cell_window, crop_square, find_cell, find_cells
from leukoscope.stain import fit_target, normalise, od_stats
from leukoscope.transforms import AugmentConfig, _random_hed

BACKGROUND = (232, 222, 200)  # a pale, slightly warm smear background
RED_CELL = (215, 160, 160)
NUCLEUS = (95, 50, 150)  # Romanowsky purple: blue well above green
CYTOPLASM = (215, 195, 212)  # pale: the localiser measures the stained nucleus


def paint_disc(image: np.ndarray, y: float, x: float, radius: float, colour) -> None:
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    image[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = colour


def field(height: int, width: int, cells: list[tuple[float, float, float]], seed: int = 0, red_cells: int = 30) -> np.ndarray:
    """A synthetic smear: red cells anywhere, then white cells (y, x, nucleus radius) with a cytoplasm ring."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    radius = 0.5 * np.median([r for _, _, r in cells]) if cells else 12
    for _ in range(red_cells):
        paint_disc(image, rng.uniform(0, height), rng.uniform(0, width), radius * rng.uniform(0.9, 1.1), RED_CELL)
    for y, x, r in cells:
        paint_disc(image, y, x, 1.4 * r, CYTOPLASM)
    for y, x, r in cells:
        paint_disc(image, y, x, r, NUCLEUS)
    return image


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_localiser_finds_the_cell_at_three_scales(scale):
    rng = np.random.default_rng(int(scale * 10))
    h, w = round(300 * scale), round(400 * scale)
    y, x, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 30 * scale
    cell = find_cell(field(h, w, [(y, x, r)], seed=int(scale * 10)))
    assert cell is not None
    assert abs(cell.y - y) <= 0.1 * 2 * r and abs(cell.x - x) <= 0.1 * 2 * r  # centre within 10% of the nucleus's diameter
    assert abs(cell.diameter - 2 * r) <= 0.15 * 2 * r  # size within 15%


def test_a_cell_at_the_edge_and_an_empty_field():
    cell = find_cell(field(240, 320, [(230, 20, 25)], red_cells=20))
    assert cell is not None and abs(cell.y - 230) < 12 and abs(cell.x - 20) < 12
    empty = field(240, 320, [], red_cells=40)
    assert find_cell(empty) is None
    window, found, _ = cell_window(empty, 64, 0.6)
    assert window.shape == (64, 64, 3) and found is False  # the whole image, and it says so


def test_a_tile_s_central_cell_wins_over_a_larger_neighbour_cut_by_the_edge():
    tile = field(360, 360, [(180, 180, 22), (60, 350, 45)], red_cells=20)  # the neighbour's nucleus has 4x the area
    cell = find_cell(tile)
    assert cell is not None and abs(cell.y - 180) < 8 and abs(cell.x - 180) < 8
    alone = field(360, 360, [(200, 250, 22), (60, 350, 45)], red_cells=20)  # nothing whole at the centre: the larger wins
    assert find_cell(alone).x > 300


def test_one_real_cell_at_two_magnifications_gives_matching_windows():
    path = sorted(require(DATA / "pbc" / "lymphocyte").glob("*.jpg"))[0]
    image = load_rgb(path)
    h, w = image.shape[:2]
    from PIL import Image

    small = np.asarray(Image.fromarray(image).resize((w * 3 // 5, h * 3 // 5), Image.BILINEAR))
    canvas = np.empty((h, w, 3), np.uint8)  # the smaller cell placed off-centre in a frame of the same size
    canvas[:] = np.median(image.reshape(-1, 3), axis=0)
    canvas[20 : 20 + small.shape[0], 30 : 30 + small.shape[1]] = small
    a, found_a, _ = cell_window(image, 96, 0.6)
    b, found_b, _ = cell_window(canvas, 96, 0.6)
    assert found_a and found_b
    difference = np.abs(a.astype(float) - b.astype(float)).mean()
    assert difference < 12, difference  # same cell, same framing; only resampling blur differs
    plain = np.abs(frame(image, View(96))[0].astype(float) - frame(canvas, View(96))[0].astype(float)).mean()
    assert plain > 2 * difference  # a central crop does not undo the magnification


def test_a_cell_on_black_is_put_on_a_plain_background_and_dark_pixels_inside_it_stay():
    image = np.zeros((120, 160, 3), np.uint8)  # a segmented cell: black all round
    paint_disc(image, 60, 80, 40, CYTOPLASM)
    paint_disc(image, 60, 80, 25, NUCLEUS)
    image[58:62, 78:82] = 5  # a black speck inside the cell, not connected to the background
    painted = localise.fill_masked_background(image)
    assert tuple(painted[0, 0]) == tuple(painted[119, 159]) == localise.BACKGROUND
    assert (painted[58:62, 78:82] == 5).all() and tuple(painted[60, 100]) == NUCLEUS
    assert ((painted.max(2) <= localise.BLACK).sum()) == 16  # only the speck is still black
    window, found, painted = cell_window(image, 64, 0.6)
    assert found and painted and tuple(window[0, 0]) == localise.BACKGROUND  # the window's corner is slide, not black
    slide = field(120, 160, [(60, 80, 20)])
    slide[:10] = 0  # a black band along one edge only: most of the border is slide
    assert localise.fill_masked_background(slide) is slide and not cell_window(slide, 64, 0.6)[2]


def test_a_black_vignette_is_painted_but_counts_only_where_the_window_shows_it():
    image = field(240, 320, [(120, 160, 20)], red_cells=0)
    yy, xx = np.ogrid[:240, :320]
    image[(yy - 120) ** 2 + (xx - 160) ** 2 > 119**2] = 0  # a round field of view on black, as a camera on an eyepiece sees it
    assert localise.masked_background(image) is not None
    window, found, painted = cell_window(image, 64, 0.6)
    assert found and not painted and (window.max(2) > localise.BLACK).all()  # the cell's window lies inside the field
    image = field(240, 320, [(120, 60, 20)], red_cells=0)
    image[(yy - 120) ** 2 + (xx - 160) ** 2 > 119**2] = 0  # the same with the cell at the field's rim
    assert cell_window(image, 64, 0.6)[1:] == (True, True)


def test_real_segmented_cells_are_windowed_without_their_black_background():
    image = load_rgb(min(require(CNMC / "hem").glob("*.bmp")))
    assert (image.max(2) <= localise.BLACK).mean() > 0.5  # C-NMC's cells are masked onto black
    window, found, _ = frame(image, View(112, cell=0.6))
    assert found and (window.max(2) <= localise.BLACK).mean() < 0.01


def test_touching_cells_are_counted_as_two_and_positions_match():
    truth = [(80, 90, 28), (80, 146, 28), (200, 300, 24), (60, 330, 20)]  # the first two touch
    cells = find_cells(field(300, 420, truth, red_cells=25))
    assert len(cells) == len(truth)
    for y, x, _ in truth:
        assert min(np.hypot(c.y - y, c.x - x) for c in cells) < 10
    assert find_cells(field(300, 420, [], red_cells=40)) == []


def test_a_lobed_nucleus_is_one_cell():
    """A band-form / segmented neutrophil nucleus: a curved band with constrictions between lobes."""
    image = field(240, 320, [], red_cells=15)
    paint_disc(image, 120, 160, 45, CYTOPLASM)
    for angle in np.linspace(0, 4.4, 60):  # a C-shaped band 12 px thick, pinched to 6 px at two places
        pinched = min(abs(angle - 1.5), abs(angle - 3.0)) < 0.15
        paint_disc(image, 120 + 25 * np.sin(angle), 160 + 25 * np.cos(angle), 3 if pinched else 6, NUCLEUS)
    assert len(find_cells(image)) == 1


def test_crop_square_pads_outside_the_image_with_the_border_colour():
    image = np.zeros((50, 50, 3), np.uint8)
    image[:] = (200, 100, 50)
    image[20:30, 20:30] = 0
    out = crop_square(image, 0, 0, 40, 40)  # centred on the corner: three quarters outside
    assert out.shape == (40, 40, 3) and tuple(out[2, 2]) == (200, 100, 50)


def test_optical_density_statistics_from_histograms_equal_the_per_pixel_ones():
    image = np.array([[[255, 0, 127], [0, 255, 127]]], np.uint8)  # OD = -ln((v + 1) / 256): 0, ln 256, ln 2 per channel
    ln256, ln2 = np.log(256.0), np.log(2.0)
    assert np.allclose(od_stats(image), [ln256 / 2, ln256 / 2, ln2, ln256 / 2, ln256 / 2, 0.0], atol=1e-9)


def test_colour_normalisation_maps_statistics_onto_the_target():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 230, (64, 64, 3), dtype=np.uint8)
    target = fit_target([rng.integers(60, 250, (32, 32, 3), dtype=np.uint8) for _ in range(4)])
    out = normalise(image, target)
    assert np.allclose(od_stats(out), target, atol=0.03)
    darker = (image * 0.7).astype(np.uint8)  # a heavier stain or a dimmer lamp: the same picture after normalisation
    assert np.abs(normalise(darker, target).astype(int) - out.astype(int)).mean() < 6


def test_a_path_its_bytes_and_its_array_give_the_same_window(tmp_path):
    image = field(240, 320, [(100, 200, 26)])
    from PIL import Image

    path = tmp_path / "f.jpg"
    Image.fromarray(image).save(path, quality=95)
    view = View(64, cell=0.6, stain=(0.3, 0.5, 0.35, 0.35, 0.5, 0.15), colour="reinhard")
    from_path, found, _ = load_view(path, view)
    from_bytes, _, _ = load_view(path.read_bytes(), view)
    from_array, _, _ = frame(load_rgb(path), view)
    assert found and np.array_equal(from_path, from_bytes) and np.array_equal(from_path, from_array)


def test_hed_jitter_is_exact_at_identity_and_changes_colour_otherwise():
    x = torch.rand(3, 3, 16, 16) * 0.9 + 0.05
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(_random_hed(x, AugmentConfig(hed=1e-9, hed_shift=1e-9), g), x, atol=1e-5)
    jittered = _random_hed(x, AugmentConfig(hed=0.2, hed_shift=0.02), g)
    assert jittered.shape == x.shape and 0.005 < (jittered - x).abs().mean() < 0.2
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_fast_closing_equals_scipys_iterated_closing():
    """The localiser's closing (shifted ORs and ANDs) is scipy's binary_closing(iterations=2, border_value=0)."""
    from scipy import ndimage

    from leukoscope.localise import _close

    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < rng.uniform(0.05, 0.95)
        assert np.array_equal(_close(mask), ndimage.binary_closing(mask, iterations=2, border_value=0))
    gap = np.zeros((9, 9), bool)
    gap[3:6, 1:4] = gap[3:6, 5:8] = True  # a one-pixel gap between two blocks is closed; nothing reaches the border
    closed = _close(gap)
    assert closed[4, 4] and not closed[0].any() and not closed[:, 0].any()


def test_otsu_equals_scikit_images_threshold():
    from skimage.filters import threshold_otsu

    from leukoscope.localise import otsu

    rng = np.random.default_rng(0)
    for _ in range(300):
        values = rng.integers(-120, 200, (rng.integers(1, 60), rng.integers(1, 60))) // rng.integers(1, 30)
        values = values.astype(np.int16)
        expected = threshold_otsu(values) if values.min() < values.max() else values.max()
        assert otsu(values) == expected
    assert otsu(np.array([[0, 0, 10, 10]], np.int16)) == 0  # two classes: the threshold is the top of the lower one


def _whole_image_resize(image: np.ndarray, box, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box, reducing_gap=None))


def test_resizing_only_the_pixels_the_filter_reads_matches_the_whole_image():
    """resize_box hands PIL only the pixels its filter reads: the result is PIL's on the whole image,
    but for +-1 levels where rounding ties break the other way (rare); a wrong margin or box shift
    would move whole rows and columns."""
    from leukoscope.localise import resize_box

    rng = np.random.default_rng(1)
    image = field(300, 420, [(150, 200, 30)], seed=1)
    image = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)  # texture everywhere
    exact = 0
    for _ in range(200):
        side = rng.uniform(8, 290)
        x0, y0 = rng.uniform(0, 420 - side), rng.uniform(0, 300 - side)
        box, size = (x0, y0, x0 + side, y0 + side), int(rng.choice([32, 112, 224]))
        ours, whole = resize_box(image, box, size), _whole_image_resize(image, box, size)
        assert np.abs(ours.astype(int) - whole.astype(int)).max() <= 1
        exact += np.array_equal(ours, whole)
    assert exact >= 190


def test_a_window_reaching_outside_the_image_equals_padding_the_whole_image():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    fill = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0).astype(np.uint8)
    for cy, cx, side in [(0, 0, 60), (110, 85, 50.5), (60, -30, 40), (60, 45, 200), (-80, 45, 30)]:
        pad = 160
        padded = np.empty((120 + 2 * pad, 90 + 2 * pad, 3), np.uint8)
        padded[:] = fill
        padded[pad:-pad, pad:-pad] = image
        x0, y0 = cx - side / 2 + pad, cy - side / 2 + pad
        whole = _whole_image_resize(padded, (x0, y0, x0 + side, y0 + side), 48)
        assert np.abs(crop_square(image, cy, cx, side, 48).astype(int) - whole.astype(int)).max() <= 1, (cy, cx, side)


def test_colour_p_jitters_that_share_of_images_and_leaves_the_rest_exact():
    from leukoscope.transforms import _keep_some_colours

    x = torch.rand(400, 3, 4, 4)
    def jitter(y):  # a stand-in colour jitter that changes every image
        return y * 0.5

    g = torch.Generator().manual_seed(0)
    assert torch.equal(_keep_some_colours(x, AugmentConfig(colour_p=0.0), g, jitter), x)
    state = g.get_state()
    assert torch.equal(_keep_some_colours(x, AugmentConfig(colour_p=1.0), g, jitter), x * 0.5)
    assert torch.equal(g.get_state(), state)  # p = 1 draws nothing: the random stream of runs without the option
    out = _keep_some_colours(x, AugmentConfig(colour_p=0.5), g, jitter)
    kept = (out == x).flatten(1).all(1)
    assert 0.4 < kept.float().mean() < 0.6 and torch.equal(out[~kept], x[~kept] * 0.5)


def test_colour_p_outside_0_1_is_refused():
    from leukoscope.config import TrainConfig
    from leukoscope.errors import LeukoscopeError

    with pytest.raises(LeukoscopeError, match="colour_p must be between 0 and 1, got 1.5"):
        TrainConfig.from_dict({"augment": {"colour_p": 1.5}})


def _slide_with_cell(gains: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    image = field(120, 160, [(60, 80, 20)], red_cells=10)
    return np.clip(image * np.array(gains), 0, 255).astype(np.uint8)


def test_a_yellow_cast_is_corrected_back_into_the_training_range_and_nothing_else_is_touched():
    from leukoscope.stain import CAST_MARGIN, background_chroma, correct_cast, fit_cast_range

    slides = [_slide_with_cell(g) for g in ((1.0, 1.0, 1.0), (1.03, 1.0, 0.97), (0.97, 1.0, 1.03))]
    cast = fit_cast_range(slides)
    assert len(cast) == 6 and all(low <= high for low, high in zip(cast[:3], cast[3:]))
    for image in slides + [_slide_with_cell((0.8, 0.95, 1.2)), _slide_with_cell((1.1, 0.8, 1.1))]:  # blue and magenta stay
        assert correct_cast(image, cast) is image
    yellow = _slide_with_cell((1.0, 0.95, 0.6))
    assert background_chroma(yellow)[2] < cast[2] - CAST_MARGIN
    fixed = correct_cast(yellow, cast)
    assert fixed is not yellow and cast[2] - 0.02 <= background_chroma(fixed)[2] <= cast[5] + 0.02
    assert abs(int(fixed.sum()) - int(yellow.sum())) < 0.05 * int(yellow.sum())  # roughly the same brightness
    assert correct_cast(yellow, None) is yellow


def test_a_model_with_a_cast_range_frames_a_yellow_image_like_the_original_and_says_it_recoloured_it():
    from leukoscope.stain import background_chroma, fit_cast_range

    original = _slide_with_cell()
    view = View(64, cell=0.6, cast=fit_cast_range([original]))
    plain, _, recoloured = frame(original, view)
    assert not recoloured
    fixed, found, recoloured = frame(_slide_with_cell((1.0, 0.95, 0.6)), view)
    assert found and recoloured
    assert np.abs(background_chroma(fixed) - background_chroma(plain)).max() < 0.02  # the same colours; brightness is the cast's
    crop_view = View(64, crop=0.8, cast=view.cast)
    assert frame(_slide_with_cell((1.0, 0.95, 0.6)), crop_view)[2] and not frame(original, crop_view)[2]


def test_a_small_cell_in_a_large_field_is_found_as_count_finds_it():
    """A white cell spanning under a tenth of the field's side (a camera at low magnification) is below
    the coarse search's smallest nucleus; the finer search that count uses finds it."""
    y, x, r = 700.0, 420.0, 18.0  # nucleus 36 px across in a 960 x 1280 field
    image = field(960, 1280, [(y, x, r)], red_cells=300)
    mask, step = localise.nucleus_mask(image)
    assert mask.sum() < localise.MIN_AREA * mask.size  # too small for the coarse search alone
    cell = find_cell(image)
    assert cell is not None and abs(cell.y - y) <= 0.1 * 2 * r and abs(cell.x - x) <= 0.1 * 2 * r
    assert abs(cell.diameter - 2 * r) <= 0.25 * 2 * r
    window, found, _ = cell_window(image, 64, 0.6)
    assert found and window[32, 32].tolist() == list(NUCLEUS)  # the window is centred on the nucleus
    assert find_cells(field(960, 1280, [], red_cells=300)) == [] and find_cell(field(960, 1280, [], red_cells=300)) is None
