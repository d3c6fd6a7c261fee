"""Image grids and a PNG writer on the standard library (zlib), so the core needs NumPy alone."""
import struct
import zlib

import numpy as np

from . import backend
from .io import atomic_write

MAX_GRID_IMAGES = 4096      # images in one PNG grid (`sample --n`, `reconstruct --n`)


def to_uint8(images):
    """Images scaled to [-0.5, 0.5] (N, C, H, W) -> uint8 in [0, 255], clipped."""
    x = backend.to_numpy(images).astype(np.float64)
    return np.clip(np.rint((x + 0.5) * 255.0), 0, 255).astype(np.uint8)


def grid(images, columns=8, gap=2, background=255):
    """Tile uint8 images (N, C, H, W) into one (H', W', C) picture, ``columns`` per row."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"grid expects images of shape (N, 1 or 3, H, W), got {images.shape}")
    if images.shape[0] > 2 * MAX_GRID_IMAGES:     # reconstructions come in pairs
        raise ValueError(f"a grid holds at most {2 * MAX_GRID_IMAGES} images, got {images.shape[0]}")
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, c), background, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + col * (w + gap)
        out[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    return out


def write_png(picture, path):
    """Write a uint8 (H, W) or (H, W, 1|3) picture as a PNG, atomically."""
    picture = np.asarray(picture, dtype=np.uint8)
    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[:, :, 0]
    if picture.ndim == 2:
        colour_type, channels = 0, 1
    elif picture.ndim == 3 and picture.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"write_png expects (H, W), (H, W, 1) or (H, W, 3), got {picture.shape}")
    h, w = picture.shape[:2]
    rows = picture.reshape(h, w * channels)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()   # filter byte 0 per row

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9))
           + chunk(b"IEND", b""))
    atomic_write(path, lambda f: f.write(png))


def save_grid(images, path, columns=8):
    """Scaled images (N, C, H, W) in [-0.5, 0.5] -> a PNG grid at ``path``."""
    write_png(grid(to_uint8(images), columns=columns), path)
