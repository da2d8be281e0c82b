"""`python -m metaformer_lab.data.shards SRC DEST [--max-side N]`: an image folder into a shards folder, once.

Chunks of `--chunk-images` consecutive images (the folder's order) are the unit of work and of resuming: each is
written whole under a temporary name by one of `--processes` processes, read back, renamed, then marked done by its
record (`<tar>.json`, the offsets of its images). A re-run of the same command skips the chunks marked done; what a
chunk holds depends on nothing but the source and the options (tar headers carry no time), so an interrupted and
resumed conversion ends with the same files as an uninterrupted one, on any number of processes. At the end the
source folder is listed again and checked against what was written (every class, its image count, the file list);
then the split's index and positions are written and the manifest marked complete.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metaformer_lab.data.datamodules import usable_cpus
from metaformer_lab.data.imagefolder import SPLITS, UNREADABLE, check_layout
from metaformer_lab.data.index import ImageIndex, class_names, list_images, write_index
from metaformer_lab.data.shards.reader import (
    FORMAT,
    INDEX,
    MANIFEST,
    POSITIONS,
    VERSION,
    check_shards,
    chunk_file,
    listing_digest,
    read_manifest,
)
from metaformer_lab.record import write_json
from metaformer_lab.registry import ConfigError

CHUNK_IMAGES = 5000  # images per tar: about 0.5 GB of ImageNet's JPEGs (110 KB on average)
QUALITY = 90  # JPEG quality of the images --max-side re-encodes
RESAMPLE = "bicubic"  # the downscale of --max-side (Pillow's, antialiased)
KEY_DIGITS = 8  # member names: <index:08d>.<suffix>
# what makes two shards folders the same dataset: a re-run continues a DEST only where all of these are equal
IDENTITY = ("format", "version", "max_side", "quality", "resample", "chunk_images", "classes", "splits")


class Refused(Exception):
    """A conversion that must not start (the message is one line, for the user); exit status 2."""


class Failed(Exception):
    """A conversion that cannot finish as it stands (the message is one line, for the user); exit status 1."""


@dataclass(frozen=True)
class Source:
    """A split of the source folder as the conversion reads it."""

    split: str
    folder: Path  # SRC/<split>
    out: Path  # DEST/<split>
    index: ImageIndex

    def chunks(self, chunk_images: int) -> int:
        return -(-len(self.index) // chunk_images)


@dataclass(frozen=True)
class Settings:
    max_side: int | None
    quality: int | None
    chunk_images: int


@dataclass(frozen=True)
class ChunkDone:
    """What a worker reports of a chunk it wrote."""

    split: str
    chunk: int
    images: int
    bytes: int
    unreadable: int
    reencoded: int


def stored_bytes(path: Path, max_side: int | None, quality: int | None) -> tuple[bytes, str, bool, bool]:
    """(bytes to store, member suffix, readable, re-encoded) for one source file: its own bytes and suffix, unless
    `max_side` is set and its long side exceeds it (then a JPEG of the downscaled image). Decoded as training
    decodes (Pillow, to RGB): a file that fails is counted as unreadable and stored as it is."""
    data = path.read_bytes()
    suffix = path.suffix.lower().lstrip(".")
    try:
        with Image.open(io.BytesIO(data)) as file:
            image = file.convert("RGB")
    except UNREADABLE:
        return data, suffix, False, False
    if max_side is None or max(image.size) <= max_side:
        return data, suffix, True, False
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
    return out.getvalue(), "jpeg", True, True


_WORKER: dict[str, Any] = {}  # a conversion process's sources and settings (set by `_start_worker`)


def _start_worker(sources: dict[str, Source], settings: Settings) -> None:
    _WORKER.update(sources=sources, settings=settings)


def _start_pool_worker(sources: dict[str, Source], settings: Settings) -> None:
    """A pool process: Ctrl-C is the parent's to handle (it ends the pool), and the pool's SIGTERM ends it quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _start_worker(sources, settings)


