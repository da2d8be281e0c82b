"""Procedurally generated shape images whose label is a spatial relation, not a colour statistic.

Every image shows one square and one disc on a 4x4 grid of cells, plus up to `max_distractors` other shapes
(diagonal cross, frame, triangle, bar) in free cells. The disc is never in the square's row; the class is whether it is
above or below the square, and whether its column is 2+ left, 1 left, the same, 1 right or 2+ right of the
square's (5 x 2 = 10 classes). Shapes, sizes, distractor counts and colours are drawn independently of the class
from one palette, and objects never overlap, so colour histograms carry no label information: only where the disc
and the square are does. Near pairs are local patterns a small convnet picks up quickly; far pairs need spatial
mixing across the image.

Images are made in chunks whose torch.Generator is seeded from (seed, chunk index) alone, so a dataset depends only
on its arguments and no global RNG state is read or changed.
"""

from __future__ import annotations

import numbers
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from metaformer_lab.registry import ConfigError

GRID = 4  # cells per side
MAX_DISTRACTORS = GRID * GRID - 2  # the cells the square and the disc leave free
CHUNK_SIZE = 1000  # a multiple of the class count, so every full chunk is exactly balanced
LEVELS = 4  # intensity levels per channel: a palette of 4**3 colours, coded as 2 bits per channel
LINE_WIDTH = 0.35  # half-width of cross and bar lines, and width of frame sides, as a fraction of the half-size
DISTRACTOR_SHAPES = ("cross", "frame", "triangle", "bar")

_COLUMN_RELATIONS = ("2+ columns to the left", "1 column to the left", "same column", "1 column to the right",
                     "2+ columns to the right")  # fmt: skip
CLASS_NAMES: tuple[str, ...] = tuple(
    f"disc {side} the square, {column}" for column in _COLUMN_RELATIONS for side in ("above", "below")
)


def _relation_class(square_cell: int, disc_cell: int) -> int | None:
    """The class of a (square, disc) placement, or None where the disc shares the square's row."""
    row_offset = disc_cell // GRID - square_cell // GRID
    column_offset = disc_cell % GRID - square_cell % GRID
    if row_offset == 0:
        return None
    return 2 * (min(max(column_offset, -2), 2) + 2) + int(row_offset > 0)


def _placements_by_class() -> tuple[torch.Tensor, torch.Tensor]:
    """Every (square cell, disc cell) pair of each class, padded to [classes, most pairs, 2], and the counts."""
    pairs: list[list[tuple[int, int]]] = [[] for _ in CLASS_NAMES]
    for square_cell in range(GRID * GRID):
        for disc_cell in range(GRID * GRID):
            label = _relation_class(square_cell, disc_cell)
            if label is not None:
                pairs[label].append((square_cell, disc_cell))
    table = torch.zeros(len(pairs), max(map(len, pairs)), 2, dtype=torch.long)
    for label, class_pairs in enumerate(pairs):
        table[label, : len(class_pairs)] = torch.tensor(class_pairs)
    return table, torch.tensor([len(class_pairs) for class_pairs in pairs])


_PLACEMENTS, _PLACEMENT_COUNTS = _placements_by_class()


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(name, value, allowed)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(
    num_images: int, image_size: int, seed: int, max_distractors: int, noise: int, object_size: tuple[float, float]
) -> None:
    _check("num_images", num_images, _is_int(num_images) and num_images >= 0, "an integer >= 0")
    size_ok = _is_int(image_size) and 16 <= image_size <= 512 and image_size % 8 == 0
    _check("image_size", image_size, size_ok, "a multiple of 8 between 16 and 512")
    _check("seed", seed, _is_int(seed) and seed >= 0, "an integer >= 0")
    ok = _is_int(max_distractors) and 0 <= max_distractors <= MAX_DISTRACTORS
    _check("max_distractors", max_distractors, ok, f"an integer between 0 and {MAX_DISTRACTORS} (the free grid cells)")
    _check("noise", noise, _is_int(noise) and 0 <= noise <= 127, "an integer between 0 and 127")
    ok = isinstance(object_size, (tuple, list)) and len(object_size) == 2
    ok = ok and all(isinstance(bound, numbers.Real) for bound in object_size)
    ok = ok and 0.2 <= object_size[0] <= object_size[1] <= 1.0
    _check("object_size", object_size, ok, "(min, max) fractions of a grid cell with 0.2 <= min <= max <= 1")


