"""TensorBoard event files, written by tensorboardX into a local or a gs:// workdir.

tensorboardX's SummaryWriter writes the events: scalars, images and text, and on resume its `purge_step`, whose
SessionLog(START) makes TensorBoard drop the points an interrupted run wrote after the step it resumes from, so the
curve shows each step once. Local folders it writes itself; for gs:// its writer registry is handed the storage
layer's AppendOnlyFile, so an object store gets the same spaced uploads as metrics.jsonl, and the upload before each
checkpoint save (`flush(force=True)`).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
from etils import epath
from PIL import Image
from tensorboardX import SummaryWriter, record_writer

from igpt_jax.workdir import storage


class _StoreFile:
    """An event file as tensorboardX's record writer sees it (write, flush, close), kept by the storage layer.
    tensorboardX writes and flushes from its writer thread; the run forces an upload from its own, hence the lock."""

    def __init__(self, path: str, opened: dict[str, _StoreFile]):
        self.path, self._opened = path, opened
        self._file = storage.AppendOnlyFile(storage.path(path))
        self._lock = threading.Lock()
        opened[path] = self

    def write(self, data: bytes) -> None:
        with self._lock:
            self._file.append(data)

    def flush(self, *, force: bool = False) -> None:
        with self._lock:
            self._file.flush(force=force)

    def close(self) -> None:
        with self._lock:
            self._opened.pop(self.path, None)
            self._file.close()


class _StoreFiles:
    """tensorboardX's writer factory for gs:// (its registry's interface: open, directory_check), remembering the
    files open in each folder so a run can force their upload."""

    def __init__(self):
        self.opened: dict[str, _StoreFile] = {}

    def open(self, path: str) -> _StoreFile:
        return _StoreFile(path, self.opened)

    def directory_check(self, path: str) -> None:
        storage.path(path).mkdir(parents=True, exist_ok=True)

    def in_folder(self, folder: str) -> list[_StoreFile]:
        return [f for path, f in list(self.opened.items()) if path.rsplit("/", 1)[0] == folder.rstrip("/")]


STORE_FILES = _StoreFiles()
record_writer.register_writer_factory("gs", STORE_FILES)


class EventWriter:
    """One run's events in `directory`, in a new file per writer: tensorboardX's events.out.tfevents.<s>.<host> and
    the time in nanoseconds after it, since tensorboardX opens its file for writing ("wb") and a second writer in the
    same second (a mode's row after training) would otherwise empty the first one's file. TensorBoard reads the files
    in name order, so a relaunch's purge comes after what it purges."""

    def __init__(self, directory: epath.Path, *, resumed_step: int = 0):
        self._folder = str(directory)
        self._writer = SummaryWriter(
            self._folder,
            # a writer that resumed nothing purges nothing: a mode's single row must leave the training curve whole
            purge_step=resumed_step + 1 if resumed_step > 0 else None,
            filename_suffix=f".{time.time_ns()}",
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def images(self, step: int, pngs: dict[str, bytes]) -> None:
        """PNG images, each under its tag, at `step` (TensorBoard's Images tab)."""
        for tag, png in pngs.items():
            with Image.open(io.BytesIO(png)) as image:
                pixels = np.asarray(image)
            self._writer.add_image(tag, pixels, step, dataformats="HW" if pixels.ndim == 2 else "HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        """Markdown under `tag` (TensorBoard's Text tab)."""
        self._writer.add_text(tag, text, step)

    def flush(self, *, force: bool = False) -> None:
        """Every event so far handed to its file; with `force`, a gs:// file uploaded now rather than at its next
        spaced upload."""
        self._writer.flush()
        if force:
            for file in STORE_FILES.in_folder(self._folder):
                file.flush(force=True)

    def close(self) -> None:
        self._writer.close()