def _key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def convert_chunk(task: tuple[str, int]) -> ChunkDone:
    """Write chunk `task` = (split, chunk) whole or not at all: its tar under a temporary name, read back (every
    member where expected), renamed, then its record `<tar>.json` (the offsets), which marks it done."""
    import webdataset  # here: only conversion processes need it

    split, chunk = task
    source: Source = _WORKER["sources"][split]
    settings: Settings = _WORKER["settings"]
    first = chunk * settings.chunk_images
    last = min(first + settings.chunk_images, len(source.index))
    name = chunk_file(split, chunk)
    temporary = source.out / f".{name}.{os.getpid()}.tmp"
    suffixes, per_class, unreadable, reencoded = [], Counter[int](), 0, 0
    try:
        with open(temporary, "wb") as out:
            with webdataset.TarWriter(out, encoder=False, mtime=0) as writer:  # mtime 0: the same bytes every time
                for index in range(first, last):
                    path = source.folder / source.index.relative_path(index)
                    data, suffix, readable, changed = stored_bytes(path, settings.max_side, settings.quality)
                    label = int(source.index.labels[index])
                    writer.write({"__key__": _key(index), suffix: data, "cls": str(label).encode()})
                    per_class[label] += 1
                    suffixes.append(suffix)
                    unreadable += not readable
                    reencoded += changed
            out.flush()
            os.fsync(out.fileno())  # on disk before its record says it is done
        positions = _member_positions(temporary, first, suffixes)
        os.replace(temporary, source.out / name)
    finally:
        temporary.unlink(missing_ok=True)
    size = (source.out / name).stat().st_size
    record = {"file": name, "first": first, "images": last - first, "bytes": size, "unreadable": unreadable,
              "reencoded": reencoded, "per_class": dict(sorted(per_class.items())), "positions": positions}  # fmt: skip
    write_json(source.out / f"{name}.json", record)
    return ChunkDone(split, chunk, last - first, size, unreadable, reencoded)


def _member_positions(tar: Path, first: int, suffixes: list[str]) -> list[list[int]]:
    """[offset, size] of each image's member in the tar just written, read back from its headers; an error unless it
    holds exactly the members written, in order."""
    expected = {f"{_key(first + k)}.{suffix}": k for k, suffix in enumerate(suffixes)}
    labels = {f"{_key(first + k)}.cls" for k in range(len(suffixes))}
    positions: list[list[int] | None] = [None] * len(suffixes)
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.name in expected:
                positions[expected.pop(member.name)] = [member.offset_data, member.size]
            elif member.name in labels:
                labels.discard(member.name)
            else:
                raise Failed(f"{tar}: unexpected member {member.name}")
    if expected or labels:
        raise Failed(f"{tar}: {len(expected) + len(labels)} members missing")
    return positions  # type: ignore[return-value]  # every one set: none missing


def _identity(classes: list[str], sources: dict[str, Source], settings: Settings) -> dict[str, Any]:
    splits = {
        split: {"images": len(source.index), "per_class": np.bincount(source.index.labels, minlength=len(classes))
                .tolist(), "listing_sha256": listing_digest(source.index)}
        for split, source in sources.items()
    }  # fmt: skip
    return {
        "format": FORMAT, "version": VERSION, "max_side": settings.max_side, "quality": settings.quality,
        "resample": RESAMPLE if settings.max_side is not None else None, "chunk_images": settings.chunk_images,
        "classes": classes, "splits": splits,
    }  # fmt: skip


def _differences(there: dict[str, Any], here: dict[str, Any]) -> str:
    """What makes DEST's dataset (`there`) another than the one asked for (`here`), in words."""
    found = []
    for key in ("version", "max_side", "quality", "chunk_images"):
        if there.get(key) != here[key]:
            mine, theirs = ("none" if value is None else value for value in (here[key], there.get(key)))
            found.append(f"{key.replace('_', ' ')} {theirs} there, {mine} here")
    if there.get("classes") != here["classes"]:
        found.append(f"{len(there.get('classes') or [])} classes there, {len(here['classes'])} here"
                     if len(there.get("classes") or []) != len(here["classes"]) else "other class names")  # fmt: skip
    for split, mine in here["splits"].items():
        theirs = (there.get("splits") or {}).get(split, {})
        if theirs.get("images") != mine["images"]:
            found.append(f"{split}: {theirs.get('images')} images there, {mine['images']} here")
        elif theirs.get("per_class") != mine["per_class"]:
            found.append(f"{split}: other image counts per class")
        elif theirs.get("listing_sha256") != mine["listing_sha256"]:
            found.append(f"{split}: other file names")
    return "; ".join(found) or "another manifest"


