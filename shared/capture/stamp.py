"""A frame number and capture time drawn into the picture, readable after lossy H.264.

Theory of operation
-------------------
The stamp is a one-bit-per-block code, not text: each bit is a square block of pure black
(luma 16) or pure white (luma 235), laid out on the 16x16 macroblock grid from the top-left
corner, so every block is coded by whole H.264 transform blocks and a quantised block keeps
its average far from mid-grey.  A reader samples only the inner half of each block (deblocking
touches at most three pixels either side of an edge) and thresholds the average at mid-grey.

Layout, for a luma plane ``width`` pixels wide:

* Block size ``B``: 16 pixels when ``width >= 640``, otherwise 8 (still aligned to the
  macroblock grid and to H.264's 4x4 and 8x8 transforms).
* ``width // B`` blocks per row, filled in raster order (left to right, then top to bottom)
  over as many rows as the 144-bit code needs; the strip is the whole width of those rows,
  ``stamp_rows(height, width)`` pixels tall.  Unused blocks and the columns right of the last
  whole block are black.
* The 144 bits, each byte most significant bit first (``np.unpackbits`` order):

  - bits 0-15 (bytes 0-1): marker ``0xE4B1``, "a stamp starts here"; rejects blank frames.
  - bits 16-47 (bytes 2-5): frame number, unsigned 32-bit big-endian.
  - bits 48-111 (bytes 6-13): capture time, wall-clock microseconds, unsigned 64-bit
    big-endian.
  - bits 112-143 (bytes 14-17): CRC-32 of bytes 2-13 (``zlib.crc32``: the ISO-HDLC /
    Ethernet polynomial), big-endian.

A misread block changes the marker or fails the CRC, so :func:`read_stamp` answers ``None``
rather than a wrong time; random pictures pass both checks with odds of about 2**-48.

The smallest frame the code fits with room for a picture is 160x96 (at 160 wide: 20 blocks of
8 pixels a row, 8 rows, a 64-pixel strip).  Chroma under the strip should be neutral (128) so
the bits stay pure black and white; :func:`clear_stamp_chroma` does that for the caller, who
owns the U and V planes.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError

__all__ = [
    "STAMP_MIN_HEIGHT",
    "STAMP_MIN_WIDTH",
    "Stamp",
    "U8Array",
    "clear_stamp_chroma",
    "draw_stamp",
    "planes",
    "read_stamp",
    "stamp_block_size",
    "stamp_rows",
]

#: Smallest luma plane a stamp is drawn into (pixels).
STAMP_MIN_WIDTH: Final = 160
STAMP_MIN_HEIGHT: Final = 96

_BLACK: Final = 16  # BT.601 limited-range black and white: what a decoder treats as pure
_WHITE: Final = 235
_NEUTRAL_CHROMA: Final = 128

_MARKER: Final = b"\xe4\xb1"
_PAYLOAD: Final = struct.Struct(">IQ")  # frame number u32, capture_us u64
_CODE_BYTES: Final = len(_MARKER) + _PAYLOAD.size + 4  # + CRC-32
_CODE_BITS: Final = 8 * _CODE_BYTES  # 144

_U32_LIMIT: Final = 1 << 32
_U64_LIMIT: Final = 1 << 64

U8Array = npt.NDArray[np.uint8]


class Stamp(msgspec.Struct, frozen=True):
    """What the strip carries: which frame, and when it was captured."""

    frame_number: int
    """Frame counter, 0 to 2**32 - 1."""
    capture_us: int
    """Wall-clock capture time in microseconds since the epoch, 0 to 2**64 - 1."""

    def __post_init__(self) -> None:
        if not 0 <= self.frame_number < _U32_LIMIT:
            raise ConfigError(f"frame number {self.frame_number} does not fit in 32 bits")
        if not 0 <= self.capture_us < _U64_LIMIT:
            raise ConfigError(f"capture time {self.capture_us} us does not fit in 64 bits")


def stamp_block_size(width: int) -> int:
    """Edge of one bit's block in pixels: 16 for frames at least 640 wide, else 8."""
    return 16 if width >= 640 else 8


