"""Plots of our runs against the paper: Δ top-1 vs baseline (ours against the paper's), and top-1 against MACs.

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so no global backend or state is touched:
saving renders with Agg (PNG) and the PDF backend, and a notebook shows the returned Figure as it is. Runs of
different protocols are different series (colour and marker, named in the legend), never one; in accuracy against
MACs, models of one data, training set and schedule share a series (compute is what that plot compares). Point
labels are placed by `place_labels`: none overlaps another label, a point or the axes' edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import FuncFormatter

from metaformer_lab.analysis.collect import aggregate_seeds, axis_applies, protocol_label
from metaformer_lab.analysis.tables import ablation_deltas, protocol_blocks, trained_their_rows

MARKERS = "osD^vPX*h<>"
# the axes a point label may name; the data and image size are the legend's (model: where a series holds one)
LABEL_AXES = ("model", "mixer", "pool_size", "kernel_size", "head_dim", "norm", "act", "residual", "mlp")
_NAMES = ("model", "mixer", "norm", "act")  # axes whose values say what they are: "identity", not "mixer=identity"
# where a label may go: its nearest corner or edge this many points from its point, sideways before up or down
_DX = (0, 6, 12, 20, 30, 42, 56, 72, 90, 110)
_DY = (0, 6, *range(10, 85, 5))
_MARKER = 3  # the markers' radius (points): matplotlib's default size, 6
_LEADER_FROM = 14  # a label this far from its point (points) gets a line to it
# how much farther (points) a label may go to cross one line or point less, or to be nearer its own point than any
# other; and to have one line less run through a label (its own or another's)
_CROSSING, _THROUGH = 40, 200
_CROWD = 12  # points within this many points of a point make it crowded: its label is placed after sparse ones


def _short(experiment: str) -> str:
    """A point label: the experiment without its table prefix (t5_identity -> identity, main_s12 -> s12)."""
    return str(experiment).removeprefix("t5_").removeprefix("main_")


def _figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to measure labels before the figure is saved or shown
    return fig, fig.add_subplot()


def _legend(fig: Figure) -> None:
    # below the axes, so that it covers no point and no label
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)


@cache
def _candidates() -> tuple[np.ndarray, np.ndarray]:
    """Label positions, nearest first: offsets (points) of a label's anchor from its point, and the anchor's place
    in the label as fractions of its size (0: left or bottom, 0.5: centre, 1: right or top), so that the label lies
    beyond the anchor as seen from the point."""
    grid = {(sx * dx, sy * dy) for dx in _DX for dy in _DY for sx in (1, -1) for sy in (1, -1)}
    grid = [d for d in grid if max(map(abs, d)) >= 6]  # clear of the marker
    offsets = np.array(sorted(grid, key=lambda d: (math.hypot(d[0], 1.5 * d[1]), -d[0], -d[1])), dtype=float)
    return offsets, np.where(offsets > 0, 0.0, np.where(offsets < 0, 1.0, 0.5))


def _within(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """points (..., 2) against boxes (B, 4: x0, y0, x1, y1): (..., B) whether the point lies in the box."""
    p = points[..., None, :]
    return (p[..., 0] > boxes[:, 0]) & (p[..., 0] < boxes[:, 2]) & (p[..., 1] > boxes[:, 1]) & (p[..., 1] < boxes[:, 3])


def _overlaps(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(C, 4) against (B, 4): (C, B) whether they overlap."""
    return (
        (boxes[:, None, 0] < others[:, 2]) & (boxes[:, None, 2] > others[:, 0])
        & (boxes[:, None, 1] < others[:, 3]) & (boxes[:, None, 3] > others[:, 1])
    )  # fmt: skip


