#!/usr/bin/env python3
"""Build the class-balanced Fashion-MNIST sample bundled in data/fashion-mnist-sample/.

Reads the full dataset installed by the Debian package `dataset-fashion-mnist`
and keeps, per split, the first K images of each class in file order
(K = 500 for train, 100 for test). The output is gzip-compressed IDX with the
standard file names, written with mtime=0 so reruns give byte-identical files.

Usage: python3 scripts/make_fashion_mnist_sample.py [SOURCE_DIR] [OUT_DIR]
Python 3 standard library only.
"""

import gzip
import os
import struct
import sys

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "fashion-mnist-sample")

NUM_CLASSES = 10
PER_CLASS = {"train": 500, "t10k": 100}

UBYTE = 0x08


def read_idx_ubyte(path, expected_ndim):
    """Return (dims, payload bytes) of a gzipped unsigned-byte IDX file, validating its header."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != UBYTE or ndim != expected_ndim:
        sys.exit(f"{path}: expected ubyte IDX with {expected_ndim} dims, got header {raw[:4].hex()}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    payload = raw[4 + 4 * ndim :]
    expected_len = 1
    for d in dims:
        expected_len *= d
    if len(payload) != expected_len:
        sys.exit(f"{path}: dims {dims} need {expected_len} data bytes, file has {len(payload)}")
    return dims, payload


def write_idx_ubyte(path, dims, payload):
    header = struct.pack(">HBB", 0, UBYTE, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + payload, compresslevel=9, mtime=0))


def make_split(source_dir, out_dir, prefix, per_class):
    image_dims, images = read_idx_ubyte(os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"), 3)
    label_dims, labels = read_idx_ubyte(os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"), 1)
    count, height, width = image_dims
    if label_dims[0] != count:
        sys.exit(f"{prefix}: {count} images but {label_dims[0]} labels")

    # Walk the file in order and take each class until its quota is full.
    taken = [0] * NUM_CLASSES
    keep = []
    for i, label in enumerate(labels):
        if taken[label] < per_class:
            taken[label] += 1
            keep.append(i)
    if any(t < per_class for t in taken):
        sys.exit(f"{prefix}: not enough images per class for quota {per_class}: {taken}")

    pixels = height * width
    sub_images = b"".join(images[i * pixels : (i + 1) * pixels] for i in keep)
    sub_labels = bytes(labels[i] for i in keep)
    write_idx_ubyte(os.path.join(out_dir, f"{prefix}-images-idx3-ubyte.gz"), (len(keep), height, width), sub_images)
    write_idx_ubyte(os.path.join(out_dir, f"{prefix}-labels-idx1-ubyte.gz"), (len(keep),), sub_labels)
    print(f"{prefix}: kept {len(keep)} of {count} images ({per_class} per class)")


def main():
    source_dir = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SOURCE
    out_dir = os.path.normpath(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT)
    os.makedirs(out_dir, exist_ok=True)
    for prefix, per_class in PER_CLASS.items():
        make_split(source_dir, out_dir, prefix, per_class)


if __name__ == "__main__":
    main()
