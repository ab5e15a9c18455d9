"""Huge scenes read window by window.

A satellite or aerial scene of 20000-40000 px, 16 bits and four bands takes several
gigabytes decoded, more than the tiles that sliced prediction detects at a time. A
tiled or striped TIFF (GeoTIFFs are) can be read one window at a time: only the strips
or tiles that a window touches are decoded, and the last ones are kept for the
neighbouring windows. :func:`open_scene` gives such a :class:`TiffScene` for the TIFFs
that allow it and an :class:`ArrayScene` over the whole decoded image for every other
image, so that callers (``efpn predict --slice``, ``efpn val --slice``, ``efpn data
slice``) read both alike. Both give exactly the pixels :func:`efpn.data.image.load_rgb`
gives: the same bands and the same stretch of deep samples, whose percentiles a
windowed scene takes in one streaming pass over the same strided sample.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from .image import (
    _is_tiff,
    _open_tiff,
    _pick_bands,
    _range,
    _tiff_nodata,
    _tiff_orientation,
    apply_stretch,
    load_rgb,
    sample_step,
    stretch_range,
)
from .records import DataError

__all__ = ["ArrayScene", "Scene", "TiffScene", "open_scene", "reduce_scene"]

_MINISBLACK, _RGB, _YCBCR = 1, 2, 6
_OLD_JPEG, _JPEG = 6, 7
_ASSOCIATED_ALPHA = 1
#: a strip or tile decoded to more than this is not read window by window (a scene stored
#: as one strip would be decoded whole for every window)
MAX_SEGMENT_BYTES = 256 * 2**20
#: decoded strips and tiles kept for the next windows: at least this, and as many as a
#: band of rows across the scene of the last window's height holds (windows are read row
#: by row, and a strip spans the whole width)
CACHE_BYTES = 256 * 2**20
#: rows read at once for the stretch's sample of a deep scene
SAMPLE_BAND_BYTES = 64 * 2**20


class _MissingCodec(ValueError):
    """The installed imagecodecs cannot decode this TIFF's compression."""


