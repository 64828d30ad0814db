"""The handwritten digits shipped with the package: a small real data set for the demo.

`files/digits.csv.gz` is the UCI "Optical Recognition of Handwritten Digits" test set
(1,797 images of 8 × 8 pixel counts 0–16, CC BY 4.0; see `files/README.md` for the source
and attribution). It is read with the standard library only, after checking its SHA-256, so
a damaged or replaced file is refused rather than silently used.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DIGITS_PATH", "DIGITS_SHA256", "load_digits"]

DIGITS_PATH = Path(__file__).parent / "files" / "digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
_SIDE = 8
_MAX_COUNT = 16


def load_digits(path: str | Path = DIGITS_PATH) -> tuple[Tensor, Tensor]:
    """The digits as (images [1797, 8, 8] uint8 in 0..16, labels [1797] int64 in 0..9).

    Raises:
        ValueError: the file's digest is not the shipped file's, or a row is malformed
            (message names the file and the line).
    """
    path = Path(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DIGITS_SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest} is not the shipped digits file's {DIGITS_SHA256}; "
            "reinstall the package to restore it"
        )
    rows: list[list[int]] = []
    for line_no, line in enumerate(gzip.decompress(raw).decode("ascii").splitlines(), start=1):
        values = [int(v) for v in line.split(",")]
        if len(values) != _SIDE * _SIDE + 1:
            raise ValueError(
                f"{path}: line {line_no} has {len(values)} values, expected {_SIDE * _SIDE + 1}"
            )
        rows.append(values)
    table = torch.tensor(rows, dtype=torch.int64)  # [N, 65]
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > _MAX_COUNT or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel counts must lie in 0..{_MAX_COUNT} and labels in 0..9")
    return pixels.reshape(-1, _SIDE, _SIDE).to(torch.uint8), labels