def _distances(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(C, 4) against (P, 2): (C, P) the distance from each box to each point (0 inside)."""
    dx = np.maximum(boxes[:, None, 0] - points[:, 0], points[:, 0] - boxes[:, None, 2])
    dy = np.maximum(boxes[:, None, 1] - points[:, 1], points[:, 1] - boxes[:, None, 3])
    return np.hypot(dx.clip(0), dy.clip(0))


def _crossings(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Segments a0-a1 (C, 2) against b0-b1 (B, 2): (C, B) whether they cross."""

    def side(p, q, r):  # > 0 where r is left of p -> q
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    a0, a1, b0, b1 = a0[:, None], a1[:, None], b0[None], b1[None]
    return (side(a0, a1, b0) * side(a0, a1, b1) < 0) & (side(b0, b1, a0) * side(b0, b1, a1) < 0)


def place_labels(ax: Axes, x: Sequence[float], y: Sequence[float], texts: Sequence[str],
                 colors: Sequence[str] | None = None, yerr: Sequence[float] | None = None,
                 fontsize: float = 8) -> list[Annotation]:  # fmt: skip
    """Label the points (x, y) of `ax` so that no label overlaps another, a point or an error bar, or leaves the axes.

    Points of one colour whose markers overlap (e.g. ablations with the same MACs and close accuracies) get one label
    that lists them top to bottom. Greedy, isolated points first: each label goes to the nearest position of a grid
    around its point that is free (a far one gets a line to its point), where no line runs through a label, and it
    crosses no other line or point and is nearer to its point than to any other, as far as that can be had. Sizes
    and positions are measured with the figure's renderer in the final layout. Where a label has no free position
    inside the axes, the axis limits grow and all labels are placed again. Call it when all else is drawn: it fixes
    the limits. Empty texts get no label.
    """
    fig = ax.get_figure()
    keep = [i for i, text in enumerate(texts) if text]
    if not keep:
        return []
    x, y = np.asarray(x, float)[keep], np.asarray(y, float)[keep]
    texts = [texts[i] for i in keep]
    colors = [colors[i] for i in keep] if colors is not None else ["black"] * len(keep)
    yerr = np.nan_to_num(np.asarray(yerr, float)[keep]) if yerr is not None else np.zeros(len(keep))
    renderer = fig.canvas.get_renderer()
    sizes: dict[str, tuple[float, float]] = {}

    def size(text: str) -> tuple[float, float]:  # the same wherever the label goes
        if text not in sizes:
            probe = ax.text(0, 0, text, fontsize=fontsize)
            extent = probe.get_window_extent(renderer)
            sizes[text] = (extent.width, extent.height)
            probe.remove()
        return sizes[text]

    attempts = 8
    for attempt in range(attempts):
        fig.draw_without_rendering()  # the layout, hence the pixel positions, of the current limits
        px = fig.dpi / 72  # pixels per point
        points = ax.transData.transform(np.column_stack([x, y]))
        bars = np.stack([ax.transData.transform(np.column_stack([x, y - yerr])),
                         ax.transData.transform(np.column_stack([x, y + yerr]))], axis=1)  # fmt: skip
        stacks = _stacks(points, colors, 2 * _MARKER * px)
        labels = ["\n".join(texts[i] for i in stack) for stack in stacks]
        centres = np.array([points[stack].mean(axis=0) for stack in stacks])
        frame, last = np.array(ax.bbox.extents), attempt == attempts - 1
        chosen, need = _place(centres, stacks, points, bars, np.array([size(t) for t in labels]), frame, px, last)
        if not (need > 0).any() or last:
            break
        grow = need.clip(0) * 1.2 + 2  # pixels, with slack: the axes shrink a little as tick labels change
        edges = ax.transData.inverted().transform([frame[:2] - grow[:2], frame[2:] + grow[2:]])
        ax.set_xlim(edges[0][0], edges[1][0])
        ax.set_ylim(edges[0][1], edges[1][1])
    offsets, anchors = _candidates()
    centres = ax.transData.inverted().transform(centres)
    annotations = []
    align = {0.0: ("left", "bottom"), 0.5: ("center", "center"), 1.0: ("right", "top")}
    for k, c in sorted(chosen.items()):
        ha, va = align[anchors[c][0]][0], align[anchors[c][1]][1]
        color = colors[stacks[k][0]]
        far = math.hypot(*offsets[c]) >= _LEADER_FROM
        line = dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6, shrinkA=0, shrinkB=3) if far else None
        xy = (x[stacks[k][0]], y[stacks[k][0]]) if len(stacks[k]) == 1 else tuple(centres[k])
        label = ax.annotate(labels[k], xy, xytext=tuple(offsets[c]), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, color=color, arrowprops=line, annotation_clip=False)  # fmt: skip
        label.set_in_layout(False)  # placed for this layout: it must not change it
        annotations.append(label)
    return annotations


