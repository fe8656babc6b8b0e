"""ROS image buffers -> uint8 RGB, and numpy resizing (no cv_bridge, no torch)."""

from types import SimpleNamespace

import numpy as np
import pytest

from daptq_ros.runtime.image import ImageConversionError, image_msg_to_rgb, resize_rgb, ros_image_to_rgb


@pytest.fixture
def rgb(rng):
    return rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def _padded(pixels: np.ndarray, pad: int) -> tuple[bytes, int]:
    rows = pixels.reshape(pixels.shape[0], -1)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 77, np.uint8)], axis=1)
    return padded.tobytes(), padded.shape[1]


@pytest.mark.parametrize("pad", [0, 3])
def test_color_encodings_roundtrip(rgb, pad):
    h, w, _ = rgb.shape
    cases = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, np.full((h, w, 1), 9, np.uint8)], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], np.full((h, w, 1), 9, np.uint8)], axis=2),
    }
    for encoding, pixels in cases.items():
        data, step = _padded(np.ascontiguousarray(pixels), pad)
        out = ros_image_to_rgb(encoding, h, w, step, data)
        assert out.dtype == np.uint8 and out.shape == (h, w, 3), encoding
        np.testing.assert_array_equal(out, rgb, err_msg=encoding)


def test_mono8_and_mono16(rng):
    mono = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    out = ros_image_to_rgb("mono8", 4, 6, 6, mono.tobytes())
    np.testing.assert_array_equal(out, np.repeat(mono[:, :, None], 3, axis=2))
    deep = rng.integers(0, 65536, size=(4, 6), dtype=np.uint16)
    for big in (False, True):
        data = deep.astype(">u2" if big else "<u2").tobytes()
        out16 = ros_image_to_rgb("mono16", 4, 6, 12, data, is_bigendian=big)
        np.testing.assert_array_equal(out16[:, :, 1], (deep >> 8).astype(np.uint8))


def test_message_object(rgb):
    h, w, _ = rgb.shape
    msg = SimpleNamespace(
        encoding="bgr8", height=h, width=w, step=w * 3, is_bigendian=0, data=list(rgb[:, :, ::-1].tobytes())
    )
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    with pytest.raises(ImageConversionError, match="not an image message"):
        image_msg_to_rgb(object())


def test_errors_name_the_problem(rgb):
    h, w, _ = rgb.shape
    data = rgb.tobytes()
    with pytest.raises(ImageConversionError, match=r"expected height\*step = 5\*21 = 105 bytes, got 104"):
        ros_image_to_rgb("rgb8", h, w, w * 3, data[:-1])
    with pytest.raises(ImageConversionError, match="unsupported image encoding 'yuv422'"):
        ros_image_to_rgb("yuv422", h, w, w * 2, data)
    with pytest.raises(ImageConversionError, match="zero or negative size"):
        ros_image_to_rgb("rgb8", 0, w, w * 3, b"")
    with pytest.raises(ImageConversionError, match="step 20 is smaller"):
        ros_image_to_rgb("rgb8", h, w, 20, data)


def test_resize_area_downscale_is_block_mean(rng):
    img = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    out = resize_rgb(img, (4, 6))
    expected = img.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert out.shape == (4, 6, 3)
    assert np.max(np.abs(out.astype(np.float64) - expected)) <= 0.5 + 1e-6


def test_resize_non_integer_and_upscale(rng):
    flat = np.full((10, 7, 3), 200, np.uint8)
    assert np.all(resize_rgb(flat, (3, 5)) == 200)
    assert np.all(resize_rgb(flat, (16, 16)) == 200)
    ramp = np.repeat(np.linspace(0, 255, 4).astype(np.uint8)[None, :, None], 3, axis=2).repeat(2, axis=0)
    up = resize_rgb(ramp, (2, 8))
    assert np.all(np.diff(up[0, :, 0].astype(int)) >= 0)  # bilinear keeps a ramp monotonic
    img = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    assert resize_rgb(img, (6, 6)) is img
    with pytest.raises(ImageConversionError, match="height, width"):
        resize_rgb(img, (0, 4))