def stamp_rows(height: int, width: int) -> int:
    """How many top rows of the luma plane the strip occupies (a multiple of 8 or 16).

    Raises :class:`ConfigError` if the frame is smaller than 160x96.
    """
    if width < STAMP_MIN_WIDTH or height < STAMP_MIN_HEIGHT:
        raise ConfigError(
            f"frame {width}x{height} is too small for the timestamp strip: "
            f"it needs at least {STAMP_MIN_WIDTH}x{STAMP_MIN_HEIGHT}"
        )
    block = stamp_block_size(width)
    return _grid_rows(width // block) * block


def _grid_rows(columns: int) -> int:
    return -(-_CODE_BITS // columns)


def _encode(stamp: Stamp) -> U8Array:
    payload = _PAYLOAD.pack(stamp.frame_number, stamp.capture_us)
    code = _MARKER + payload + zlib.crc32(payload).to_bytes(4, "big")
    return np.unpackbits(np.frombuffer(code, dtype=np.uint8))


def _decode(code: bytes) -> Stamp | None:
    if code[: len(_MARKER)] != _MARKER:
        return None
    payload = code[len(_MARKER) : len(_MARKER) + _PAYLOAD.size]
    if zlib.crc32(payload) != int.from_bytes(code[-4:], "big"):
        return None
    frame_number, capture_us = _PAYLOAD.unpack(payload)
    return Stamp(frame_number, capture_us)


def _check_plane(plane: U8Array, name: str) -> None:
    if plane.ndim != 2 or plane.dtype != np.uint8:
        raise ConfigError(
            f"{name} must be a 2-D uint8 array, not {plane.ndim}-D {plane.dtype} {plane.shape}"
        )


def draw_stamp(y_plane: U8Array, stamp: Stamp) -> None:
    """Draw ``stamp`` into the top :func:`stamp_rows` rows of ``y_plane``, in place.

    ``y_plane`` is the luma plane, shape ``(height, width)``, uint8; it may be a strided view
    (into shared memory, or one plane of a larger buffer).  Rows below the strip are untouched.
    """
    _check_plane(y_plane, "y_plane")
    height, width = y_plane.shape
    rows = stamp_rows(height, width)
    block = stamp_block_size(width)
    columns = width // block

    cells = np.zeros(rows // block * columns, dtype=np.uint8)
    cells[:_CODE_BITS] = _encode(stamp)
    levels = np.where(cells.reshape(rows // block, columns), _WHITE, _BLACK).astype(np.uint8)
    strip = y_plane[:rows]
    np.copyto(strip[:, : columns * block], levels.repeat(block, axis=0).repeat(block, axis=1))
    strip[:, columns * block :] = _BLACK


def read_stamp(y_plane: U8Array) -> Stamp | None:
    """Read the stamp back from a (decoded) luma plane of the size it was drawn at.

    Returns ``None`` when there is no stamp, or when a block misread so the marker or CRC does
    not match: never a wrong value short of a 2**-48 coincidence.  A plane smaller than
    160x96, or one scaled from the size it was stamped at, reads as ``None``.
    """
    _check_plane(y_plane, "y_plane")
    height, width = y_plane.shape
    if width < STAMP_MIN_WIDTH or height < STAMP_MIN_HEIGHT:
        return None
    block = stamp_block_size(width)
    columns = width // block
    grid_rows = _grid_rows(columns)
    margin = block // 4

    # Split the strip into (row, y-in-block, column, x-in-block) with no copy, keep the inner
    # half of each block, and sum it: one vectorised pass over ~15k pixels at 1080p.
    blocks = y_plane[: grid_rows * block, : columns * block].reshape(
        grid_rows, block, columns, block
    )
    inner = blocks[:, margin : block - margin, :, margin : block - margin]
    sums = inner.sum(axis=(1, 3), dtype=np.uint32).ravel()[:_CODE_BITS]
    inner_pixels = (block - 2 * margin) ** 2
    # mean > (16 + 235) / 2, kept in integers: 2 * sum > 251 * pixels.
    bits = 2 * sums > (_BLACK + _WHITE) * inner_pixels
    return _decode(np.packbits(bits).tobytes())


def clear_stamp_chroma(u_plane: U8Array, v_plane: U8Array, width: int, height: int) -> None:
    """Set the chroma under the strip to neutral 128 so no colour bleeds into the bits.

    ``u_plane`` and ``v_plane`` are the 4:2:0 chroma planes, each ``(height // 2, width // 2)``
    for a ``width`` x ``height`` luma plane.
    """
    chroma_shape = ((height + 1) // 2, (width + 1) // 2)
    for plane, name in ((u_plane, "u_plane"), (v_plane, "v_plane")):
        _check_plane(plane, name)
        if plane.shape != chroma_shape:
            raise ConfigError(
                f"{name} is {plane.shape}, but 4:2:0 chroma of {width}x{height} is {chroma_shape}"
            )
    rows = stamp_rows(height, width) // 2
    u_plane[:rows] = _NEUTRAL_CHROMA
    v_plane[:rows] = _NEUTRAL_CHROMA


def planes(buf: U8Array, width: int, height: int) -> tuple[U8Array, U8Array, U8Array]:
    """Views of the Y, U and V planes of an I420 (yuv420p) buffer: planar Y, then U, then V.

    ``buf`` is any C-contiguous uint8 array of ``width * height * 3 // 2`` bytes (a flat frame
    in shared memory, or ``VideoFrame.to_ndarray()``'s ``(height * 3 // 2, width)``).  The
    planes share its memory, so writing them writes ``buf``.
    """
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ConfigError(f"I420 needs positive, even dimensions, not {width}x{height}")
    if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
        raise ConfigError(f"an I420 buffer must be C-contiguous uint8, not {buf.dtype}")
    luma = width * height
    if buf.size != luma * 3 // 2:
        raise ConfigError(
            f"an I420 {width}x{height} frame is {luma * 3 // 2} bytes, the buffer {buf.size}"
        )
    flat = buf.reshape(-1)
    chroma = luma // 4
    y = flat[:luma].reshape(height, width)
    u = flat[luma : luma + chroma].reshape(height // 2, width // 2)
    v = flat[luma + chroma :].reshape(height // 2, width // 2)
    return y, u, v
