"""The synthetic scenes of docs/results.md's "Scenes read window by window".

    python docs/scenes/make_scene.py deep scene.tif 12000    # or 30000
    python docs/scenes/make_scene.py jpeg ortho.tif 20000

``deep``: a 16-bit four-band GeoTIFF (UTM 33N, 0.5 m pixels, GDAL nodata 0), 512-px
tiles of random values 800..3000, Deflate level 1. ``jpeg``: an 8-bit RGB orthophoto,
512-px tiles in JPEG quality 90, YCbCr with 2x2 chroma subsampling: every tile the same
random noise with its red and green shifted by the tile's column and row. Both are
written tile by tile (BigTIFF when needed), so no more than a tile is held in memory.
"""

import sys

import numpy as np
import tifffile

kind, out, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
T = 512
rng = np.random.default_rng(0)
count = (-(-side // T)) ** 2
if kind == "deep":
    keys = [1, 1, 0, 2, 1025, 0, 1, 1, 3072, 0, 1, 32633]  # GeoKeys: projected, EPSG:32633
    tags = [
        (34735, "H", len(keys), keys, True),
        (33550, "d", 3, (0.5, 0.5, 0.0), True),
        (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
        (42113, "s", 0, "0", True),
    ]
    tiles = (rng.integers(800, 3000, (T, T, 4), dtype=np.uint16) for _ in range(count))
    tifffile.imwrite(
        out, tiles, shape=(side, side, 4), dtype=np.uint16, tile=(T, T), compression="zlib",
        compressionargs={"level": 1}, photometric="minisblack", planarconfig="contig",
        extratags=tags, bigtiff=side * side * 8 > 2**32 - 2**28,
    )
elif kind == "jpeg":
    base = rng.integers(0, 256, (T, T, 3), dtype=np.uint8)
    across = -(-side // T)

    def tiles():
        for i in range(count):
            ty, tx = divmod(i, across)
            t = base.copy()
            t[..., 0] = (t[..., 0] // 4 + (tx * 37) % 192).astype(np.uint8)
            t[..., 1] = (t[..., 1] // 4 + (ty * 53) % 192).astype(np.uint8)
            yield t

    tifffile.imwrite(
        out, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(T, T), photometric="rgb",
        compression="jpeg", compressionargs={"level": 90}, subsampling=(2, 2), bigtiff=True,
    )
else:
    sys.exit(f"kind must be deep or jpeg, got {kind!r}")
