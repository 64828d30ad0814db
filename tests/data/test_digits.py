"""The shipped handwritten digits: the real packaged file, its digest, shape and content."""

from __future__ import annotations

import gzip
import hashlib

import pytest
import torch

from pipeline.data.digits import DIGITS_PATH, DIGITS_SHA256, load_digits


def test_the_shipped_file_is_the_uci_test_set():
    assert hashlib.sha256(DIGITS_PATH.read_bytes()).hexdigest() == DIGITS_SHA256
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    # The UCI test set's class sizes (digits 0..9).
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert int(images.max()) == 16 and int(images.min()) == 0
    # The first row of the file: a zero.
    first = [
        int(v)
        for v in gzip.decompress(DIGITS_PATH.read_bytes()).decode().splitlines()[0].split(",")
    ]
    assert images[0].flatten().tolist() == first[:64] and int(labels[0]) == first[64] == 0


def test_a_changed_file_is_refused(tmp_path):
    raw = bytearray(DIGITS_PATH.read_bytes())
    raw[-10] ^= 1
    bad = tmp_path / "digits.csv.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is not the shipped digits file's"):
        load_digits(bad)