def prepare_dest(dest: Path, identity: dict[str, Any], source: Path) -> dict[str, Any]:
    """DEST's manifest, written now for a new conversion or read for one to continue; `Refused` for a DEST that
    holds another dataset, or something else than a shards folder."""
    if dest.exists() and not dest.is_dir():
        raise Refused(f"DEST {dest} is a file, not a folder")
    existing = read_manifest(dest) if dest.is_dir() else None
    if existing is None:
        if dest.is_dir() and any(dest.iterdir()):
            raise Refused(f"DEST {dest} is not empty and holds no shards manifest ({MANIFEST}): convert into a new "
                          "or empty folder")  # fmt: skip
        manifest = {**identity, "source": str(source), "complete": False}
        write_json(dest / MANIFEST, manifest)
        return manifest
    there = {key: existing.get(key) for key in IDENTITY}
    if there != identity:
        raise Refused(f"DEST {dest} holds another conversion ({_differences(there, identity)}): convert into a new "
                      "or empty folder, or give the SRC and options it was made with to continue it")  # fmt: skip
    return existing


def _done_chunks(source: Source, settings: Settings) -> set[int]:
    """The chunks of a split already written (tar and record in place); left-over temporary files removed."""
    source.out.mkdir(parents=True, exist_ok=True)
    for stale in source.out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    done = set()
    for chunk in range(source.chunks(settings.chunk_images)):
        name = chunk_file(source.split, chunk)
        try:
            record = json.loads((source.out / f"{name}.json").read_text())
            if (source.out / name).stat().st_size == record["bytes"]:
                done.add(chunk)
        except (OSError, ValueError, KeyError):
            continue
    return done