def _outermost(occupied: torch.Tensor) -> torch.Tensor:
    """The first and last True along the last dimension of a boolean [n, k] tensor."""
    seen_before, seen_after = occupied.cumsum(1), occupied.flip(1).cumsum(1).flip(1)
    return occupied & ((seen_before == 1) | (seen_after == 1))


def _shape_mask(u: torch.Tensor, v: torch.Tensor, half: torch.Tensor, shape: str) -> torch.Tensor:
    """Pixels inside `shape`, from x (u, [n, 1, W]) and y (v, [n, H, 1]) offsets from its centre in half-sizes."""
    if shape == "disc":  # a small disc can rasterise to a full block: clearing the corners keeps it unlike a square
        disc = u * u + v * v < 1
        rows, columns = disc.any(2), disc.any(1)
        corners = _outermost(rows).unsqueeze(2) & _outermost(columns).unsqueeze(1)
        at_least_3x3 = (rows.sum(1) >= 3) & (columns.sum(1) >= 3)  # below that, clearing corners erases it
        return disc & ~(corners & at_least_3x3[:, None, None])
    au, av = u.abs(), v.abs()
    line = (0.5 / half).clamp(min=LINE_WIDTH)  # at least a pixel wide, or a line can fall between pixel centres
    if shape == "bar":
        return (au < 1) & (av < line)
    inside_box = (au < 1) & (av < 1)
    if shape == "square":
        return inside_box
    if shape == "cross":  # diagonal, so that a small one cannot look like a small disc (a plus sign can)
        return inside_box & ((au - av).abs() < line)
    if shape == "frame":
        inner = 1 - (1 / half).clamp(min=LINE_WIDTH)
        return inside_box & ((au > inner) | (av > inner))
    if shape == "triangle":  # apex up: the half-width grows from 0 at the top (v = -1) to 1 at the bottom
        return inside_box & (2 * au < v + 1)
    raise AssertionError(shape)


