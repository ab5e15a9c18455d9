"""Reading images without torch (the data commands start without importing it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .records import DataError

__all__ = [
    "READING_VARIABLES",
    "image_orientation",
    "image_sizes",
    "load_rgb",
    "max_pixels",
    "stretch_to_uint8",
    "reading_settings",
    "use_reading_of",
]

_ORIENTATION = 0x0112  # the EXIF tag; 5-8 turn the image by 90 degrees
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # Pillow's single-band modes over 8 bits

# efpn checks sizes itself (below), with a message that says what to do
Image.MAX_IMAGE_PIXELS = None


def max_pixels(sliced: bool = False) -> int:
    """The largest image efpn reads, in pixels: ``EFPN_MAX_PIXELS`` (default 100 million,
    a 10000x10000 scene, whose float copy alone is 1.2 GB) for whole-image paths, and
    ``EFPN_MAX_SLICED_PIXELS`` (default 1 billion) for sliced prediction, which keeps the
    scene as uint8 and converts one batch of tiles at a time."""
    import os

    name, default = ("EFPN_MAX_SLICED_PIXELS", 10**9) if sliced else ("EFPN_MAX_PIXELS", 10**8)
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise DataError(f"{name}={os.environ[name]!r}: expected a whole number of pixels") from None


def check_size(
    path, width: int, height: int, sliced: bool = False, bytes_per_pixel: int = 3
) -> None:
    """Refuse an image over :func:`max_pixels`; one whose decoded pixels take more than
    the 3 bytes of 8-bit RGB (16-bit or multi-band scenes) counts for as many RGB pixels
    as its bytes would fill."""
    limit = max_pixels(sliced)
    weight = max(1.0, bytes_per_pixel / 3)
    if width * height * weight > limit:
        hint = (
            "raise EFPN_MAX_SLICED_PIXELS to read it"
            if sliced
            else "detect such scenes with --slice, or raise EFPN_MAX_PIXELS"
        )
        size = f"{width * height / 1e6:.0f} megapixels"
        if weight > 1:
            size += f" of {bytes_per_pixel} bytes ({width * height * weight / 1e6:.0f} as RGB)"
        raise DataError(
            f"{path}: {width}x{height} is {size}, over the limit of {limit / 1e6:.0f}; {hint}"
        )


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1, upright as stored, when absent or unreadable)."""
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block is not worth refusing the image for
        return 1
    return value if 1 <= value <= 8 else 1


