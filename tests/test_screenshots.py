"""docs/screenshots.py (`make screenshots`) run for real into a temporary folder: the README's four
pictures come out as PNG files of the script's window size, each showing a page rather than one
flat colour, each a different page, and the README shows each of them from docs/img/.

Skipped without Chromium or the fonts the script requires (it says which; .ci/run installs them).
"""

import hashlib
import importlib.util
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

def _script():
    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_png(path):
    """(width, height, pixels): an 8-bit RGB or RGBA PNG decoded here (PNG spec: chunks with CRCs,
    zlib, per-row filters), pixels as a (height, width, channels) array. Fails on anything else,
    and on a damaged file."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is no PNG"
    position, header, compressed = 8, None, bytearray()
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: damaged {kind!r} chunk"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed += body
        position += 12 + length
    width, height, depth, colour_type, _compression, _filter, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    rows = np.frombuffer(zlib.decompress(compressed), np.uint8).reshape(height, 1 + width * channels)
    pixels = np.zeros((height, width * channels), np.uint8)
    prior = np.zeros(width * channels, np.uint8)
    for y in range(height):
        pixels[y] = prior = _unfilter(rows[y, 0], rows[y, 1:], prior, channels)
    return width, height, pixels.reshape(height, width, channels)


def _unfilter(kind, line, prior, channels):
    if kind == 0:  # None
        return line
    if kind == 1:  # Sub: each byte adds the one a pixel to its left, a running sum per channel
        return (np.cumsum(line.reshape(-1, channels), axis=0, dtype=np.uint64) % 256).astype(np.uint8).ravel()
    if kind == 2:  # Up
        return line + prior
    assert kind in (3, 4), f"unknown PNG filter {kind}"
    row, line, prior = bytearray(len(line)), line.tolist(), prior.tolist()
    for x, value in enumerate(line):
        left = row[x - channels] if x >= channels else 0
        up = prior[x]
        if kind == 3:  # Average
            predicted = (left + up) // 2
        else:  # Paeth
            corner = prior[x - channels] if x >= channels else 0
            estimate = left + up - corner
            near_left, near_up, near_corner = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            predicted = left if near_left <= near_up and near_left <= near_corner else up if near_up <= near_corner else corner
        row[x] = (value + predicted) & 0xFF
    return np.frombuffer(bytes(row), np.uint8)


def test_the_decoder_reads_every_filter_back(tmp_path):
    """read_png against pixels known here: a PNG of rows written with each of the five filters."""
    rng = np.random.default_rng(7)
    width, height, channels = 9, 10, 3
    pixels = rng.integers(0, 256, (height, width * channels), dtype=np.uint8)
    raw = bytearray()
    prior = np.zeros(width * channels, np.int64)
    for y, row in enumerate(pixels.astype(np.int64)):
        kind = y % 5
        left = np.concatenate([np.zeros(channels, np.int64), row[:-channels]])
        corner = np.concatenate([np.zeros(channels, np.int64), prior[:-channels]])
        if kind == 4:
            estimate = left + prior - corner
            near_left, near_up, near_corner = abs(estimate - left), abs(estimate - prior), abs(estimate - corner)
            predicted = np.where((near_left <= near_up) & (near_left <= near_corner), left, np.where(near_up <= near_corner, prior, corner))
        else:
            predicted = [np.zeros_like(row), left, prior, (left + prior) // 2][kind]
        raw += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()
        prior = row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = tmp_path / "filters.png"
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
    decoded_width, decoded_height, decoded = read_png(path)
    assert (decoded_width, decoded_height) == (width, height)
    assert (decoded.reshape(height, -1) == pixels).all()


@pytest.mark.live
@pytest.mark.browser
def test_make_screenshots_takes_the_readmes_four_pictures(tmp_path):
    script = _script()
    missing = list(script.prerequisites_missing())
    if missing:
        pytest.skip("; ".join(missing))

    result = subprocess.run(
        [sys.executable, "docs/screenshots.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    digests = set()
    for name in script.PICTURES:
        width, height, pixels = read_png(tmp_path / name)
        assert (width, height) == (script.WIDTH, script.HEIGHT), name
        colours = len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0))
        assert colours > 500, f"{name}: {colours} colours, a blank page"  # text is anti-aliased: thousands
        digests.add(hashlib.sha256(pixels.tobytes()).hexdigest())
    assert len(digests) == len(script.PICTURES)  # four different pages

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in script.PICTURES:
        assert f"(docs/img/{name})" in readme, name
        assert (ROOT / "docs" / "img" / name).is_file(), name