def _chunk_generator(seed: int, chunk_index: int) -> torch.Generator:
    # SeedSequence hashes the pair, so nearby (seed, chunk) pairs do not give related streams.
    state = np.random.SeedSequence([seed, chunk_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _generate_chunk(
    images: torch.Tensor, g: torch.Generator, max_distractors: int, noise: int, object_size: tuple[float, float]
) -> torch.Tensor:
    """Fills `images` (uint8 [n, 3, H, W]) and returns their labels."""
    n, image_size = images.shape[0], images.shape[-1]
    cell = image_size // GRID
    slot_shapes = ("square", "disc", *(DISTRACTOR_SHAPES[i % 4] for i in range(max_distractors)))
    num_slots = len(slot_shapes)
    labels = (torch.arange(n) % len(CLASS_NAMES))[torch.randperm(n, generator=g)]

    # Layout: a uniform placement of the square and the disc among those of the class, then distractors in a
    # random number of random free cells; hidden distractor slots go to a spare cell that is dropped.
    choice = (torch.rand(n, generator=g) * _PLACEMENT_COUNTS[labels]).long()
    marked_cells = _PLACEMENTS[labels, choice]
    cell_keys = torch.rand(n, GRID * GRID, generator=g).scatter_(1, marked_cells, 2.0)
    distractor_cells = cell_keys.argsort(1)[:, :max_distractors]
    num_distractors = torch.randint(0, max_distractors + 1, (n, 1), generator=g)
    hidden = torch.rand(n, max_distractors, generator=g).argsort(1) >= num_distractors
    cells = torch.cat([marked_cells, distractor_cells.masked_fill(hidden, GRID * GRID)], 1)

    # Size and position inside the cell, kept a pixel clear of its border so objects never touch or overlap;
    # a half-size of at least a pixel keeps a pixel centre inside every square and disc.
    low, high = object_size
    half = (low + (high - low) * torch.rand(n, num_slots, 1, generator=g)) * cell / 2
    half = half.clamp(min=1.0, max=(cell - 1) / 2)
    centre = half + 0.5 + (cell - 1 - 2 * half) * torch.rand(n, num_slots, 2, generator=g)
    pixel = torch.arange(cell, dtype=torch.float32) + 0.5
    u = ((pixel - centre[..., :1]) / half).unsqueeze(2)  # [n, slots, 1, cell]
    v = ((pixel - centre[..., 1:]) / half).unsqueeze(3)  # [n, slots, cell, 1]

    # Colours as palette codes (2 bits per channel); any colour but the background's, whatever the class.
    num_colours = LEVELS**3
    background = torch.randint(0, num_colours, (n, 1), generator=g)
    colours = torch.randint(0, num_colours - 1, (n, num_slots), generator=g)
    colours += colours >= background
    background, colours = background.to(torch.uint8), colours.to(torch.uint8)

    # Paint each object into its own cell-sized patch, then scatter the patches into the grid of cells.
    canvas = background[:, :, None, None].expand(n, GRID * GRID + 1, cell, cell).contiguous()
    patches = torch.empty(n, num_slots, cell, cell, dtype=torch.uint8)
    for slot, shape in enumerate(slot_shapes):
        mask = _shape_mask(u[:, slot], v[:, slot], half[:, slot, :, None], shape)
        torch.where(mask, colours[:, slot, None, None], background[:, :, None], out=patches[:, slot])
    canvas.scatter_(1, cells[:, :, None, None].expand(n, num_slots, cell, cell), patches)
    codes = canvas[:, : GRID * GRID].view(n, GRID, GRID, cell, cell).transpose(2, 3).reshape(n, 1, image_size, -1)

    # Decode the 2-bit levels to intensities up to 255 - noise, then add grey noise uniform in [0, noise].
    shifts = torch.tensor([0, 2, 4], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.bitwise_right_shift(codes, shifts, out=images)
    images.bitwise_and_(LEVELS - 1).mul_((255 - noise) // (LEVELS - 1))
    if noise:
        random_bytes = torch.empty(codes.numel() // 8 + 1, dtype=torch.int64).random_(generator=g)
        random_bytes = random_bytes.view(torch.uint8)[: codes.numel()].view_as(codes)
        images.add_(((random_bytes.to(torch.int16) * (noise + 1)) >> 8).to(torch.uint8))  # fits: noise < 128
    return labels


def generate_shapes(
    num_images: int,
    image_size: int = 32,
    seed: int = 0,
    max_distractors: int = 3,
    noise: int = 32,
    object_size: tuple[float, float] = (0.6, 0.9),
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` images (uint8 [N, 3, H, W]) and labels (int64 [N]), determined by the arguments alone.

    Difficulty: `max_distractors` extra shapes (0..14, a uniform count per image), grey pixel `noise` amplitude
    (0..127) and `object_size`, the (min, max) object diameter as a fraction of a grid cell (image_size / 4).
    Objects under 3 pixels across (16 px images, or a small `object_size`) are blobs: the disc no longer differs
    from the square, so train at 32 px or more.
    """
    _check_arguments(num_images, image_size, seed, max_distractors, noise, object_size)
    object_size = (float(object_size[0]), float(object_size[1]))
    images = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.empty(num_images, dtype=torch.long)
    for chunk_index, start in enumerate(range(0, num_images, CHUNK_SIZE)):
        stop = min(start + CHUNK_SIZE, num_images)
        g = _chunk_generator(seed, chunk_index)
        labels[start:stop] = _generate_chunk(images[start:stop], g, max_distractors, noise, object_size)
    return images, labels


class ShapesDataset(Dataset):
    """One pre-generated split (uint8 [3, H, W] image, int label); give train and validation different seeds."""

    def __init__(
        self,
        num_images: int,
        image_size: int = 32,
        seed: int = 0,
        max_distractors: int = 3,
        noise: int = 32,
        object_size: tuple[float, float] = (0.6, 0.9),
    ) -> None:
        self.images, self.labels = generate_shapes(num_images, image_size, seed, max_distractors, noise, object_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key  # (index, epoch) from the training loader: no draws here
        return self.images[index], int(self.labels[index])


def measure_throughput(image_size: int = 32, num_images: int = 20000, threads: int = 1) -> float:
    """Images generated per second with `threads` CPU threads (the previous thread count is restored)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generate_shapes(CHUNK_SIZE, image_size)  # warm-up
        start = time.perf_counter()
        generate_shapes(num_images, image_size)
        return num_images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