def _stacks(points: np.ndarray, colors: Sequence[str], touch: float) -> list[list[int]]:
    """The points in groups of one colour whose markers overlap (closer than `touch` pixels, or through others),
    each top to bottom; groups in the order of their first point."""
    group = list(range(len(points)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    near = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1)) < touch
    for i, j in zip(*np.nonzero(near), strict=True):
        if colors[i] == colors[j]:
            group[root(i)] = root(j)
    stacks: dict[int, list[int]] = {}
    for i in range(len(points)):
        stacks.setdefault(root(i), []).append(i)
    return [sorted(stack, key=lambda i: -points[i][1]) for stack in stacks.values()]


def _place(centres: np.ndarray, stacks: list[list[int]], points: np.ndarray, bars: np.ndarray, sizes: np.ndarray,
           frame: np.ndarray, px: float, last: bool) -> tuple[dict[int, int], np.ndarray]:  # fmt: skip
    """One placement in pixels of the labels of `stacks` (their points' indices; `centres`: where their lines go):
    {label: candidate index}, and how many pixels the axes lack on each side (left, bottom, right, top) for labels
    that found no free position inside `frame`. `px`: pixels per point."""
    offsets, anchors = _candidates()
    distance = np.hypot(offsets[:, 0], 1.5 * offsets[:, 1])  # sideways is nearer: labels are wide and low
    far = np.hypot(*offsets.T) >= _LEADER_FROM
    along = np.linspace(0, 1, 32)[1:-1, None]  # points along a line, to test what it passes through
    # pad: from the axes' edges, points and bars; gap: between labels, wide enough not to read as a space
    pad, gap, marker = 1.5 * px, np.array([-8, -2, 8, 2]) * px, _MARKER * px
    frame = frame + [pad, pad, -pad, -pad]
    markers = np.column_stack([points - marker, points + marker])
    bars = np.column_stack([bars[:, 0, 0] - pad, bars[:, 0, 1], bars[:, 0, 0] + pad, bars[:, 1, 1]])
    crowd = (np.hypot(*(centres[:, None] - points[None]).transpose(2, 0, 1)) < _CROWD * px).sum(axis=1)
    boxes, lines, chosen, need = np.zeros((0, 4)), np.zeros((0, 2, 2)), {}, np.zeros(4)
    for k in sorted(range(len(stacks)), key=lambda k: (crowd[k], -centres[k][1], centres[k][0])):
        corner = centres[k] + offsets * px - anchors * sizes[k]
        candidates = np.column_stack([corner, corner + sizes[k]])
        others = np.setdiff1d(np.arange(len(points)), stacks[k])
        blocked = _overlaps(candidates + gap, boxes).any(axis=1)
        blocked |= _overlaps(candidates + [-pad, -pad, pad, pad], np.vstack([markers, bars])).any(axis=1)
        inside = (candidates[:, :2] >= frame[:2]).all(axis=1) & (candidates[:, 2:] <= frame[2:]).all(axis=1)
        # a far label's line runs from its centre to its point: which labels it runs through, and which lines run
        # through it (to be had least); which points and lines it crosses
        label_centres = corner + sizes[k] / 2
        samples = centres[k] + along[None] * (label_centres - centres[k])[:, None]
        through = far * _within(samples, boxes).any(axis=1).sum(axis=1)
        through += _within((lines[:, :1] + along[None] * (lines[:, 1:] - lines[:, :1])).reshape(-1, len(along), 2),
                           candidates).any(axis=1).sum(axis=0)  # fmt: skip
        from_centre = np.broadcast_to(centres[k], label_centres.shape)
        crossed = far * (
            _within(samples, markers[others]).any(axis=1).sum(axis=1)
            + _crossings(from_centre, label_centres, lines[:, 0], lines[:, 1]).sum(axis=1)
        )  # fmt: skip
        # a label nearer to another point than to its own reads as that point's
        reach = _distances(candidates, points)
        crossed += reach[:, others].min(axis=1, initial=np.inf) < reach[:, stacks[k]].min(axis=1)
        cost = distance + _CROSSING * crossed + _THROUGH * through
        free = ~blocked & inside
        if free.any():
            c = np.flatnonzero(free)[np.argmin(cost[free])]
        elif (~blocked).any() and (not last or not inside.any()):  # free outside: the axes must grow
            c = np.flatnonzero(~blocked)[np.argmin(cost[~blocked])]
            box = candidates[c]
            need = np.maximum(need, [frame[0] - box[0], frame[1] - box[1], box[2] - frame[2], box[3] - frame[3]])
        else:  # the last try, and no free position: the least overlap inside
            overlap = _overlaps(candidates, np.vstack([boxes, markers])).sum(axis=1)
            c = np.flatnonzero(inside)[np.argmin(overlap[inside])] if inside.any() else 0
        boxes = np.vstack([boxes, candidates[c]])
        if far[c]:
            lines = np.vstack([lines, [[centres[k], label_centres[c]]]])
        chosen[k] = c
    return chosen, need