def _run_chunks(
    tasks: list[tuple[str, int]], sources: dict[str, Source], settings: Settings, processes: int,
) -> Iterator[ChunkDone]:  # fmt: skip
    """Each chunk of `tasks` written, in `processes` processes (1: in this one); what each chunk is does not depend
    on which process writes it."""
    if processes <= 1 or len(tasks) <= 1:
        _start_worker(sources, settings)
        yield from map(convert_chunk, tasks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(min(processes, len(tasks)), _start_pool_worker, (sources, settings)) as pool:
        yield from pool.imap_unordered(convert_chunk, tasks)


def _finish(dest: Path, manifest: dict[str, Any], sources: dict[str, Source], settings: Settings) -> dict[str, Any]:
    """Check the written chunks against the source folder listed again, then write each split's index and positions
    and mark the manifest complete; the chunk records go."""
    classes = manifest["classes"]
    chunks: dict[str, list[dict[str, Any]]] = {}
    unreadable: dict[str, int] = {}
    reencoded: dict[str, int] = {}
    for split, source in sources.items():
        relisted = list_images(source.folder, class_names(source.folder))
        if listing_digest(relisted) != manifest["splits"][split]["listing_sha256"]:
            raise Failed(f"SRC {source.folder} changed during the conversion ({len(relisted):,} images now, "
                         f"{len(source.index):,} when it began): convert again into a new folder")  # fmt: skip
        records = [json.loads((source.out / f"{chunk_file(split, c)}.json").read_text())
                   for c in range(source.chunks(settings.chunk_images))]  # fmt: skip
        positions = np.concatenate([np.array(r["positions"], np.int64).reshape(-1, 2) for r in records])
        stored = [0] * len(classes)  # images per class as the chunks wrote their labels
        for record in records:
            for label, count in record["per_class"].items():
                stored[int(label)] += count
        per_class = np.bincount(relisted.labels, minlength=len(classes)).tolist()
        if len(positions) != len(relisted) or stored != per_class:
            raise Failed(f"{split}: {len(positions):,} images stored, {len(relisted):,} in SRC")
        np.save(source.out / POSITIONS, positions)
        write_index(source.out / INDEX, bytes.fromhex(manifest["splits"][split]["listing_sha256"]), source.index)
        chunks[split] = [{"file": r["file"], "images": r["images"], "bytes": r["bytes"]} for r in records]
        unreadable[split] = sum(r["unreadable"] for r in records)
        reencoded[split] = sum(r["reencoded"] for r in records)
    complete = {**manifest, "chunks": chunks, "unreadable": unreadable, "reencoded": reencoded, "complete": True,
                "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    write_json(dest / MANIFEST, complete)
    for source in sources.values():
        for record in source.out.glob(f"{source.split}-*.tar.json"):
            record.unlink()
    return complete


def convert(src: Path, dest: Path, settings: Settings, processes: int) -> dict[str, Any]:
    """Convert the image folder `src` into the shards folder `dest` (resumable: a re-run continues), printing a line
    per chunk; the complete manifest. `Refused` where it must not start."""
    try:
        check_layout(src)
    except ConfigError as error:
        raise Refused(f"SRC {src}: {error.expected}") from None
    classes = class_names(src / "train")
    sources = {split: Source(split, src / split, dest / split, list_images(src / split, classes)) for split in SPLITS}
    for source in sources.values():
        if not len(source.index):
            raise Refused(f"SRC {source.folder} has class folders but no images")
    manifest = prepare_dest(dest, _identity(classes, sources, settings), src.resolve())
    if manifest.get("complete"):
        try:
            check_shards(dest)
        except ConfigError as error:
            raise Failed(f"DEST {dest} is complete but damaged: {error.expected}") from None
        print(f"{dest}: already complete ({_summary(manifest)}); nothing to do", flush=True)
        return manifest
    done = {split: _done_chunks(source, settings) for split, source in sources.items()}
    tasks = [(split, chunk) for split, source in sources.items()
             for chunk in range(source.chunks(settings.chunk_images)) if chunk not in done[split]]  # fmt: skip
    total_chunks = sum(source.chunks(settings.chunk_images) for source in sources.values())
    total_images = sum(len(source.index) for source in sources.values())
    finished = total_chunks - len(tasks)
    images = sum(min(settings.chunk_images, len(sources[split].index) - chunk * settings.chunk_images)
                 for split in sources for chunk in done[split])  # fmt: skip
    what = f"max side {settings.max_side}, JPEG quality {settings.quality}" if settings.max_side else "bytes unchanged"
    print(f"{src} -> {dest}: {total_images:,} images in {total_chunks} chunks of {settings.chunk_images:,} ({what})"
          + (f"; continuing: {finished} chunks already done" if finished else ""), flush=True)  # fmt: skip
    start, converted = time.monotonic(), 0
    for result in _run_chunks(tasks, sources, settings, processes):
        finished, images, converted = finished + 1, images + result.images, converted + result.images
        rate = converted / max(time.monotonic() - start, 1e-9)
        left = (total_images - images) / rate if rate else 0
        done_pct = 100 * images / total_images
        print(f"{chunk_file(result.split, result.chunk)}: {result.images:,} image{'s' * (result.images > 1)}, "
              f"{result.bytes / 2**20:,.1f} MiB"
              + (f", {result.unreadable} unreadable" if result.unreadable else "")
              + f" | {finished}/{total_chunks} chunks, {images:,}/{total_images:,} images ({done_pct:.1f}%), "
              f"{rate:,.0f} images/s, about {left / 60:.0f} min left", flush=True)  # fmt: skip
    manifest = _finish(dest, manifest, sources, settings)
    print(f"{dest}: complete ({_summary(manifest)}); every class and its image count match {src}", flush=True)
    print(f"train with: python run.py data=shards data.root={dest}", flush=True)
    return manifest


def _summary(manifest: dict[str, Any]) -> str:
    """"10 classes; train 31 images in 4 chunks (1.2 MiB), 1 fails to decode; val ..." of a complete manifest."""
    parts = [f"{len(manifest['classes'])} classes"]
    for split in SPLITS:
        chunks = manifest["chunks"][split]
        size = sum(chunk["bytes"] for chunk in chunks)
        bad = manifest["unreadable"][split]
        parts.append(f"{split} {manifest['splits'][split]['images']:,} images in {len(chunks)} chunk"
                     f"{'s' * (len(chunks) > 1)} ({size / 2**20:,.1f} MiB), {bad} fail"
                     f"{'s' * (bad == 1)} to decode")  # fmt: skip
    if manifest.get("max_side"):
        reencoded = sum(manifest.get("reencoded", {}).values())
        parts.append(f"{reencoded:,} re-encoded to max side {manifest['max_side']}")
    return "; ".join(parts)


def _positive(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: at least {minimum}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metaformer_lab.data.shards",
        description="Convert an image folder in the ImageNet layout (SRC/train/<class>/<image>, SRC/val/<class>/"
        "<image>) into a shards folder for `python run.py data=shards data.root=DEST`: a few hundred large tar files "
        "(webdataset's format) instead of one file per image, for shared file systems. Both splits; each file's "
        "bytes stored unchanged unless --max-side. Resumable: interrupted (Ctrl-C, a kill), the same command "
        "continues without redoing finished chunks. Refuses (exit 2) a DEST that holds another conversion or "
        "anything else.",
        epilog="examples:\n"
        "  python -m metaformer_lab.data.shards /data/imagenet /scratch/imagenet_shards\n"
        "  python -m metaformer_lab.data.shards /data/imagenet /scratch/imagenet_256 --max-side 256\n"
        "  python run.py data=shards data.root=/scratch/imagenet_shards data.num_classes=1000\n"
        "What DEST holds, and why webdataset: metaformer_lab/data/shards/__init__.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("src", type=Path, metavar="SRC", help="the image folder (with train/ and val/)")
    parser.add_argument("dest", type=Path, metavar="DEST", help="the shards folder to write (new or empty, or the "
                        "one an interrupted conversion of SRC left)")  # fmt: skip
    parser.add_argument("--max-side", type=_positive(16), metavar="N", help="re-encode images whose long side "
                        f"exceeds N: {RESAMPLE} downscale to N, then JPEG (--quality): smaller and faster to decode, "
                        "not the source's pixels (recorded in the manifest and in every run's protocol); default: "
                        "every file's bytes as they are")  # fmt: skip
    parser.add_argument("--quality", type=_positive(1), metavar="Q", help=f"JPEG quality of images --max-side "
                        f"re-encodes (1-95; default {QUALITY})")  # fmt: skip
    parser.add_argument("--chunk-images", type=_positive(1), default=CHUNK_IMAGES, metavar="N", help="images per "
                        f"tar (default {CHUNK_IMAGES}: about 0.5 GB of ImageNet's JPEGs); the unit of "
                        "resuming")  # fmt: skip
    parser.add_argument("--processes", type=_positive(1), default=None, metavar="P", help="conversion processes "
                        "(default: one per CPU this process may use); the result does not depend on it")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quality is not None and args.max_side is None:
        parser.error("--quality applies to the images --max-side re-encodes: give --max-side too")
    if args.quality is not None and args.quality > 95:
        parser.error(f"--quality {args.quality}: at most 95 (Pillow's advice: higher only grows the files)")
    quality = (args.quality or QUALITY) if args.max_side is not None else None
    settings = Settings(args.max_side, quality, args.chunk_images)
    stop = signal.signal(signal.SIGTERM, _interrupt)  # `kill`: as Ctrl-C, the pool ended with this process
    try:
        convert(args.src, args.dest, settings, args.processes or usable_cpus())
    except Refused as refused:
        print(f"{parser.prog}: {refused}", file=sys.stderr, flush=True)
        return 2
    except (Failed, OSError) as failure:
        print(f"{parser.prog}: {failure}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; run the same command again to continue where it stopped", file=sys.stderr,
              flush=True)  # fmt: skip
        return 130
    finally:
        signal.signal(signal.SIGTERM, stop)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
