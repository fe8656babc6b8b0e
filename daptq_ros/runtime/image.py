"""ROS-style image buffers to upright uint8 RGB arrays, and resizing, in plain numpy.

No cv_bridge (not installable from PyPI) and no torch: the policy node converts
``sensor_msgs/Image`` fields with :func:`ros_image_to_rgb` (or :func:`image_msg_to_rgb` on the
message object) and resizes to the model's input size with :func:`resize_rgb`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# encoding -> (channels, bytes per channel)
ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "8UC1": (1, 1),
    "8UC3": (3, 1),
    "mono16": (1, 2),
    "16UC1": (1, 2),
}


class ImageConversionError(ValueError):
    """An image buffer cannot be converted; the message names the field and the problem."""


def ros_image_to_rgb(
    encoding: str,
    height: int,
    width: int,
    step: int,
    data: bytes | bytearray | memoryview | np.ndarray,
    is_bigendian: bool | int = False,
) -> np.ndarray:
    """Convert the fields of a ``sensor_msgs/Image`` to a uint8 RGB array (height, width, 3).

    Row padding (``step`` > width * pixel bytes) is dropped. ``8UC3`` is read as BGR (the OpenCV
    convention), mono images are replicated to three channels and 16-bit mono is scaled to 8 bits
    by its top byte (``value >> 8``), honouring ``is_bigendian``.

    Args:
        encoding: ROS image encoding, one of :data:`ENCODINGS`.
        height: rows (> 0).
        width: columns (> 0).
        step: bytes per row including padding (>= width * pixel bytes).
        data: the raw buffer (at least ``height * step`` bytes; trailing bytes are ignored).
        is_bigendian: byte order of 16-bit encodings.

    Returns:
        A new C-contiguous uint8 array of shape (height, width, 3).

    Raises:
        ImageConversionError: unknown encoding, non-positive dimensions, a step too small for
            the width, or a buffer shorter than ``height * step`` bytes.
    """
    if encoding not in ENCODINGS:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}"
        )
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image has zero or negative size: height={height}, width={width}")
    channels, depth = ENCODINGS[encoding]
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ImageConversionError(
            f"image step {step} is smaller than width*channels*bytes = {width}*{channels}*{depth} "
            f"= {row_bytes} for encoding {encoding!r}"
        )
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.dtype != np.uint8:
        buf = buf.view(np.uint8)
    expected = height * step
    if buf.size < expected:
        raise ImageConversionError(
            f"image data is truncated: expected height*step = {height}*{step} = {expected} bytes, "
            f"got {buf.size} ({encoding}, {width}x{height})"
        )
    if buf.size > expected:
        logger.debug("image data has %d trailing bytes beyond height*step; ignored", buf.size - expected)
    rows = buf[:expected].reshape(height, step)[:, :row_bytes]
    if depth == 2:
        dtype = np.dtype(">u2" if is_bigendian else "<u2")
        pixels16 = np.ascontiguousarray(rows).view(dtype).reshape(height, width)
        mono = (pixels16 >> 8).astype(np.uint8)
        return np.repeat(mono[:, :, None], 3, axis=2)
    pixels = rows.reshape(height, width, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if encoding in ("bgr8", "bgra8", "8UC3"):
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    return np.ascontiguousarray(pixels[:, :, :3])


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """Convert a ``sensor_msgs/Image``-like object (fields by attribute) with :func:`ros_image_to_rgb`."""
    try:
        fields = (msg.encoding, msg.height, msg.width, msg.step, msg.data)
    except AttributeError as err:
        raise ImageConversionError(
            f"object of type {type(msg).__name__} is not an image message: {err}"
        ) from err
    data = fields[4]
    if not isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        data = bytes(data)  # rclpy may hand array.array or a list of ints
    return ros_image_to_rgb(*fields[:4], data, bool(getattr(msg, "is_bigendian", False)))


def _axis_weights(n_in: int, n_out: int) -> np.ndarray:
    """Resampling matrix (n_out, n_in): area (box) averaging to shrink, bilinear to enlarge."""
    if n_out == n_in:
        return np.eye(n_in, dtype=np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if n_out < n_in:
        # Output pixel i covers input interval [i*scale, (i+1)*scale); weight = overlap length.
        for i in range(n_out):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                weights[i, j] = min(hi, j + 1) - max(lo, j)
    else:
        # Half-pixel centres (align_corners=False), edge-clamped.
        centres = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        left = np.floor(centres).astype(int)
        right = np.minimum(left + 1, n_in - 1)
        frac = centres - left
        weights[np.arange(n_out), left] += 1 - frac
        weights[np.arange(n_out), right] += frac
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def resize_rgb(img: np.ndarray, size: tuple[int, int] | list[int]) -> np.ndarray:
    """Resize a uint8 (H, W, C) image to ``size`` = (height, width).

    Area averaging per axis when shrinking (like OpenCV ``INTER_AREA``), bilinear with half-pixel
    centres when enlarging. Returns the input unchanged when it already has the size.

    Raises:
        ImageConversionError: ``img`` is not (H, W, C) uint8 or ``size`` is not two positive ints.
    """
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ImageConversionError(f"resize_rgb expects a uint8 (H, W, C) image, got {img.dtype} {img.shape}")
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ImageConversionError(f"resize target must be (height, width) > 0, got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = img.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return img
    wy = _axis_weights(in_h, out_h)
    wx = _axis_weights(in_w, out_w)
    out = np.einsum("oh,hwc->owc", wy, img.astype(np.float32))
    out = np.einsum("pw,owc->opc", wx, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