def label_extents(ax: Axes) -> list:
    """The window extents of the point labels of `ax` (their texts, without lines), as drawn now."""
    fig = ax.get_figure()
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(t, renderer) for t in ax.texts if isinstance(t, Annotation)]


def plot_deltas(table: pd.DataFrame) -> Figure | None:
    """Δ top-1 vs baseline here against the paper's, one labelled point per row with runs (error bar: the paired
    95% interval), and the line y = x; None where no row has a Δ here (`report_notes` says why).

    `table`: `compare_to_paper(df)`, or `paper_table(df)` (its numbers are in `attrs["comparison"]`). Each protocol
    is its own series, named in the legend. Where some Δ exceeds 20 points (no residual: -77 in the paper), both axes
    are symmetric-log beyond ±1 point, so that the small effects near 0 do not collapse onto one spot.
    """
    comparison = table if "delta_here" in table.columns else table.attrs["comparison"]
    if ablation_deltas(comparison).empty:
        return None
    fig, ax = _figure((6.5, 6.5))
    ax.axhline(0, color="lightgray", lw=0.8)
    ax.axvline(0, color="lightgray", lw=0.8)
    x, y, err, texts, colors = [], [], [], [], []
    for k, (protocol, block) in enumerate(protocol_blocks(comparison)):
        rows = ablation_deltas(block)
        if rows.empty:
            continue
        color = f"C{k % 10}"
        # the error of a delta: its 95% interval, paired by seed, where seeds pair up; else the row's seed std
        half_interval = (rows["paired_high"] - rows["paired_low"]) / 2
        yerr = half_interval.fillna(rows["top1_here_std"]).fillna(0)
        ax.errorbar(rows["delta_paper"], rows["delta_here"], yerr=yerr, capsize=3,
                    fmt=MARKERS[k % len(MARKERS)], color=color, label=protocol or "here")  # fmt: skip
        x += list(rows["delta_paper"])
        y += list(rows["delta_here"])
        err += list(yerr)
        texts += [_short(experiment) for experiment in rows["experiment"]]
        colors += [color] * len(rows)
    ax.axline((0, 0), (1, 1), ls="--", color="gray", lw=1, label="y = x (same effect as in the paper)")
    _legend(fig)
    scale = ""
    if np.nanmax(np.abs([*x, *y])) > 20:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("symlog", linthresh=1)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 10, not 10^1
        scale = ", symmetric log beyond ±1"
    baseline = comparison.loc[comparison["baseline"], "experiment"].iloc[0]
    ax.set_xlabel(f"Δ top-1 vs baseline in the paper (points{scale})")
    ax.set_ylabel(f"Δ top-1 vs baseline here (points{scale})")
    ax.set_title(f"{comparison.attrs.get('table', '')}: effect of each ablation vs {baseline}", fontsize=9)
    place_labels(ax, x, y, texts, colors, yerr=err)  # last: it fixes the layout
    return fig


