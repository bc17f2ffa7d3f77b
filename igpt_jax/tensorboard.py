"""TensorBoard scalars and images written through the workdir's file layer, so they reach gs:// like everything else.

An event file is a sequence of TFRecords (length, masked CRC32C of the length, an `Event` protobuf, masked CRC32C of
it); the protobufs and the CRC come from tensorboardX, the framing is done here so the bytes can go through
`storage.AppendOnlyFile` instead of a writer that opens its own local files.

A run that resumes from step s starts its file with `SessionLog(START)` at step s + 1: TensorBoard then drops the
points at or after s + 1 that the interrupted run had written, so the curve shows each step once.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time

from etils import epath
from PIL import Image
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2, summary_pb2

from igpt_jax import storage


def _masked_crc(data: bytes) -> int:
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: the framing TensorBoard's reader checks."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class EventWriter:
    """Scalars into `directory/events.out.tfevents.<time>.<host>.<pid>`, one new file per run."""

    def __init__(self, directory: epath.Path, *, resumed_step: int = 0):
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self._file = storage.AppendOnlyFile(directory / name)
        self._write(event_pb2.Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
        if resumed_step > 0:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(event_pb2.Event(wall_time=time.time(), step=resumed_step + 1, session_log=start))

    def _write(self, event: event_pb2.Event) -> None:
        self._file.append(record(event.SerializeToString()))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        value = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        summary = summary_pb2.Summary(value=value)
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def images(self, step: int, pngs: dict[str, bytes]) -> None:
        """PNG images, each under its tag, at `step` (TensorBoard's Images tab)."""
        if not pngs:
            return
        value = []
        for tag, png in pngs.items():
            with Image.open(io.BytesIO(png)) as image:
                width, height = image.size
                channels = len(image.getbands())
            encoded = summary_pb2.Summary.Image(
                height=height, width=width, colorspace=channels, encoded_image_string=png
            )
            value.append(summary_pb2.Summary.Value(tag=tag, image=encoded))
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=value)))

    def flush(self, *, force: bool = False) -> None:
        self._file.flush(force=force)

    def close(self) -> None:
        self._file.close()