def image_sizes(path: str | Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(stored, upright)``: the image's ``(width, height)`` as its pixels are stored,
    and as viewers show it after its EXIF orientation (swapped for orientations 5-8),
    from its header (no pixel is decoded)."""
    orientation, (w, h) = image_orientation(path)
    return (w, h), ((h, w) if orientation >= 5 else (w, h))


def image_orientation(path: str | Path) -> tuple[int, tuple[int, int]]:
    """``(orientation, stored (width, height))`` from the header: the EXIF or TIFF
    orientation (1 when upright as stored) that :func:`load_rgb` turns images by. TIFFs
    are read by tifffile: Pillow cannot open some (multi-band, 16-bit colour), and it
    reports a turned TIFF's size already upright."""
    if not _is_tiff(path):
        with Image.open(path) as im:
            return exif_orientation(im), im.size
    with _open_tiff(path) as tif:
        page = tif.pages[0]
        return _tiff_orientation(page), _tiff_width_height(path, page)


def load_rgb(path: str | Path, sliced: bool = False, upright: bool = True) -> np.ndarray:
    """Load any image as ``(H, W, 3)`` uint8 RGB. An image over :func:`max_pixels` is
    refused from its header, before it is decoded.

    - Grayscale is repeated over the three channels; alpha is dropped.
    - Images with more than 8 bits per sample (16-bit, 32-bit, float: satellite and
      aerial scenes, microscopy) are stretched to 0..255 from the 0.5th and 99.5th
      percentiles of their values (one range for all bands, so colours keep their
      balance; a GeoTIFF's nodata value is left out and read as 0), as GIS viewers show
      them. Sensor data in 11 to 14 bits would be nearly black scaled by 65535.
      ``EFPN_RANGE=LOW,HIGH`` maps one fixed range instead, the same for every image
      (tiles of one sensor keep their relative brightness).
    - TIFFs with more than three bands are read as the RGB of bands 1, 2, 3;
      ``EFPN_BANDS`` picks others (1-based, as GDAL counts, e.g. ``EFPN_BANDS=3,2,1``
      for a BGR-NIR scene). Such TIFFs and 16-bit colour TIFFs are read with tifffile.

    Args:
        path: the image file.
        sliced: check the size against the (larger) limit of sliced prediction.
        upright: turn the image as its EXIF orientation says, as image viewers,
            annotation tools and Ultralytics show it (phone photos store most images
            sideways); ``False`` keeps the stored pixel order.
    """
    try:
        try:
            with Image.open(path) as im:
                check_size(path, *im.size, sliced=sliced)
                channels = _png_deep_colour(im) if im.format == "PNG" else None
                if channels:
                    return _read_png16(path, im, channels, sliced=sliced, upright=upright)
                if im.format != "TIFF":
                    return _pil_rgb(im, upright)
                turned = getattr(im, "tag_v2", {}).get(_ORIENTATION, 1) not in (1, None)
                if turned and not upright:
                    pass  # Pillow turns TIFFs as it loads them: the stored pixels need tifffile
                elif not _tiff_needs_tifffile(im):
                    try:
                        return _pil_rgb(im, upright)
                    except (OSError, ValueError):  # a layout Pillow opens but cannot decode
                        pass
                elif im.mode in _DEEP_MODES:
                    # one deep band: tifffile for the nodata value, else Pillow's own
                    # decoders (a codec the installed imagecodecs lacks)
                    try:
                        return read_tiff_rgb(path, sliced=sliced, upright=upright)
                    except DataError:
                        return _pil_rgb(im, upright)
        except UnidentifiedImageError:
            if not _is_tiff(path):
                raise
        return read_tiff_rgb(path, sliced=sliced, upright=upright)
    except (DataError, MemoryError):
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except Exception as e:  # Pillow raises several types for undecodable files
        raise DataError(f"{path}: cannot decode image: {e}") from None


def _pil_rgb(im: Image.Image, upright: bool) -> np.ndarray:
    im.load()
    if upright and exif_orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in _DEEP_MODES:
        gray = stretch_to_uint8(np.asarray(im)[..., None])
        return np.repeat(gray, 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.array(im.convert("RGB"))


def stretch_to_uint8(arr: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """Map an ``(H, W, C)`` array of any numeric type to uint8: one linear range for all
    bands, from the 0.5th to the 99.5th percentile of the valid values (NaN, infinities
    and ``nodata`` left out and set to 0), or ``EFPN_RANGE`` (``LOW,HIGH``) for every
    image alike. uint8 passes through. The percentiles come
    from a strided sample of at most about a million pixels, and the conversion runs in
    row blocks, so a gigapixel scene costs little more than its own array."""
    if arr.dtype == np.uint8:
        return arr
    h, w = arr.shape[:2]
    step = sample_step(h, w)
    lo, hi = stretch_range(arr[::step, ::step], nodata)
    return apply_stretch(arr, lo, hi, nodata)


def sample_step(height: int, width: int) -> int:
    """The stride of the sample that :func:`stretch_to_uint8` takes its percentiles from
    (rows and columns ``0, step, 2 step, ...``): at most about a million pixels."""
    return max(1, int(np.ceil(np.sqrt(height * width / 1e6))))


def stretch_range(sample: np.ndarray | None, nodata: float | None = None) -> tuple[float, float]:
    """``(low, high)`` of the linear map to 0..255: ``EFPN_RANGE`` when set, else the
    0.5th and 99.5th percentiles of the valid values of ``sample``; widened around a
    flat image's one value so that it maps to mid-gray, not to 0."""
    fixed = _range()
    if fixed is not None:
        lo, hi = fixed
    else:
        sample = sample.astype(np.float64).ravel()
        valid = np.isfinite(sample)
        if nodata is not None:
            valid &= sample != nodata
        sample = sample[valid]
        lo, hi = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 1.0, lo + 1.0
    return float(lo), float(hi)


def apply_stretch(arr: np.ndarray, lo: float, hi: float, nodata: float | None = None) -> np.ndarray:
    """``arr`` mapped linearly from ``[lo, hi]`` to uint8 in row blocks (NaN, infinities
    and ``nodata`` to 0)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    scale = 255.0 / (hi - lo)
    for r in range(0, arr.shape[0], 1024):
        block = arr[r : r + 1024].astype(np.float32)
        bad = ~np.isfinite(block)
        if nodata is not None:
            bad |= block == nodata
        block = np.clip((block - lo) * scale + 0.5, 0, 255)
        block[bad] = 0
        out[r : r + 1024] = block.astype(np.uint8)
    return out


# ------------------------------------------------------------------ 16-bit colour PNGs
def _png_deep_colour(im: Image.Image) -> int | None:
    """The channel count of a 16-bit PNG with colour or alpha, which Pillow reads as its
    high bytes (a 12-bit scene in 16-bit samples would read nearly black): its decoder's
    raw mode is ``RGB;16B``, ``RGBA;16B`` or ``LA;16B``. ``None`` for any other PNG
    (16-bit gray Pillow reads whole)."""
    tile = getattr(im, "tile", None)
    rawmode = tile[0][3] if tile and len(tile[0]) > 3 else None
    return {"LA;16B": 2, "RGB;16B": 3, "RGBA;16B": 4}.get(rawmode)


def _read_png16(path, im: Image.Image, channels: int, sliced: bool, upright: bool) -> np.ndarray:
    """A 16-bit colour PNG decoded whole by torchvision's libpng (the one reader at
    hand that keeps 16-bit colour), then stretched as every deep image is; alpha is
    dropped, and the EXIF orientation applied as Pillow would."""
    import torch
    from torchvision.io import ImageReadMode, decode_png

    check_size(path, *im.size, sliced=sliced, bytes_per_pixel=2 * channels)
    orientation = exif_orientation(im) if upright else 1
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    try:
        chw = decode_png(data, mode=ImageReadMode.UNCHANGED)
    except RuntimeError:  # libpng's message names its own source file, not ours
        raise DataError(
            f"{path}: cannot decode image: its PNG data are damaged or cut short"
        ) from None
    if chw.dtype == torch.uint16:  # older torchvision gives int32
        arr = chw.view(torch.int16).numpy().view(np.uint16)
    else:
        arr = chw.numpy().astype(np.uint16)
    arr = np.moveaxis(arr, 0, -1)[..., : 3 if channels >= 3 else 1]
    rgb = stretch_to_uint8(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)
    return np.ascontiguousarray(_orient(rgb, orientation))


# ------------------------------------------------------------------ TIFFs beyond Pillow
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GDAL_NODATA = 42113
_warned_bands: set[int] = set()  # band counts already warned about


def _is_tiff(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _tiff_needs_tifffile(im: Image.Image) -> bool:
    """A TIFF of more than 8 bits per sample: Pillow would cut colour samples to their
    high 8 bits (a 12-bit scene in 16 bits would read nearly black) and cannot see a
    GeoTIFF's nodata value. Or one of more than three bands with ``EFPN_BANDS`` set:
    Pillow reads an RGB with extra bands as its first three, whatever the setting. Or
    one whose bands Pillow reads too few of: a band-interleaved (planar) scene of several
    gray bands reads as its first band alone."""
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    if max(bits, default=8) > 8:
        return True
    bands = int(tags.get(277, 1) or 1)
    if bands > 1 and tags.get(284, 1) == 2 and len(im.getbands()) < min(bands, 3):
        return True
    return bands > 3 and _bands() is not None


def _open_tiff(path):
    try:
        import logging

        import tifffile

        # what tifffile logs about a damaged file, efpn says in its one-line error
        logging.getLogger("tifffile").setLevel(logging.ERROR)
    except ImportError:  # a dependency; only a broken install lacks it
        raise DataError(
            f"{path}: a TIFF that Pillow cannot read needs tifffile (pip install tifffile)"
        ) from None
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for damaged files
        raise DataError(f"{path}: cannot decode image: {e}") from None
    if len(tif.pages) == 0:  # a header only, as a write cut short leaves
        tif.close()
        raise DataError(f"{path}: cannot decode image: the TIFF holds no image")
    return tif


def _tiff_width_height(path, page) -> tuple[int, int]:
    axes, shape = page.axes, page.shape
    if "X" not in axes or "Y" not in axes or set(axes) - set("YXS"):
        raise DataError(
            f"{path}: TIFF layout {axes} {tuple(shape)} is not an image of one or more bands"
        )
    return int(shape[axes.index("X")]), int(shape[axes.index("Y")])


def _tiff_orientation(page) -> int:
    tag = page.tags.get(_ORIENTATION)
    try:
        value = int(tag.value) if tag is not None else 1
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def _tiff_nodata(page) -> float | None:
    tag = page.tags.get(_GDAL_NODATA)
    if tag is None:
        return None
    try:  # GDAL writes it as text ("0", "-9999", "nan")
        value = float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None
    return None if np.isnan(value) else value  # NaN is left out as non-finite anyway


def _bands() -> tuple[int, ...] | None:
    import os

    text = os.environ.get("EFPN_BANDS", "").strip()
    if not text:
        return None
    try:
        bands = tuple(int(b) for b in text.replace(" ", "").split(","))
    except ValueError:
        bands = ()
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise DataError(
            f"EFPN_BANDS={text!r}: expected one band or three, 1-based, e.g. EFPN_BANDS=3,2,1"
        )
    return bands


def _range() -> tuple[float, float] | None:
    import os

    text = os.environ.get("EFPN_RANGE", "").strip()
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        lo = hi = float("nan")
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise DataError(
            f"EFPN_RANGE={text!r}: expected two numbers LOW,HIGH with HIGH above LOW, "
            "e.g. EFPN_RANGE=0,4095 for 12-bit data"
        )
    return lo, hi


#: the environment variables that change how images are read, as checkpoints record them
READING_VARIABLES = ("EFPN_BANDS", "EFPN_RANGE")


def reading_settings() -> dict[str, str]:
    """The set variables of :data:`READING_VARIABLES`, normalised (``{"EFPN_BANDS":
    "3,2,1"}``); checkpoints and ONNX exports record them."""
    settings = {}
    bands, span = _bands(), _range()
    if bands:
        settings["EFPN_BANDS"] = ",".join(map(str, bands))
    if span:
        settings["EFPN_RANGE"] = ",".join(f"{v:g}" for v in span)
    return settings


def use_reading_of(recorded: dict | None, source) -> None:
    """Read images as a model was trained to see them: a variable that the checkpoint
    records and that is unset here is set to the recorded value (so that ``val`` and
    ``predict`` read the scenes as training did); a different setting here is kept,
    with a warning."""
    import logging
    import os

    log = logging.getLogger("efpn.data")
    recorded = dict(recorded or {})
    current = reading_settings()
    for name in READING_VARIABLES:
        was, now = recorded.get(name), current.get(name)
        if was == now:
            continue
        if now is None:
            os.environ[name] = was
            log.info(f"{source}: reading images with {name}={was}, as it was trained")
        elif was is None:
            log.warning(f"{source}: trained without {name}, read here with {name}={now}")
        else:
            log.warning(f"{source}: trained with {name}={was}, read here with {name}={now}")


def _pick_bands(path, arr: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` to ``(H, W, 3)``: RGB as it is, one band (or gray and alpha) as
    gray, more bands as :func:`load_rgb` says."""
    count = arr.shape[2]
    chosen = _bands() if count > 3 else None
    if chosen is None:
        if count >= 3:
            chosen = (1, 2, 3)
            if count > 3 and count not in _warned_bands:
                _warned_bands.add(count)
                import logging

                logging.getLogger("efpn.data").warning(
                    f"{path}: {count} bands; read bands 1, 2, 3 as RGB (EFPN_BANDS=3,2,1 "
                    "or others pick which; this is said once)"
                )
        else:
            chosen = (1,)
    if max(chosen) > count:
        raise DataError(f"{path}: EFPN_BANDS asks for band {max(chosen)} of {count}")
    arr = arr[..., [b - 1 for b in chosen]]
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright as an EXIF/TIFF orientation says (as
    :func:`PIL.ImageOps.exif_transpose` does)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, k=1),
    }[orientation](arr)