def point_labels(agg: pd.DataFrame, series: Sequence[str] | None = None) -> list[str]:
    """Labels of configurations (`aggregate_seeds` rows), never their override strings: the short experiment, else
    the LABEL_AXES that vary within a series among the configurations without one ("identity, layernorm"; names
    as they are, other axes as "pool_size=5"; a mixer's argument only where some stage's mixer takes it). Two
    labels of one series that still read the same get the overrides in which their run names differ. `series`: what
    each row is plotted in (default: its protocol)."""
    series = pd.Series(agg["protocol"] if series is None else list(series), index=agg.index).fillna("")
    varying = label_axes(agg, series)
    used = {axis: axis_applies(agg, axis) for axis in varying}
    named = trained_their_rows(agg)  # `experiment=t5_identity mixer=pooling` is not "identity"
    labels = pd.Series([
        _short(run["experiment"]) if named[i]
        else ", ".join(_axis_value(axis, run[axis]) for axis in varying if used[axis][i])
        for i, run in agg.iterrows()
    ], index=agg.index, dtype=object)  # fmt: skip
    for _, same in labels.groupby([series, labels]):
        if len(same) > 1:  # e.g. another learning rate: the override items not common to these runs' names
            items = {i: set(str(agg.at[i, "name"]).split(",")) for i in same.index}
            common = set.intersection(*items.values())
            for i, own in items.items():
                labels[i] = ", ".join(filter(None, [labels[i], ",".join(sorted(own - common))]))
    return list(labels)


def label_axes(agg: pd.DataFrame, series: pd.Series) -> list[str]:
    """The LABEL_AXES that vary within a series among the configurations not labelled by their paper row (a mixer's
    argument: among those where some stage's mixer takes it)."""
    sweep = agg[~trained_their_rows(agg)]
    return [
        axis for axis in LABEL_AXES
        if sweep[axis].where(axis_applies(sweep, axis)).groupby(series[sweep.index]).nunique().gt(1).any()
    ]  # fmt: skip


def _axis_value(axis: str, value: object) -> str:
    value = "—" if pd.isna(value) else value
    return str(value) if axis in _NAMES else f"{axis}={value}"


def plot_accuracy_vs_macs(df: pd.DataFrame) -> Figure | None:
    """Best val top-1 (mean ± std over seeds) against MACs, one labelled point per configuration with completed runs;
    None where no completed run records its MACs (`report_notes` says so).

    `df`: runs from `collect_runs`. A series (colour, marker, named in the legend) per protocol apart from the model:
    more compute, other models, is what this plot compares (a series of one model names it in the legend). Labels:
    `point_labels`. MACs are on a log scale where they span more than a factor of 20 (a small model beside S12).
    """
    agg = aggregate_seeds(df)
    agg = agg[agg["macs"].notna()].reset_index(drop=True)
    if agg.empty:
        return None
    fig, ax = _figure((8, 6))
    title, x, y, err, texts, colors = "Accuracy against compute, runs here", [], [], [], [], []
    agg["series"] = [protocol_label(run, omit=("model",)) for run in agg.to_dict("records")]
    agg["macs_g"], agg["label"] = agg["macs"].astype("float64") / 1e9, point_labels(agg, agg["series"])
    order = agg.groupby("series")["n"].sum().sort_values(ascending=False, kind="stable").index
    for k, name in enumerate(order):
        runs = agg[agg["series"] == name]
        models = runs["model"].nunique()
        legend = runs["protocol"].iloc[0] if models == 1 else f"{name} ({models} models)"
        color = f"C{k % 10}"
        ax.errorbar(runs["macs_g"], runs["top1_mean_pct"], yerr=runs["top1_std_pct"].fillna(0), capsize=3,
                    fmt=MARKERS[k % len(MARKERS)], color=color, label=legend)  # fmt: skip
        x += list(runs["macs_g"])
        y += list(runs["top1_mean_pct"])
        err += list(runs["top1_std_pct"])
        texts += list(runs["label"])
        colors += [color] * len(runs)
    if agg["macs_g"].max() > 20 * agg["macs_g"].min():
        ax.set_xscale("log")
    _legend(fig)
    named = label_axes(agg, agg["series"])
    if named:
        title += f"\npoints: the experiment, else {', '.join(named)}"
    ax.set_xlabel("MACs (G, at the runs' image size)")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title(title, fontsize=9)
    place_labels(ax, x, y, texts, colors, yerr=err)  # last: it fixes the layout
    return fig


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write `fig` as `<path_stem>.png` and `<path_stem>.pdf`; returns both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths
