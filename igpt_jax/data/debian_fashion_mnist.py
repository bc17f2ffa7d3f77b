"""Feeds TFDS's real `fashion_mnist` builder offline from Debian's `dataset-fashion-mnist` package.

Debian ships Zalando's original .gz files with only the gzip header rewritten (strip-nondeterminism drops the file
name and zeroes the time); the compressed stream is untouched. Putting the name and the original modification time
back gives files byte-identical to upstream, so TFDS accepts them from manual_dir with its registered sha256 checks
on. Those checksums are read from the installed TFDS builder, never assumed here.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from igpt_jax.workdir import storage

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# Modification times of the upstream files (2017-08-31), from their gzip headers.
UPSTREAM_MTIME = {"train": 1504176606, "t10k": 1504176627}


def upstream_bytes(debian_file: Path) -> bytes:
    """The upstream .gz: Debian's file with FNAME and MTIME restored in the gzip header."""
    data = debian_file.read_bytes()
    if data[:3] != b"\x1f\x8b\x08":
        raise ValueError(f"{debian_file}: not a gzip file")
    if data[3] & 0x08:  # already carries a file name: leave it alone
        return data
    name = debian_file.name.removesuffix(".gz").encode()
    mtime = UPSTREAM_MTIME[debian_file.name.split("-")[0]]
    return b"\x1f\x8b\x08" + bytes([data[3] | 0x08]) + struct.pack("<I", mtime) + data[8:10] + name + b"\0" + data[10:]


def ensure_manual_files(manual_dir: str | os.PathLike, url_infos: dict, debian_dir: Path = DEBIAN_DIR) -> None:
    """Writes each file TFDS expects into manual_dir (local or gs://, whole) unless present; checks every sha256."""
    manual_dir = storage.path(manual_dir)
    for info in url_infos.values():
        target = manual_dir / info.filename
        if target.exists():
            continue
        source = debian_dir / info.filename
        if not source.exists():
            raise FileNotFoundError(
                f"{source} not found: install Debian's dataset-fashion-mnist (bash launch/setup_local.sh does), "
                f"or put the upstream {info.filename} in {manual_dir}"
            )
        data = upstream_bytes(source)
        if hashlib.sha256(data).hexdigest() != info.checksum:
            raise ValueError(f"{source}: rebuilt file does not match TFDS's registered sha256 {info.checksum}")
        storage.write_bytes(target, data)
