"""The geometry of siimcovid.views: a box drawn at a known place of an image comes back at that place in original
pixels after the crop, the resize and the flip (pure numpy and OpenCV, no model)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from siimcovid import views as V

ROWS, COLS, S = 256, 300, 64  # an original of 300 x 256, prepared as 64 x 64 (stretched, as prepare does)


def bright_box(image: np.ndarray) -> np.ndarray:
    """The bounding box (x0, y0, x1, y1, in pixel edges) of the bright pixels of a grey image."""
    ys, xs = np.nonzero(image > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def prepared_with_square(px: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A black prepared S x S image with a white square at prepared pixels px; the square in original pixels."""
    image = np.zeros((S, S), np.uint8)
    image[px[1] : px[3], px[0] : px[2]] = 255
    original = np.array([px[0] * COLS / S, px[1] * ROWS / S, px[2] * COLS / S, px[3] * ROWS / S])
    return image, original


def test_widen_adds_the_margin_and_clips_to_the_image():
    assert V.widen((100, 50, 200, 150), ROWS, COLS, 0.1) == pytest.approx((90, 40, 210, 160))
    assert V.widen((5, 5, 295, 250), ROWS, COLS, 0.5) == (0.0, 0.0, float(COLS), float(ROWS))


def test_pixel_window_covers_the_window_and_window_of_crop_is_what_it_shows():
    window = (37.3, 20.9, 211.1, 199.5)
    px = V.pixel_window(window, ROWS, COLS, (S, S))
    shown = V.window_of_crop(px, ROWS, COLS, (S, S))
    assert shown[0] <= window[0] and shown[1] <= window[1] and shown[2] >= window[2] and shown[3] >= window[3]
    assert shown[0] > window[0] - COLS / S and shown[3] < window[3] + ROWS / S  # outwards by less than a pixel
    assert V.pixel_window((299.9, 255.9, 300, 256), ROWS, COLS, (S, S))[2:] == (S, S)  # at least a pixel, inside


def test_from_original_and_to_original_are_inverse_inside_the_window():
    rng = np.random.default_rng(0)
    window = (40.0, 30.0, 260.0, 220.0)
    x0, y0 = rng.uniform(40, 150, 20), rng.uniform(30, 120, 20)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 100, 20), y0 + rng.uniform(1, 90, 20), rng.uniform(0, 1, 20)], 1)
    inside = V.from_original(boxes, (97, 131), window)
    assert np.allclose(V.to_original(inside, (97, 131), window), boxes)
    assert np.allclose(inside[:, 4], boxes[:, 4])  # the confidence travels untouched
    clipped = V.from_original([[0.0, 0.0, 100.0, 100.0]], (97, 131), window)  # partly outside: its inside part
    assert clipped[0, :2].tolist() == [0.0, 0.0] and clipped[0, 2] > 0


def test_a_square_comes_back_in_original_pixels_after_cut_and_resize():
    image, original = prepared_with_square((24, 20, 36, 30))
    window = (0.25 * COLS, 0.2 * ROWS, 0.75 * COLS, 0.6 * ROWS)
    crop, shown = V.cut(image, window, ROWS, COLS)
    resized = cv2.resize(crop, (S, S), interpolation=cv2.INTER_NEAREST)
    found = V.to_original(bright_box(resized)[None], resized.shape, shown)[0]
    assert np.allclose(found, original, atol=COLS / S)  # within a prepared pixel (the resize's rounding)
    assert np.allclose(V.to_original(bright_box(crop)[None], crop.shape, shown)[0], original)  # the cut: exact


def test_a_square_comes_back_after_cut_resize_and_flip():
    image, original = prepared_with_square((10, 40, 22, 52))
    window = (0.0, 0.3 * ROWS, 0.6 * COLS, ROWS)
    for array, shown, flipped in V.views_of(image, window, ROWS, COLS, flips=True):
        resized = cv2.resize(array, (S, S), interpolation=cv2.INTER_NEAREST)
        box = np.append(bright_box(resized), 0.9)[None]
        back = V.hflip_boxes(box, S) if flipped else box
        found = V.to_original(back, resized.shape, shown)[0]
        assert np.allclose(found[:4], original, atol=COLS / S) and found[4] == 0.9


def test_view_boxes_undo_the_flip_and_the_window_of_each_view():
    image, original = prepared_with_square((30, 8, 50, 20))
    window = (0.3 * COLS, 0.0, COLS, 0.5 * ROWS)
    views = V.views_of(image, window, ROWS, COLS, flips=True)
    assert [flipped for _, _, flipped in views] == [False, False, True, True] and len(views) == 4
    for array, shown, flipped in views:
        found = V.view_boxes(np.append(bright_box(array), 1.0)[None], array, shown, flipped)[0]
        assert np.allclose(found[:4], original)  # no resize: exact
    assert len(V.views_of(image, None, ROWS, COLS)) == 1  # no window: the whole image only


def test_hflip_twice_is_the_identity():
    boxes = np.array([[3.0, 4.0, 10.0, 12.0, 0.5], [0.0, 0.0, 64.0, 64.0, 1.0]])
    once = V.hflip_boxes(boxes, 64)
    assert once[0].tolist() == [54.0, 4.0, 61.0, 12.0, 0.5]
    assert np.allclose(V.hflip_boxes(once, 64), boxes)


def test_predicting_with_other_views_than_the_training_warns_naming_each():
    from siimcovid.views import warn_other_views

    trained = {"crop": "lung", "crop_margin": 0.1, "lung_conf": 0.25}
    assert warn_other_views(trained, {"crop": "none"}, "run") == ["crop=none (trained with crop=lung)"]
    assert warn_other_views({}, {"crop": "lung", "crop_margin": 0.05, "lung_conf": 0.25}, "run") == [
        "crop=lung (trained with crop=none)"
    ]
    assert warn_other_views(trained, {"crop": "lung", "crop_margin": 0.05, "lung_conf": 0.25}, "run") == [
        "crop_margin=0.05 (trained with 0.1)"
    ]
    assert warn_other_views(trained, {"crop": "lung", "crop_margin": 0.1, "lung_conf": 0.25}, "run") == []
    assert warn_other_views({}, None, "run") == []  # crop=none both: nothing to say