class Scene:
    """An image that is read window by window, as ``(h, w, 3)`` uint8 RGB."""

    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3

    def window(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The pixels of columns ``x0:x1`` and rows ``y0:y1``, ``(y1 - y0, x1 - x0, 3)``."""
        raise NotImplementedError

    def reduced(self, factor: int) -> np.ndarray:
        """The whole scene with each ``factor x factor`` block averaged to one pixel
        (:func:`reduce_scene`), read in bands of rows."""
        return reduce_scene(self, factor)

    def close(self) -> None:
        """Release the file (a no-op for an image in memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayScene(Scene):
    """A decoded image in memory, ``(H, W, 3)`` uint8."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.height, self.width = array.shape[:2]

    def window(self, x0, y0, x1, y1):
        return self.array[y0:y1, x0:x1]


class TiffScene(Scene):
    """A tiled or striped TIFF read window by window (see :func:`open_scene`)."""

    def __init__(self, path, tif, page):
        self.path, self._tif, self._page = path, tif, page
        planes, _, height, width, contig = page.shaped
        self.height, self.width = int(height), int(width)
        self._planes, self._contig = int(planes), int(contig)
        self.bands = self._planes * self._contig
        self._dtype = np.dtype(page.dtype)
        self._nodata = _tiff_nodata(page)
        self._memmap = None
        self._sampling = False
        self._band_bytes = 0
        self._preview: _Preview | None = None
        if page.is_memmappable:
            import tifffile

            mm = tifffile.memmap(str(path), page=0, mode="r")
            self._memmap = mm.reshape(self._planes, self.height, self.width, self._contig)
        else:
            if page.is_tiled:
                self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
                if int(page.tiledepth) != 1:
                    raise ValueError("volumetric tiles")
            else:
                self._seg_h, self._seg_w = min(int(page.rowsperstrip), self.height), self.width
            self._across = -(-self.width // self._seg_w)
            self._down = -(-self.height // self._seg_h)
            if len(page.dataoffsets) != self._planes * self._across * self._down:
                raise ValueError("an unexpected count of strips or tiles")
            seg_bytes = self._seg_h * self._seg_w * self._contig * self._dtype.itemsize
            if seg_bytes > MAX_SEGMENT_BYTES:
                raise ValueError("strips or tiles too large to read by window")
            self._decode = page.decode
            self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
            self._cached = 0
            self._decode_segment(0)  # a missing codec is an error here, not mid-scene
        self._lo_hi = None if self._dtype == np.uint8 else self._stretch_range()

    # -------------------------------------------------------------- raw samples
    def _decode_segment(self, index: int) -> np.ndarray:
        """Strip or tile ``index`` as ``(rows, cols, contig samples)``; kept for reuse
        (unless the scene is being sampled, in one pass that reads each only once)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        page = self._page
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        data = None
        if count:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
            if len(data) < count:
                raise DataError(f"{self.path}: cannot decode image: the file is truncated")
        try:
            segment, _, shape = self._decode(data, index, jpegtables=page.jpegtables)
        except Exception as e:  # missing codec, corrupt data
            if "imagecodecs" in str(e):  # Pillow may still read it whole
                raise _MissingCodec(str(e)) from None
            raise DataError(
                f"{self.path}: cannot decode image: {self._segment_name(index)}: {e}"
            ) from None
        if segment is None:  # an empty strip or tile: zeros, as tifffile fills it
            segment = np.zeros(shape, dtype=self._dtype)
        segment = segment.reshape(segment.shape[-3:])
        if self._sampling:
            return segment
        self._cache[index] = segment
        self._cached += segment.nbytes
        while self._cached > max(CACHE_BYTES, self._band_bytes) and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return segment

    def _segment_name(self, index: int) -> str:
        """Where strip or tile ``index`` lies, for an error message."""
        kind = "tile" if self._page.is_tiled else "strip"
        plane, cell = divmod(index, self._across * self._down)
        ty, tx = divmod(cell, self._across)
        rows = f"rows {ty * self._seg_h}-{min((ty + 1) * self._seg_h, self.height) - 1}"
        cols = f", columns {tx * self._seg_w}-{min((tx + 1) * self._seg_w, self.width) - 1}"
        where = rows + (cols if self._page.is_tiled else "")
        return f"{kind} {index + 1} of {len(self._page.dataoffsets)} ({where}" + (
            f", plane {plane + 1})" if self._planes > 1 else ")"
        )

    def _raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The stored samples of a window, ``(h, w, bands)`` in the file's type."""
        if self._memmap is not None:
            block = self._memmap[:, y0:y1, x0:x1, :]
            return np.concatenate(list(block), axis=-1) if self._planes > 1 else block[0]
        out = np.empty((y1 - y0, x1 - x0, self.bands), dtype=self._dtype)
        sh, sw = self._seg_h, self._seg_w
        row_bytes = self.width * self.bands * self._dtype.itemsize
        self._band_bytes = max(self._band_bytes, (y1 - y0 + 2 * sh) * row_bytes)
        per_plane = self._across * self._down
        for plane in range(self._planes):
            bands = slice(plane * self._contig, (plane + 1) * self._contig)
            for ty in range(y0 // sh, -(-y1 // sh)):
                for tx in range(x0 // sw, -(-x1 // sw)):
                    seg = self._decode_segment(plane * per_plane + ty * self._across + tx)
                    sy, sx = ty * sh, tx * sw  # the segment's top left in the image
                    a0, a1 = max(y0, sy), min(y1, sy + seg.shape[0], self.height)
                    b0, b1 = max(x0, sx), min(x1, sx + seg.shape[1], self.width)
                    out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0, bands] = seg[
                        a0 - sy : a1 - sy, b0 - sx : b1 - sx
                    ]
        return out

    def _as_values(self, raw: np.ndarray) -> np.ndarray:
        """Stored samples to the bands read as RGB (complex radar samples as amplitude)."""
        if np.iscomplexobj(raw):
            raw = np.abs(raw)
        return _pick_bands(self.path, raw)

    def _stretch_range(self) -> tuple[float, float]:
        """The range :func:`efpn.data.image.stretch_to_uint8` would take from the whole
        image, from the same strided sample, read in bands of rows."""
        if _range() is not None:
            return stretch_range(None)
        step = sample_step(self.height, self.width)
        parts = []
        # bands of whole strips or tiles, so that each is decoded once (and not kept)
        seg_h = 1 if self._memmap is not None else self._seg_h
        row_bytes = self.width * self.bands * self._dtype.itemsize
        band = max(1, SAMPLE_BAND_BYTES // (row_bytes * seg_h)) * seg_h
        self._sampling = True
        try:
            for r0 in range(0, self.height, band):
                block = self._raw(0, r0, self.width, min(r0 + band, self.height))
                first = -r0 % step  # the sample's rows are 0, step, 2 step, ... of the scene
                parts.append(self._as_values(block[first::step, ::step]))
        finally:
            self._sampling = False
        return stretch_range(np.concatenate(parts), self._nodata)

    # -------------------------------------------------------------- RGB windows
    def window(self, x0, y0, x1, y1):
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(self.width, int(x1)), min(self.height, int(y1))
        values = self._as_values(self._raw(x0, y0, x1, y1))
        if self._lo_hi is None:
            rgb = np.ascontiguousarray(values)
        else:
            rgb = apply_stretch(values, *self._lo_hi, nodata=self._nodata)
        if self._preview is not None:
            self._preview.add(rgb, x0, y0)
        return rgb

    def collect_preview(self, factor: int) -> None:
        """Reduce every window read from now on by ``factor`` into a preview, so that
        :meth:`reduced` with that factor needs no pass of its own once the windows have
        covered the scene (sliced prediction reads every pixel anyway)."""
        self._preview = _Preview(self.height, self.width, factor)

    def reduced(self, factor):
        preview = self._preview
        if preview is not None and preview.factor == factor and preview.complete():
            return preview.image
        return reduce_scene(self, factor)

    def close(self):
        self._memmap = None
        if getattr(self, "_cache", None) is not None:
            self._cache.clear()
        self._tif.close()


class _Preview:
    """:func:`reduce_scene`'s result built from the windows as they are read: each
    window gives the ``factor x factor`` blocks of the scene's grid that lie wholly inside
    it (or are cut only by the scene's own right or bottom edge)."""

    def __init__(self, height: int, width: int, factor: int):
        self.factor, self.height, self.width = factor, height, width
        h, w = -(-height // factor), -(-width // factor)
        self.image = np.zeros((h, w, 3), dtype=np.uint8)
        self.done = np.zeros((h, w), dtype=bool)

    def _span(self, lo: int, hi: int, size: int) -> tuple[int, int]:
        """The blocks (in preview pixels) wholly inside ``[lo, hi)`` of a side ``size``."""
        f = self.factor
        return -(-lo // f), (hi // f if hi < size else -(-size // f))

    def add(self, rgb: np.ndarray, x0: int, y0: int) -> None:
        f = self.factor
        h, w = rgb.shape[:2]
        c0, c1 = self._span(x0, x0 + w, self.width)
        r0, r1 = self._span(y0, y0 + h, self.height)
        if c1 <= c0 or r1 <= r0 or self.done[r0:r1, c0:c1].all():
            return
        block = rgb[r0 * f - y0 : r1 * f - y0, c0 * f - x0 : c1 * f - x0]
        small = np.asarray(Image.fromarray(np.ascontiguousarray(block)).reduce(f))
        self.image[r0:r1, c0:c1] = small
        self.done[r0:r1, c0:c1] = True

    def complete(self) -> bool:
        return bool(self.done.all())


def reduce_scene(scene: Scene, factor: int, band_rows: int = 256) -> np.ndarray:
    """``scene`` with each ``factor x factor`` block averaged to one pixel (Pillow's
    :meth:`~PIL.Image.Image.reduce`; a partial block at the right or bottom edge averages
    what it covers), ``(ceil(H / factor), ceil(W / factor), 3)`` uint8, read in bands of
    whole blocks of about ``band_rows`` rows, so only one band is decoded at a time."""
    if factor < 1:
        raise ValueError(f"the factor must be 1 or more, got {factor}")
    H, W = scene.height, scene.width
    out = np.empty((-(-H // factor), -(-W // factor), 3), dtype=np.uint8)
    step = max(1, band_rows // factor) * factor
    for r0 in range(0, H, step):
        band = Image.fromarray(np.ascontiguousarray(scene.window(0, r0, W, min(r0 + step, H))))
        small = np.asarray(band.reduce(factor) if factor > 1 else band)
        out[r0 // factor : r0 // factor + small.shape[0]] = small
    return out


def _windowable(page) -> bool:
    """Whether ``load_rgb`` reads this TIFF page as a window of the scene reads it: a
    plain image of one or more bands in 8 bits or more, gray, RGB, or YCbCr in JPEG
    (decoded to RGB), not a palette or bilevel image, nor an RGB with associated
    (premultiplied) alpha, whose colours Pillow un-premultiplies."""
    if page.axes not in ("YX", "YXS", "SYX"):
        return False
    if page.compression == _OLD_JPEG:
        return False
    if page.photometric == _YCBCR:
        if page.compression != _JPEG:  # uncompressed subsampled YCbCr
            return False
    elif page.photometric not in (_MINISBLACK, _RGB):
        return False
    bits = page.bitspersample
    bits = max(bits) if isinstance(bits, tuple) else bits
    if bits < 8:
        return False
    return bits > 8 or _ASSOCIATED_ALPHA not in tuple(page.extrasamples or ())


def open_scene(path: str | Path, upright: bool = True) -> Scene:
    """The image at ``path`` as a :class:`Scene`: a tiled or striped TIFF window by
    window (:class:`TiffScene`; the pixel limit does not apply, since no more than a
    band of rows is ever decoded), any other image decoded whole under
    ``EFPN_MAX_SLICED_PIXELS`` (:class:`ArrayScene`). A TIFF that its orientation tag
    turns is read whole. Bad files are a one-line :class:`DataError`."""
    if _is_tiff(path):
        tif = _open_tiff(path)
        try:
            page = tif.pages[0]
            turned = upright and _tiff_orientation(page) != 1
            if _windowable(page) and not turned:
                # settings this scene cannot be read with: said now, not after a whole read
                _range()
                _pick_bands(path, np.zeros((1, 1, page.samplesperpixel), dtype=np.uint8))
                try:
                    return TiffScene(path, tif, page)
                except DataError:  # damaged: a whole read would fail too, or be refused
                    raise
                except Exception:  # a layout or codec this reader does not cover
                    pass
        except DataError:
            tif.close()
            raise
        tif.close()
    return ArrayScene(load_rgb(path, sliced=True, upright=upright))
