"""`python -m igpt_jax.data.prepare`: a folder of images becomes a TFDS data set, read by index like the registry's.

    python -m igpt_jax.data.prepare --images=DIR --name=NAME --data_dir=DD [--labels=folders] [--heldout_fraction=F]

DIR holds JPEG, PNG or WebP files of any size, at any depth; with --labels=folders each file's class is the first
folder under DIR (DIR/cat/a.jpg is a 'cat'). The data set is written by TFDS's own ad hoc builder
(`tfds.dataset_builders.store_as_tfds_dataset`) as ArrayRecord, so `--config.data.dataset=NAME
--config.data.data_dir=DD` reads it through the same TFDS source as ImageNet, and `tfds.data_source(NAME,
data_dir=DD)` opens it anywhere. Splits: `train`, and with --heldout_fraction a `heldout` split of that share of the
files (a seeded draw, so the same folder gives the same split on every run).

What makes it safe to rerun: TFDS writes into an `incomplete.*` folder and renames it when done, so a killed
preparation leaves nothing that looks finished; the next run removes such leftovers and prepares again. A data set
already prepared under the name is left as it is. A gs:// data_dir is written locally first and copied up, the
files that make it a data set (features.json, dataset_info.json) last: ArrayRecord's writer opens local files only.

Files that cannot be decoded are named and skipped (counted at the end), or refused with --strict. JPEG and PNG files
already in RGB are stored byte for byte (decoding them later keeps libjpeg's fast path); others are stored as PNG
in RGB. Preparing needs TensorFlow (the `data` extra), which TFDS's writer imports; reading does not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from igpt_jax import errors
from igpt_jax.workdir import storage

log = logging.getLogger(__name__)

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VERSION = "1.0.0"
LABELS = ("folders", "none")
TRAIN, HELDOUT = "train", "heldout"
NAME = re.compile(r"[a-z][a-z0-9_]*")  # what TFDS reads back by name (naming.py); no capitals, which it snake-cases
HELDOUT_SEED = 0
# the files that make a version folder a data set to TFDS's readers: copied to a remote data_dir after the rest
MARKERS = ("features.json", "dataset_info.json")


class PrepareError(errors.UsageError, ValueError):
    """A bad flag, folder or file: one line naming it, exit 2."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a folder becomes: its files (relative to the folder, sorted), their classes and their splits."""

    root: str
    files: tuple[str, ...]
    class_names: tuple[str, ...]  # empty: no labels
    splits: dict[str, tuple[str, ...]]

    def label(self, file: str) -> int:
        return self.class_names.index(file.split("/")[0])


def image_files(images: str) -> list[str]:
    """The image files under `images` (local or gs://), relative to it, in sorted order."""
    root = storage.path(images)
    if not root.is_dir():
        raise PrepareError(f"--images={images}: no such folder")
    found = sorted(path.relative_to(root).as_posix() for path in _walk(root) if path.suffix.lower() in SUFFIXES)
    if not found:
        raise PrepareError(f"--images={images}: no {'/'.join(s[1:] for s in SUFFIXES)} files in it or below it")
    return found


def _walk(folder: storage.Path) -> Iterator[storage.Path]:
    """Every file below `folder` (epath has no recursive glob on gs://: one listing a folder)."""
    for path in folder.iterdir():
        yield from _walk(path) if path.is_dir() else (path,)


def plan(images: str, labels: str = "none", heldout_fraction: float = 0.0) -> Plan:
    """The data set `images` gives, before any file is opened."""
    if labels not in LABELS:
        raise PrepareError(f"--labels={labels!r}: allowed {list(LABELS)}")
    if not 0 <= heldout_fraction < 1:
        raise PrepareError(f"--heldout_fraction={heldout_fraction}: a share of the files, in [0, 1)")
    files = image_files(images)
    class_names: tuple[str, ...] = ()
    if labels == "folders":
        loose = [f for f in files if "/" not in f]
        if loose:
            raise PrepareError(
                f"--labels=folders: {len(loose)} files are not in a class folder under --images={images} "
                f"(first: {loose[0]}); move them into one, or prepare with --labels=none"
            )
        class_names = tuple(sorted({f.split("/")[0] for f in files}))
    held = round(len(files) * heldout_fraction)
    if heldout_fraction and not 0 < held < len(files):
        raise PrepareError(f"--heldout_fraction={heldout_fraction} of {len(files)} files leaves a split empty")
    drawn = set(np.random.default_rng(HELDOUT_SEED).permutation(len(files))[:held].tolist())
    splits = {TRAIN: tuple(f for i, f in enumerate(files) if i not in drawn)}
    if held:
        splits[HELDOUT] = tuple(f for i, f in enumerate(files) if i in drawn)
    return Plan(str(images), tuple(files), class_names, splits)


