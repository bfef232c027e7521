"""Peak memory and time of decoding one large high-depth image (issue #13: bounded decoding).

    python bench/decode_memory.py                 # a 7900x7900 16-bit PNG (about 140 KB)
    python bench/decode_memory.py --side 4000

Builds the PNG in memory (mostly zeros, a sparse grid of 4000s: it compresses to a small
upload), then reads it with ``medlens.data.imaging.read_image`` and prints the growth of the
process's peak resident memory and the wall time. Run it in a fresh process: the peak is the
process's high-water mark.
"""

from __future__ import annotations

import argparse
import io
import resource
import time

import numpy as np
from PIL import Image

from medlens.data.imaging import read_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, default=7900)
    side = ap.parse_args().side
    a = np.zeros((side, side), np.uint16)
    a[::7, ::5] = 4000
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    data = buf.getvalue()
    del a, buf
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    img = read_image(data, name="big.png")
    dt = time.perf_counter() - t
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(
        f"{side}x{side} 16-bit PNG, {len(data) / 1e3:.0f} KB: decoded to {img.pixels.dtype} "
        f"{img.pixels.shape} in {dt:.2f} s, peak RSS +{grown:.0f} MB "
        f"(the uint16 pixels alone: {side * side * 2 / 2**20:.0f} MB)"
    )


if __name__ == "__main__":
    main()
