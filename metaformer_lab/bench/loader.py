"""`python -m metaformer_lab.bench loader`: can this machine's CPUs keep a GPU fed, on either augmentation path?

    python -m metaformer_lab.bench loader [--root FOLDER] [--images 100] [--image-size 224] [--json FILE]

`loader` times, in this one process with one torch thread (as a loader worker runs), on the same images of
`<root>/train` (an image folder, or a shards folder from `python -m metaformer_lab.data.shards`): decoding alone
(`Image.open` + `convert("RGB")`, what every pipeline pays), the loader's work per training image on each path of
`data.augment_on` (`loader`: decode, random resized crop, flip, RandAugment, uint8 tensor; `device`: decode, draw
the crop box and flip, cut the box out, uint8 tensor) and the eval transform (bicubic resize, center crop). After a
warm-up round they run in turn, a pass each, round after round, for about `--seconds` each (interleaved, so that a
busy machine's slow spells slow all of them alike); the median pass gives images/s per process. Files are read from
the page cache after the warm-up: this measures CPU cost, not storage. Then the device path's own work, a batch of
`--batch` crops resized and RandAugmented on `--device` (all of its threads on a CPU; CUDA synchronised once per
batch); how the ragged crops travel from loader processes (one flat buffer, as the runs use, or a list of
tensors); where the loader path's time goes (its stages timed one by one, each RandAugment op on its own); how
often JPEG draft mode could apply; and the loader processes one GPU needs on each path. Without `--root` it writes
ImageNet-like JPEGs (about 500x375, quality 90) to a temporary folder; they are smoother than photos, so they
decode faster than real ImageNet files: pass `--root` to measure on yours.

    python -m metaformer_lab.bench index-memory [--entries 1281000] [--workers 4] [--json FILE]

`index-memory` measures what the index of a split costs each loader process: on `--entries` generated ImageNet-like
paths (no images), `--workers` processes forked as a DataLoader's make every image's path, and each reports the
memory it added (private pages, PSS, RSS), for the index as it was (a list of (Path, label) pairs) and as arrays
(data/index.py), in memory and mapped from the cache file.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import io
import itertools
import math
import multiprocessing
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, features
from torch.utils.data import DataLoader, Dataset

from metaformer_lab.bench.timing import rate, time_rounds
from metaformer_lab.data.datamodules import CropBatch, CropSample, image_tensor, usable_cpus
from metaformer_lab.data.device_augment import rand_augment_batch, resize_crops
from metaformer_lab.data.imagefolder import (
    UNREADABLE,
    ImageDataset,
    ImageFolderDataset,
    check_layout,
    eval_resize_size,
    random_resized_crop,
)
from metaformer_lab.data.index import ImageIndex, read_index, write_index
from metaformer_lab.data.jpeg_folder import write_jpeg_folder
from metaformer_lab.data.randaugment import EXAMPLE, RandAugment
from metaformer_lab.data.shapes import CLASS_NAMES
from metaformer_lab.data.shards import is_shards, open_split
from metaformer_lab.registry import ConfigError

TARGET_RATIO = 1.3  # the bound on the device path's loader work per image / decode alone (issue 22)
DEFAULT_TRAIN_THROUGHPUT = 2500.0  # img/s of one GPU: an assumption, to be replaced by a measured one
# the steps of the training transform, in `ImageFolderDataset.__getitem__`'s order
STAGES = ("read the file", "open (header)", "decode", "convert to RGB (if not)", "random resized crop", "flip",
          "RandAugment", "to tensor")  # fmt: skip


@dataclass(frozen=True)
class LoaderPlan:
    """Loader processes one GPU needs, and how many such GPUs `cpu_count` cores can feed (one worker per core)."""

    workers_per_gpu: int
    gpus_fed: int  # whole GPUs: floor(cpu_count / workers_per_gpu)
    gpus_fed_exact: float  # cpu_count * per-process rate / GPU throughput


def loader_plan(train_throughput: float, images_per_s_per_process: float, cpu_count: int) -> LoaderPlan:
    """ceil(throughput / per-process rate) workers per GPU; the GPUs whose workers fit in `cpu_count` cores."""
    if train_throughput <= 0 or images_per_s_per_process <= 0:
        raise ValueError("throughput and rate must be positive")
    workers = math.ceil(train_throughput / images_per_s_per_process)
    return LoaderPlan(workers, cpu_count // workers, cpu_count * images_per_s_per_process / train_throughput)


def decode(dataset: ImageDataset, indices: list[int]) -> None:
    """What every pipeline pays: each image read and decoded to RGB as the dataset does it (`open_image`: a file of
    a folder, or the bytes of a shard), unreadable ones skipped."""
    for index in indices:
        try:
            dataset.open_image(index)
        except UNREADABLE:
            pass


def _stage_pass(dataset: ImageDataset, indices: list[int], rng: random.Random) -> list[float]:
    """Seconds spent in each of STAGES over one pass: the steps of `ImageDataset.__getitem__` (train=True)."""
    totals = [0.0] * len(STAGES)
    for index in indices:
        marks = [time.perf_counter()]
        try:  # open_image, step by step (imagefolder.decode)
            file = io.BytesIO(dataset.read_bytes(index))
            marks.append(time.perf_counter())
            image = Image.open(file)
            marks.append(time.perf_counter())
            image.load()
            marks.append(time.perf_counter())
            image = image if image.mode == "RGB" else image.convert("RGB")
        except UNREADABLE:
            continue
        marks.append(time.perf_counter())
        image = random_resized_crop(image, dataset.image_size, rng)
        marks.append(time.perf_counter())
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        marks.append(time.perf_counter())
        if dataset.rand_augment is not None:
            image = dataset.rand_augment(image, rng)
        marks.append(time.perf_counter())
        image_tensor(image)
        marks.append(time.perf_counter())
        for stage, (start, end) in enumerate(itertools.pairwise(marks)):
            totals[stage] += end - start
    return totals


def stage_medians(passes: list[list[float]], images: int) -> dict[str, float]:
    """ms per image of each stage of the training transform: the median over passes of `_stage_pass`.

    The steps of `__getitem__` are written out so that they can be timed one by one; their sum is comparable with
    the whole transform's time. Timed rather than profiled: cProfile's per-call overhead inflates the Python-heavy
    stages (Pillow's `Image.open` parses JPEG markers in Python: 2-3x slower under cProfile); `--profile` writes
    the profile for a look at the calls."""
    medians = [statistics.median(times) for times in zip(*passes, strict=True)]
    return {stage: 1000 * median / images for stage, median in zip(STAGES, medians, strict=True)}


def time_ops(augment: RandAugment, crops: list[Image.Image]) -> dict[str, float]:
    """ms per call of each op of the policy, each applied (probability 1, the policy's magnitude) to every crop."""
    always, rng = dataclasses.replace(augment, prob=1.0), random.Random(0)
    times = {}
    for name in augment.op_names:
        start = time.perf_counter()
        for crop in crops:
            always.apply_op(crop, name, rng)
        times[name] = 1000 * (time.perf_counter() - start) / len(crops)
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def write_profile(dataset: ImageFolderDataset, indices: list[int], path: Path) -> None:
    """cProfile stats of one pass of the transform, for `python -m pstats` or snakeviz (timings inflated)."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [dataset[i] for i in indices])
    profiler.dump_stats(path)


class _CropBox:
    """Stands in for an image in `random_resized_crop`: it has a size, and `crop(box).resize(...)` gives the box."""

    def __init__(self, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> None:
        self.size, self.box = size, box

    def crop(self, box: tuple[int, int, int, int]) -> _CropBox:
        return _CropBox(self.size, box)

    def resize(self, size: tuple[int, int], resample: Any) -> tuple[int, int, int, int] | None:
        return self.box


def draft_fractions(sizes: list[tuple[int, int]], image_size: int, crop_pct: float, draws: int = 20) -> dict:
    """Share of training crops (`draws` per image) and of eval resizes whose source region, decoded at JPEG DCT
    scale 1/2, would still be at least the output size: where Pillow's draft mode could apply without upsampling."""
    rng, stand_ins = random.Random(0), [_CropBox(size) for size in sizes for _ in range(draws)]
    boxes = [random_resized_crop(box, image_size, rng) for box in stand_ins]  # type: ignore[arg-type]
    train = sum(x1 - x0 >= 2 * image_size and y1 - y0 >= 2 * image_size for x0, y0, x1, y1 in boxes)
    resized = [(size, eval_resize_size(*size, image_size, crop_pct)) for size in sizes]
    evals = sum(w // 2 >= rw and h // 2 >= rh for (w, h), (rw, rh) in resized)
    return {"train": train / max(1, len(boxes)), "eval": evals / max(1, len(sizes))}


def cut_crops(dataset: ImageFolderDataset, indices: list[int]) -> list[CropSample]:
    """The device path's loader output for `indices` (unreadable images left out)."""
    samples = [dataset[(index, 0)] for index in indices]
    return [crop for crop, label in samples if label >= 0]


def time_device_augment(
    crops: list[CropSample], image_size: int, augment: RandAugment | None, device: torch.device, batch: int,
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """The device path's per-batch work on `device`: `batch` crops (cycled from `crops`) resized to `image_size`,
    then RandAugment; images/s of each step and of both, one synchronize per batch on a GPU (after the batch, so
    that every kernel of it is in the time)."""
    collated, _ = CropBatch.collate([(crops[i % len(crops)], 0) for i in range(batch)])
    bicubic = collated.bicubic
    on_device = CropBatch(collated.pixels.to(device), collated.sizes, bicubic).crops()
    generator = torch.Generator(device).manual_seed(0)
    resized = resize_crops(on_device, image_size, bicubic)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step: Callable[[], object]) -> Callable[[], None]:
        return lambda: (step(), sync())

    runs = {"resize": timed(lambda: resize_crops(on_device, image_size, bicubic))}
    if augment is not None:
        runs["randaugment"] = timed(lambda: rand_augment_batch(resized, augment, generator))
    times = time_rounds(runs, seconds)
    rates = {name: rate(passes, batch) for name, passes in times.items()}
    total_ms = sum(r.ms_per_image for r in rates.values())
    return {
        "device": str(device), "batch": batch, "image_size": image_size, "threads": torch.get_num_threads(),
        **{name: asdict(r) for name, r in rates.items()}, "images_per_s": 1000 / total_ms,
    }  # fmt: skip


class _Crops(Dataset):
    def __init__(self, crops: list[CropSample]) -> None:
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> tuple[CropSample, int]:
        return self.crops[index], 0


def _collate_list(samples: list[tuple[CropSample, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    tensors = [torch.from_numpy(np.array(crop.pixels)) for crop, _ in samples]  # each its own tensor
    return tensors, torch.tensor([crop.bicubic for crop, _ in samples])


def time_transport(crops: list[CropSample], batch: int, workers: int, batches: int = 20) -> dict[str, float]:
    """Images/s through a DataLoader with `workers` processes of ready crops, collated as one flat buffer
    (`CropBatch`, what runs use) or as a list of tensors (each its own shared-memory segment): the cost of moving
    ragged crops from the loader processes, apart from making them. Pinned where CUDA is there, as a run pins."""
    dataset = _Crops([crops[i % len(crops)] for i in range(batch * batches)])
    result = {}
    for name, collate_fn in (("flat buffer", CropBatch.collate), ("list of tensors", _collate_list)):
        loader = DataLoader(dataset, batch, num_workers=workers, collate_fn=collate_fn,
                            pin_memory=torch.cuda.is_available())  # fmt: skip
        iterator = iter(loader)
        next(iterator)  # the workers started and their first batch made
        start = time.perf_counter()
        count = sum(1 for _ in iterator)
        result[name] = count * batch / (time.perf_counter() - start)
    return result


def bench_loader(
    root: Path, images: int, image_size: int, crop_pct: float, policy: str | None, seconds: float,
    device: torch.device, batch: int, profile: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The loader benchmark's numbers (see the module docstring) on `images` images spread over `root/train`."""
    augment = RandAugment.parse(policy, key="--rand-augment") if policy else None
    if is_shards(root):
        train: ImageDataset = open_split(root, "train", image_size, True, crop_pct, augment)
    else:
        check_layout(root, ("train",))
        train = ImageFolderDataset(root / "train", image_size, True, crop_pct, augment)
    cut = copy.copy(train)  # the same file list, without listing the folder again
    cut.augment_on_device = True
    evaluation = copy.copy(train)
    evaluation.train, evaluation.rand_augment = False, None
    count = min(images, len(train))
    if count == 0:
        raise ConfigError("--root", str(root), "a folder with images in train/<class>/")
    indices = [i * len(train) // count for i in range(count)]  # spread over the classes
    torch.manual_seed(0)
    stage_rng, stage_passes = random.Random(0), []
    times = time_rounds({
        "decode": lambda: decode(train, indices),
        "loader": lambda: [train[i] for i in indices],
        "device": lambda: [cut[i] for i in indices],
        "eval": lambda: [evaluation[i] for i in indices],
        "stages": lambda: stage_passes.append(_stage_pass(train, indices, stage_rng)),
    }, seconds)  # fmt: skip
    rates = {name: rate(times[name], count) for name in ("decode", "loader", "device", "eval")}
    if profile is not None:
        write_profile(train, indices, profile)
    sizes, crops, rng = [], [], random.Random(0)
    for index in indices:
        try:
            image = train.open_image(index)
        except UNREADABLE:
            continue
        sizes.append(image.size)
        if augment is not None and len(crops) < 20:
            crops.append(random_resized_crop(image, image_size, rng))
    long_short = [sorted(size, reverse=True) for size in sizes]
    decode_ms = rates["decode"].ms_per_image
    paths_report = {name: {**asdict(rates[name]), "x_decode": rates[name].ms_per_image / decode_ms}
                    for name in ("loader", "device")}  # fmt: skip
    paths_report["device"]["target_x_decode"] = TARGET_RATIO
    cut_samples = cut_crops(cut, indices)
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cpus())  # the device's work: on a CPU, the training process with all its threads
    try:
        augment_report = time_device_augment(cut_samples, image_size, augment, device, batch, seconds)
    finally:
        torch.set_num_threads(threads)
    return {
        "root": str(root), "images": count, "image_size": image_size, "crop_pct": crop_pct, "rand_augment": policy,
        "torch_threads": threads, "cpu_count": usable_cpus(),
        "median_long_short_side": [statistics.median(side[i] for side in long_short or [(0, 0)]) for i in (0, 1)],
        "decode": asdict(rates["decode"]), "eval": asdict(rates["eval"]), "paths": paths_report,
        "eval_over_decode": rates["eval"].ms_per_image / decode_ms,
        "device_augment": augment_report,
        "transport_images_per_s": time_transport(cut_samples, min(batch, 64), min(2, usable_cpus())),
        "stages_ms_per_image": stage_medians(stage_passes[1:], count),  # [0]: warm-up
        "randaugment_op_ms": time_ops(augment, crops) if augment is not None else {},
        "randaugment_ops_per_image": augment.num_ops * augment.prob if augment is not None else 0.0,
        "draft_applicable": draft_fractions(sizes, image_size, crop_pct),
        "versions": {"pillow": PIL.__version__, "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
                     "torch": torch.__version__},
    }  # fmt: skip


def print_loader(report: dict[str, Any]) -> None:
    """The small table: rates and ratios to decode of each path, the device's work, where the loader path's time
    goes, and the loader processes one GPU needs on each path."""
    long, short = report["median_long_short_side"]
    where = "generated ImageNet-like JPEGs" if report.get("generated") else f"{report['root']}/train"
    policy = report["rand_augment"] or "no RandAugment"
    print(f"loader: {report['images']} images, {where} (median {long:.0f}x{short:.0f}) "
          f"-> {report['image_size']} px, {policy}; one process, {report['torch_threads']} torch thread")  # fmt: skip
    print(f"  {'loader process work per image':<54} {'img/s/process':>13} {'ms/img':>8} {'x decode':>9}")
    decode_ms = report["decode"]["ms_per_image"]
    rows = (
        (report["decode"], "decode only (to RGB, as the dataset reads it)"),
        (report["paths"]["loader"], "augment_on=loader: decode, crop+resize, flip, RandAug."),
        (report["paths"]["device"], "augment_on=device: decode, cut the crop box, flip"),
        (report["eval"], "eval transform (bicubic resize, center crop)"),
    )
    for row, label in rows:
        print(f"  {label:<54} {row['images_per_s']:>13.0f} {row['ms_per_image']:>8.2f} "
              f"{row['ms_per_image'] / decode_ms:>8.2f}x")  # fmt: skip
    device = report["paths"]["device"]
    verdict = "within" if device["x_decode"] <= TARGET_RATIO else "above"
    print(f"  device path: {device['x_decode']:.2f}x decode per image in a loader process ({verdict} the target of "
          f"{TARGET_RATIO}x)")  # fmt: skip
    augment = report["device_augment"]
    steps = ", ".join(f"{name} {augment[name]['images_per_s']:.0f}" for name in ("resize", "randaugment")
                      if name in augment)  # fmt: skip
    print(f"  the device's work per batch of {augment['batch']} at {augment['image_size']} px on {augment['device']} "
          f"({augment['threads']} threads): {augment['images_per_s']:.0f} img/s ({steps})")  # fmt: skip
    transport = report["transport_images_per_s"]
    moved = ", ".join(f"{name} {images_per_s:.0f} img/s" for name, images_per_s in transport.items())
    print(f"  ragged crops through 2 loader processes, collated as: {moved}")
    stages = report["stages_ms_per_image"]
    total = sum(stages.values())
    print(f"where the loader path's time goes (stages timed one by one, median pass: {total:.2f} ms/img)")
    for stage, ms in stages.items():
        print(f"  {stage:<46} {ms:>6.2f} ms {100 * ms / total:>5.1f}%")
    if report["randaugment_op_ms"]:
        ops = report["randaugment_op_ms"]
        mean = statistics.mean(ops.values())
        print(f"  RandAugment applies {report['randaugment_ops_per_image']:g} op per image on average, {mean:.2f} ms "
              f"each (mean of {len(ops)}); ms per call on {report['image_size']} px crops:")  # fmt: skip
        print("    " + ", ".join(f"{name} {ms:.2f}" for name, ms in ops.items()))
    draft = report["draft_applicable"]
    print(f"  JPEG draft mode (DCT scale 1/2) could apply to {100 * draft['train']:.1f}% of train crops and "
          f"{100 * draft['eval']:.1f}% of eval resizes (not used: it changes pixels)")  # fmt: skip
    gpu = report["train_throughput_img_s"]
    print(f"one GPU training at {gpu:.0f} img/s needs, per path (the {report['cpu_count']} CPUs this process may use "
          "feed as many GPUs, before the core each GPU's training process takes itself):")  # fmt: skip
    for name, path in report["paths"].items():
        print(f"  augment_on={name:<7} ceil({gpu:.0f} / {path['images_per_s']:.0f}) = {path['workers_per_gpu']:>3} "
              f"loader processes; {path['gpus_fed']} GPUs fed ({path['gpus_fed_exact']:.2f})")  # fmt: skip
    if augment["device"].startswith("cuda"):
        share = gpu / augment["images_per_s"]
        print(f"  and on the device path, the GPU spends {100 * share:.0f}% of a step's time at {gpu:.0f} img/s on the "
              "resize and RandAugment (as measured above)")  # fmt: skip
    else:
        print("  (the device's own work was timed on this CPU: on a GPU machine the bench times it there)")


def generated_index(entries: int, classes: int = 1000) -> ImageIndex:
    """`entries` ImageNet-like paths ("n01440764/n01440764_10026.JPEG"), spread evenly over `classes` classes."""
    wnids = [f"n{1440764 + 7919 * label:08d}" for label in range(classes)]
    bounds = [label * entries // classes for label in range(classes + 1)]
    files = ([f"{wnid}_{k}.JPEG" for k in range(bounds[c], bounds[c + 1])] for c, wnid in enumerate(wnids))
    return ImageIndex.from_files(wnids, files)


def process_memory() -> dict[str, int]:
    """This process's resident bytes: `rss`, `pss` (each shared page divided among the processes that map it) and
    `private` (pages no other process maps), from /proc/self/smaps_rollup (Linux 4.14 on)."""
    kb = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        kb[name] = int(value.split()[0])
    private = kb["Private_Clean"] + kb["Private_Dirty"]
    return {"rss": 1024 * kb["Rss"], "pss": 1024 * kb["Pss"], "private": 1024 * private}


def _make_every_path(path_of: Callable[[int], Path], count: int, barrier: Any, results: Any) -> None:
    barrier.wait()  # every process forked: pages are shared by as many as they will be
    before = process_memory()
    barrier.wait()  # every process measured before any reads
    start = time.perf_counter()
    for index in range(count):
        str(path_of(index))  # as Image.open does with a Path
    seconds = time.perf_counter() - start
    barrier.wait()  # every process has read
    after = process_memory()
    results.put({"seconds": seconds, **{f"{key}_added": after[key] - before[key] for key in after}})


def forked_memory(path_of: Callable[[int], Path], count: int, workers: int) -> list[dict[str, float]]:
    """What each of `workers` processes, forked from this one as a DataLoader's are, adds to its memory by making
    the paths of images 0 to count - 1 with `path_of`; and the seconds it takes."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_make_every_path, args=(path_of, count, barrier, results))
                 for _ in range(workers)]  # fmt: skip
    for process in processes:
        process.start()
    reports = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    return reports


def index_memory(entries: int, workers: int) -> dict[str, Any]:
    """`forked_memory` of an index of `entries` generated paths: as arrays mapped from a cache file (what
    `load_index` gives), as arrays in memory (its fallback), and as the list of (Path, label) pairs it replaced;
    first, as the baseline, the same number of paths made without an index (one constant path: making Path objects
    dirties some of the interpreter's own pages in every process)."""
    split_dir = Path("/data/imagenet/train")  # never read: only paths are made
    index = generated_index(entries)
    array_bytes = sum(array.nbytes for array in (index.names, index.offsets, index.labels))
    with tempfile.TemporaryDirectory(prefix="index_memory_") as cache:
        write_index(Path(cache) / "train.index", b"", index)
        mapped = read_index(Path(cache) / "train.index", b"", index.classes)
    constant = index.relative_path(0)
    path_makers = {
        "no index (baseline)": (0, lambda i: split_dir / constant),
        "arrays, mapped from the cache file": (array_bytes, lambda i: split_dir / mapped.relative_path(i)),
        "arrays, in memory": (array_bytes, lambda i: split_dir / index.relative_path(i)),
    }
    rows = {name: {"bytes_in_parent": size, "processes": forked_memory(path_of, entries, workers)}
            for name, (size, path_of) in path_makers.items()}  # fmt: skip
    before = process_memory()["rss"]
    samples = [(split_dir / index.relative_path(i), int(index.labels[i])) for i in range(len(index))]
    rows["list of (Path, label)"] = {"bytes_in_parent": process_memory()["rss"] - before,
                                     "processes": forked_memory(lambda i: samples[i][0], len(samples), workers)}
    return {"entries": entries, "classes": len(index.classes), "workers": workers, "representations": rows}


def print_index_memory(report: dict[str, Any]) -> None:
    """One line per representation: its size, then the mean over the forked processes of what each added."""
    print(f"index memory: {report['entries']:,} generated paths ({report['classes']} classes), {report['workers']} "
          "forked processes each making every path; per process, added:")  # fmt: skip
    print(f"  {'representation':<36} {'in parent':>10} {'private':>10} {'PSS':>10} {'s to make':>10}")
    for name, row in report["representations"].items():
        mean = {key: statistics.mean(p[key] for p in row["processes"]) for key in row["processes"][0]}
        mb = [f"{value / 2**20:>7.1f} MB" for value in (row["bytes_in_parent"], mean["private_added"],
                                                         mean["pss_added"])]  # fmt: skip
        print(f"  {name:<36} {' '.join(mb)} {mean['seconds']:>10.2f}")
    print("  (RSS, in the JSON, misleads here: it counts the pages a process shares with its parent from the fork on)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    loader = commands.add_parser(
        "loader", help="can this machine's CPUs feed a GPU?", description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    loader.add_argument("--root", type=Path, metavar="FOLDER", help="an ImageNet-layout folder (default: generated)")
    loader.add_argument("--images", type=int, default=100, metavar="N", help="images timed per pass (default 100)")
    loader.add_argument("--image-size", type=int, default=224)
    loader.add_argument("--crop-pct", type=float, default=0.9, help="eval: resize the short side to size / crop_pct")
    loader.add_argument("--rand-augment", default=EXAMPLE, help=f"timm policy, or 'none' (default {EXAMPLE})")
    loader.add_argument(
        "--train-throughput", type=float, default=DEFAULT_TRAIN_THROUGHPUT, metavar="IMG_PER_S",
        help=f"training images/s of one GPU (default {DEFAULT_TRAIN_THROUGHPUT:.0f}: an assumption; replace it with "
        "a measured one, e.g. train_throughput_img_s in a run's result.json, which is per GPU)",
    )  # fmt: skip
    loader.add_argument("--seconds", type=float, default=3.0, help="time each pipeline about this long (default 3)")
    loader.add_argument("--batch", type=int, default=256, help="crops per batch for the device's work (default 256)")
    loader.add_argument("--device", help="where the device path's work is timed (default: cuda if there, else cpu)")
    loader.add_argument("--profile", type=Path, metavar="FILE", help="write cProfile stats of one train pass to FILE")
    loader.set_defaults(measure=measure, show=print_loader)
    memory = commands.add_parser(
        "index-memory", help="what an image folder's index costs each loader process",
        description=__doc__.split("\n\n")[4], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    memory.add_argument("--entries", type=int, default=1000 * 1281, help="paths (default 1281000: ImageNet's train)")
    memory.add_argument("--workers", type=int, default=4, help="forked processes (default 4)")
    memory.set_defaults(measure=measure_index_memory, show=print_index_memory)


def measure_index_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.entries < 1 or args.workers < 1:
        parser.error("--entries and --workers must be positive")
    return index_memory(args.entries, args.workers)


def measure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.images < 1 or args.image_size < 1 or args.train_throughput <= 0 or args.seconds < 0 or args.batch < 1:
        parser.error("--images, --image-size, --train-throughput, --batch must be positive, --seconds not negative")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {args.device}: {error}")
    policy = None if args.rand_augment.lower() == "none" else args.rand_augment
    if policy is not None:
        RandAugment.parse(policy, key="--rand-augment")  # before writing any folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a loader worker
    try:
        with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
            root = args.root
            if root is None:
                per_class = math.ceil(args.images / len(CLASS_NAMES))
                root = write_jpeg_folder(Path(scratch) / "jpeg_folder", train_per_class=per_class, val_per_class=1)
            report = bench_loader(root, args.images, args.image_size, args.crop_pct, policy, args.seconds, device,
                                  args.batch, args.profile)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    report["generated"] = args.root is None
    report["train_throughput_img_s"] = args.train_throughput
    for path in report["paths"].values():
        path.update(asdict(loader_plan(args.train_throughput, path["images_per_s"], report["cpu_count"])))
    return report