def encoded(data: bytes) -> bytes:
    """The bytes to store for one file: the file itself when it is RGB JPEG or PNG, else the image as RGB PNG.
    Decodes the whole image, so a truncated or corrupt file raises here (OSError or PIL's errors)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format in ("JPEG", "PNG") and image.mode == "RGB":
            return data
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return out.getvalue()


@dataclasses.dataclass
class Skipped:
    """The files that could not be decoded, with why (filled while TFDS consumes the examples)."""

    files: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def examples(p: Plan, split: str, skipped: Skipped, strict: bool) -> Iterator[tuple[str, dict]]:
    """(key, example) for each file of `split`, for TFDS's writer: keyed by relative path, which TFDS hashes into
    the records' order (the same files give the same order, however the folder lists them)."""
    root = storage.path(p.root)
    for file in tqdm(p.splits[split], desc=f"prepare: {split} images", unit=" images"):
        data = (root / file).read_bytes()  # a storage error stops the preparation; only decoding is forgiven
        try:
            image = encoded(data)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file; each is named and counted
            why = f"{type(e).__name__}: {e}"
            if strict:
                raise PrepareError(f"{p.root}/{file} cannot be decoded ({why}); without --strict it is skipped") from e
            log.warning("prepare: skipping %s/%s, which cannot be decoded (%s)", p.root, file, why)
            skipped.files.append((file, why))
            continue
        example = {"image": image, "file_name": file}
        if p.class_names:
            example["label"] = p.label(file)
        yield file, example


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise PrepareError(f"--name={name!r}: lower-case letters, digits and _, starting with a letter (TFDS's rule)")
    import tensorflow_datasets as tfds

    if name in tfds.list_builders(with_community_datasets=False):  # the community list is fetched online
        raise PrepareError(f"--name={name!r} is a TFDS data set's name, which TFDS would read with its own code")


def prepared(data_dir: str, name: str) -> bool:
    """Whether `name` is a data set in `data_dir`: its version folder holds the files TFDS's readers look for."""
    folder = storage.path(data_dir) / name / VERSION
    return all((folder / marker).exists() for marker in MARKERS)


def _remove_leftovers(data_dir: str, name: str) -> None:
    """The `incomplete.*` folders of a preparation that was killed (TFDS leaves them; its readers ignore them)."""
    folder = storage.path(data_dir) / name
    for leftover in folder.glob(f"incomplete.*_{VERSION}") if folder.exists() else ():
        log.info("prepare: removing %s, left by a preparation that did not finish", leftover)
        leftover.rmtree()


def _copy_up(local: str, data_dir: str, name: str) -> None:
    """The local version folder to the remote data_dir, the marker files last."""
    source = storage.path(local) / name / VERSION
    target = storage.path(data_dir) / name / VERSION
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(f for f in source.iterdir() if f.name not in MARKERS)
    for file in [*files, *(source / marker for marker in MARKERS)]:
        storage.write_bytes(target / file.name, file.read_bytes())


def prepare(p: Plan, name: str, data_dir: str, strict: bool = False) -> Skipped:
    """Writes the data set `p` describes as `name` in `data_dir`; returns what was skipped."""
    import tensorflow_datasets as tfds

    features = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format=None)}
    features["file_name"] = tfds.features.Text()
    if p.class_names:
        features["label"] = tfds.features.ClassLabel(names=list(p.class_names))
    skipped = Skipped()
    remote = storage.is_remote(data_dir)
    with tempfile.TemporaryDirectory(prefix="igpt_prepare_") if remote else contextlib.nullcontext() as staging:
        write_to = staging or data_dir
        _remove_leftovers(write_to, name)
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name,
            version=VERSION,
            features=tfds.features.FeaturesDict(features),
            split_datasets={split: examples(p, split, skipped, strict) for split in p.splits},
            data_dir=write_to,
            description=f"Prepared by igpt_jax.data.prepare from {p.root}.",
            file_format="array_record",
        )
        if remote:
            _copy_up(staging, data_dir, name)
    return skipped


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m igpt_jax.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="the folder of images (local or gs://)")
    parser.add_argument("--name", required=True, help="the data set's name: --config.data.dataset=NAME")
    parser.add_argument("--data_dir", required=True, help="where TFDS data sets live: --config.data.data_dir=DD")
    parser.add_argument("--labels", default="none", choices=LABELS, help="folders: the first folder is the class")
    parser.add_argument("--heldout_fraction", type=float, default=0.0, help="this share of files in a heldout split")
    parser.add_argument("--strict", action="store_true", help="refuse a file that cannot be decoded (default: skip)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        check_name(args.name)
        if prepared(args.data_dir, args.name):
            print(f"prepare: {args.name} is already prepared in {args.data_dir}; left as it is")
            return 0
        p = plan(args.images, args.labels, args.heldout_fraction)
        skipped = prepare(p, args.name, args.data_dir, args.strict)
    except errors.IgptError as e:  # PrepareError, and the storage layer's
        print(f"prepare: {e.line()}", file=sys.stderr)
        return e.exit_code
    for file, why in skipped.files:
        print(f"prepare: skipped {args.images}/{file} ({why})", file=sys.stderr)
    kept = {split: len(files) - sum(f in files for f, _ in skipped.files) for split, files in p.splits.items()}
    counts = ", ".join(f"{split} {n}" for split, n in kept.items())
    classes = f", {len(p.class_names)} classes" if p.class_names else ", no labels"
    print(f"prepare: {args.name} in {args.data_dir}: {counts} images{classes}; {len(skipped.files)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