def read_tiff_rgb(path: str | Path, sliced: bool = False, upright: bool = True) -> np.ndarray:
    """Read a TIFF's first image with tifffile as :func:`load_rgb` does (bands, stretch,
    orientation), decoding its compression with imagecodecs."""
    with _open_tiff(path) as tif:
        page = tif.pages[0]
        w, h = _tiff_width_height(path, page)
        depth = int(np.prod(page.shape)) // (w * h) * np.dtype(page.dtype).itemsize
        check_size(path, w, h, sliced=sliced, bytes_per_pixel=depth)
        try:
            arr = page.asarray()
        except Exception as e:  # missing codec, truncated strips
            hint = " (pip install -U imagecodecs)" if "imagecodecs" in str(e) else ""
            raise DataError(f"{path}: cannot decode image: {e}{hint}") from None
        if page.axes.startswith("S"):
            arr = np.moveaxis(arr, 0, -1)
        elif arr.ndim == 2:
            arr = arr[..., None]
        if np.iscomplexobj(arr):  # complex radar (SAR) samples: their amplitude
            arr = np.abs(arr)
        orientation = _tiff_orientation(page) if upright else 1
        nodata = _tiff_nodata(page)
    rgb = stretch_to_uint8(_pick_bands(path, arr), nodata=nodata)
    return np.ascontiguousarray(_orient(rgb, orientation))
