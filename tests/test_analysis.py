"""Analysis on fake run records, no training: collect, aggregate, paper tables, renderings, plots, CLI, notebooks."""

import asyncio
import inspect
import io
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from conftest import compose_config
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nbclient import NotebookClient

from metaformer_lab.analysis import (
    aggregate_seeds,
    axis_table,
    collect_runs,
    collect_wandb,
    compare_to_paper,
    duplicate_runs,
    paper_table,
    place_labels,
    plot_accuracy_vs_macs,
    plot_deltas,
    problem_runs,
    report_notes,
    save_figure,
    to_csv,
    to_latex,
    to_markdown,
)
from metaformer_lab.analysis.__main__ import main
from metaformer_lab.analysis.collect import MIXER_ARGUMENTS
from metaformer_lab.analysis.plots import label_extents, point_labels
from metaformer_lab.analysis.tables import PAPER_COLUMNS, ROW_AXES, here_columns, protocol_agreement
from metaformer_lab.config import build_model, run_axes
from metaformer_lab.models.mixers import MIXERS
from metaformer_lab.record import RunRecord, write_record

ROOT = Path(__file__).parents[1]
PAPER = pd.read_csv(ROOT / "metaformer_lab" / "analysis" / "paper_results.csv")
NOTEBOOKS = [ROOT / "analysis" / "table5.ipynb", ROOT / "analysis" / "main_table.ipynb"]
# best val top-1 (fractions, as records store them) per experiment and seed
TOP1 = {"t5_baseline": [0.70, 0.72, 0.74], "t5_identity": [0.65, 0.66], "t5_pool5": [0.71], "main_s12": [0.75],
        "main_s24": [0.78, 0.80]}  # fmt: skip
MODEL = dict(zip(PAPER["experiment"], PAPER["model"], strict=True))  # each paper row's own model
# each paper row's axes, as its runs record them (plain types: a record is JSON)
ROW = {
    row["experiment"]: {**{axis: row[axis] for axis in ROW_AXES}, "pool_size": int(row["pool_size"]),
                        "residual": bool(row["residual"]), "mlp": bool(row["mlp"])}
    for row in PAPER.to_dict("records")
}  # fmt: skip
HERE = "shapes 32 px, 20k img, 3 ep"  # the protocol of fake_run's defaults, as a paper table names it
TOP1_HERE, DELTA_HERE, T_HERE, SIGN_HERE = here_columns(HERE)
IMAGENET = dict(data="imagenet", image_size=224, train_images=1_281_167, schedule="300+10 ep", epochs=310)


def fake_run(root: Path, experiment: str | None, seed: int, top1: float | None = None, status: str = "completed",
             error: str | None = None, sweep: str = "demo", epochs: int = 3, mixer: str | None = None,
             finished_at: str = "2025-01-01T00:00:00", *, model: str = "poolformer_s12", data: str = "shapes",
             image_size: int = 32, train_images: int | None = 20_000, schedule: str | None = None,
             norm: str | None = None, params: int = 11_915_176, macs: int = 1_822_700_000,
             lr: float | None = None, curve: Sequence[float] = (), **other_axes: str | int | bool) -> Path:  # fmt: skip
    """A run directory as training leaves it: named by its overrides, with a record and a resolved config.

    The axes (ROW_AXES: `mixer`, `norm`, `pool_size`, ...) are the paper row's of `experiment` (the baseline's
    without one) unless given. `schedule=None`: "<epochs> ep", as training records it; "" for a record older than the
    field. `curve`: top-1 at each validation (`val_history`; none, as in an older record, by default)."""
    given = {axis: value for axis, value in dict(other_axes, mixer=mixer, norm=norm).items() if value is not None}
    row = ROW.get(experiment, ROW["t5_baseline"])
    axes = {**row, **given}
    mixer, norm = axes["mixer"], axes["norm"]
    config = {
        "seed": seed, "experiment": experiment, "sweep": sweep, "resume": None, "logger": {"wandb": False},
        "model": {"name": model}, "mixer": {"name": mixer, "pool_size": axes["pool_size"]}, "norm": {"name": norm},
        "act": {"name": axes["act"]}, "optim": {"epochs": epochs, "lr": lr},
        "data": {"name": data, "image_size": image_size, "train_size": train_images, "num_workers": 0, "seed": 0},
        "trainer": {"devices": 1, "precision": "32"},
    }  # fmt: skip
    # an experiment with other axes (`experiment=t5_identity mixer=pooling`) is another run directory
    overrides = [f"+experiment={experiment}"] if experiment else [f"mixer={mixer}", f"norm={norm}"]
    overrides += [f"{axis}={value}" for axis, value in given.items() if experiment and value != row[axis]]
    overrides += [f"model={model}"] * (model != "poolformer_s12") + [f"data={data}"] * (data != "shapes")
    overrides += [f"optim.lr={lr}"] * (lr is not None) + [f"optim.epochs={epochs}", f"seed={seed}"]
    run_dir = root / sweep / ",".join(overrides)
    write_record(run_dir, RunRecord(
        status=status, error=error, run_dir=str(run_dir), model=model, mixer=mixer,
        mixer_stages=mixer.split(",") if "," in mixer else [mixer] * 4, pool_size=axes["pool_size"], norm=norm,
        act=axes["act"], residual=axes["residual"], mlp=axes["mlp"], seed=seed, data=data,
        image_size=image_size, experiment=experiment, sweep=sweep, params=params, frozen_params=0, macs=macs,
        best_val_top1=top1, best_val_top5=None if top1 is None else top1 + 0.2, final_val_top1=top1, epochs=epochs,
        steps=30 * epochs, finished_at=finished_at, config=config, train_images=train_images,
        schedule=f"{epochs} ep" if schedule is None else schedule,
        val_history=[{"epoch": i, "step": 30 * (i + 1), "top1": c, "top5": c} for i, c in enumerate(curve)],
    ))  # fmt: skip
    return run_dir


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for experiment, accuracies in TOP1.items():
        for seed, top1 in enumerate(accuracies):
            fake_run(root, experiment, seed, top1, model=MODEL[experiment])
    fake_run(root, "t5_noresidual", 0, status="diverged", error="DivergedError: loss is nan at step 12")
    fake_run(root, "t5_relu", 0, status="failed", error="RuntimeError: CUDA out of memory")
    fake_run(root, "t5_relu", 1, status="running", finished_at=None)
    # seed 0 of the baseline again, in another sweep root: the same configuration and seed, finished later
    fake_run(root, "t5_baseline", 0, 0.90, sweep="again", finished_at="2025-02-01T00:00:00")
    (root / "demo" / "corrupt").mkdir()
    (root / "demo" / "corrupt" / "result.json").write_text('{"status": "completed", "best_val')
    return root


@pytest.fixture(scope="module")
def runs(runs_root) -> pd.DataFrame:
    return collect_runs(runs_root)


def test_collect_finds_every_record_with_the_axes_as_columns(runs):
    assert len(runs) == 9 + 3 + 1 + 1  # completed, problems, the duplicate, the corrupt one
    for column in ("model", "mixer", "pool_size", "norm", "act", "residual", "mlp", "seed", "data", "image_size",
                   "experiment", "sweep", "status", "error", "params", "frozen_params", "macs", "best_val_top1",
                   "best_val_top5", "final_val_top1", "epochs", "steps", "wall_time_s", "run_dir", "config_key",
                   "duplicate"):  # fmt: skip
        assert column in runs.columns, column
    assert "config" not in runs.columns and "versions" not in runs.columns
    assert sorted(runs["status"].value_counts().items()) == [
        ("completed", 10), ("diverged", 1), ("failed", 1), ("running", 1), ("unreadable", 1)]  # fmt: skip
    assert runs.loc[runs["experiment"].eq("t5_pool5"), "mixer_stages"].item() == "pooling,pooling,pooling,pooling"


def test_a_corrupt_record_is_a_row_with_its_error(runs):
    bad = runs[runs["status"] == "unreadable"].iloc[0]
    assert bad["error"].startswith("JSONDecodeError") and bad["run_dir"].endswith("corrupt")


def test_collect_of_nothing_has_the_columns(tmp_path):
    empty = collect_runs(tmp_path)
    assert len(empty) == 0 and {"status", "config_key", "best_val_top1"} <= set(empty.columns)


def test_config_key_ignores_seed_and_run_specific_keys_only(tmp_path):
    fake_run(tmp_path, "t5_identity", 0, 0.5, sweep="a")
    fake_run(tmp_path, "t5_identity", 1, 0.5, sweep="b")  # another seed, another sweep: the same configuration
    fake_run(tmp_path, "t5_identity", 0, 0.5, sweep="c", epochs=300)  # longer schedule: another configuration
    fake_run(tmp_path, "t5_baseline", 0, 0.5, sweep="a")  # same model, another paper row: another configuration
    df = collect_runs(tmp_path).set_index(["experiment", "sweep"])["config_key"]
    assert df[("t5_identity", "a")] == df[("t5_identity", "b")]
    assert df[("t5_identity", "c")] != df[("t5_identity", "a")] != df[("t5_baseline", "a")]


def test_duplicates_are_flagged_and_counted_once(runs):
    dups = duplicate_runs(runs)
    assert len(dups) == 2 and set(dups["experiment"]) == {"t5_baseline"} and set(dups["seed"]) == {0}
    assert runs["duplicate"].sum() == 2
    baseline = aggregate_seeds(runs).set_index("experiment").loc["t5_baseline"]
    assert baseline["n"] == 3 and baseline["seeds"] == "0,1,2"  # the copy that finished last counts: 0.90
    assert baseline["top1_mean_pct"] == pytest.approx((90 + 72 + 74) / 3)


def test_aggregate_seeds_gives_mean_std_n_in_percent(runs):
    agg = aggregate_seeds(runs).set_index("experiment")
    assert set(agg.index) == set(TOP1)  # completed runs only
    identity = agg.loc["t5_identity"]
    assert identity["n"] == 2 and identity["top1_mean_pct"] == pytest.approx(65.5)
    assert identity["top1_std_pct"] == pytest.approx(pd.Series([65.0, 66.0]).std())
    assert identity["top5_mean_pct"] == pytest.approx(85.5) and identity["params"] == 11_915_176
    assert agg.loc["t5_pool5", "n"] == 1 and pd.isna(agg.loc["t5_pool5", "top1_std_pct"])


def test_problem_runs_lists_every_run_without_a_result(runs):
    problems = problem_runs(runs)
    assert sorted(problems["status"]) == ["diverged", "failed", "running", "unreadable"]
    assert problems.set_index("status").loc["diverged", "error"].startswith("DivergedError")


def test_table5_without_runs_is_the_paper_with_dashes():
    table = paper_table(collect_runs(), "table5")
    paper = PAPER[PAPER["table"] == "table5"]
    assert len(table) == 18 and list(table["Variant"]) == list(paper["variant"])
    identity = table.set_index("Variant").loc["Pooling → Identity mapping"]
    assert list(table.columns) == PAPER_COLUMNS  # no protocol to name
    assert identity["Top-1 paper (%)"] == "74.3" and identity["Top-1 here (%, mean ± std, n)"] == "—"
    assert identity[PAPER_COLUMNS[6]] == "—" and identity["Δ vs baseline in the paper"] == "-2.9"
    assert identity["Sign as paper"] == "—"
    assert identity["Params (M)"] == "11.9 (paper)" and identity["MACs (G)"] == "1.8 (paper)"
    assert table["Top-1 paper (%)"].astype(float).tolist() == paper["top1"].tolist()


def test_table5_with_runs_has_ours_and_both_deltas(runs):
    table = paper_table(runs, "table5").set_index("Variant")
    assert table.loc["None (PoolFormer-S12)", TOP1_HERE].endswith("(n=3)")
    assert table.loc["Pooling → Identity mapping", TOP1_HERE] == "65.5 ± 0.7 (n=2)"
    assert table.loc["Pooling size 3 → 5", TOP1_HERE] == "71.0 (n=1)"
    assert table.loc["Pooling → Identity mapping", "Params (M)"] == "11.9"  # ours: no "(paper)"
    assert table.loc["Pooling → Identity mapping", "MACs (G)"] == "1.82"
    assert table.loc["GELU → ReLU", TOP1_HERE] == "— (1 failed, 1 running)"
    assert table.loc["Residual connection → None", TOP1_HERE] == "— (1 diverged)"
    numbers = compare_to_paper(runs, "table5").set_index("experiment")
    baseline = (90 + 72 + 74) / 3
    assert numbers.loc["t5_identity", "delta_here"] == pytest.approx(65.5 - baseline)
    assert numbers.loc["t5_identity", "delta_paper"] == pytest.approx(74.3 - 77.2)
    # paired by seed: seeds 0 and 1 have both (65 - 90, 66 - 72); a 95% t interval on 1 degree of freedom
    identity = numbers.loc["t5_identity"]
    assert identity["paired_n"] == 2 and identity["paired_delta"] == pytest.approx(-15.5)
    assert identity["paired_se"] == pytest.approx(9.5)
    assert identity["paired_low"] == pytest.approx(-15.5 - 12.706 * 9.5)
    assert table.loc["Pooling → Identity mapping", DELTA_HERE] == "-15.5 [-136.2, +105.2]"
    assert table.loc["Pooling → Identity mapping", T_HERE] == "-1.6"
    assert table.loc["Pooling → Identity mapping", SIGN_HERE] == "yes"
    assert table.loc["Pooling size 3 → 5", DELTA_HERE] == "-19.0"  # one seed: no interval
    assert table.loc["Pooling size 3 → 5", SIGN_HERE] == "—"  # the paper's 0.0 has no sign
    assert table.loc["None (PoolFormer-S12)", DELTA_HERE] == "baseline"


def test_main_table_deltas_are_vs_s12(runs):
    table = paper_table(runs, "main")
    assert list(table["Variant"]) == [f"PoolFormer-{m}" for m in ("S12", "S24", "S36", "M36", "M48")]
    s24 = table.set_index("Variant").loc["PoolFormer-S24"]
    # paired with the baseline's one seed (78 - 75), each run on its row's model
    assert s24[DELTA_HERE] == "+3.0" and s24["Δ vs baseline in the paper"] == "+3.1" and s24[SIGN_HERE] == "yes"
    assert table.loc[0, DELTA_HERE] == "baseline"


def test_baselines_table_is_the_follow_up_papers_with_our_runs(tmp_path):
    for seed, (identity, caformer) in enumerate([(0.70, 0.80), (0.72, 0.84)]):
        fake_run(tmp_path, "baselines_identityformer_s12", seed, identity, model="identityformer_s12")
        fake_run(tmp_path, "baselines_caformer_s18", seed, caformer, model="caformer_s18")
    fake_run(tmp_path, "baselines_caformer_s18", 2, 0.9, model="caformer_s18", mixer="pooling")  # another ablation
    table = paper_table(collect_runs(tmp_path), "baselines").set_index("Variant")
    assert len(table) == 23 and list(table.index[[0, -1]]) == ["IdentityFormer-S12", "CAFormer-B36"]
    caformer = table.loc["CAFormer-S18"]
    assert (caformer["Top-1 paper (%)"], caformer[TOP1_HERE]) == ("83.6", "82.0 ± 2.8 (n=2)")
    assert caformer[DELTA_HERE].startswith("+11.0 [") and caformer["Δ vs baseline in the paper"] == "+9.0"
    assert table.loc["IdentityFormer-S12", DELTA_HERE] == "baseline"
    assert any("mixer=pooling" in note for note in table.attrs["notes"])


def test_an_experiment_with_two_configurations_in_one_protocol_shows_the_most_seeds_and_says_so(tmp_path):
    fake_run(tmp_path, "t5_identity", 0, 0.30)
    for seed in (0, 1):  # another learning rate: the same protocol, another configuration
        fake_run(tmp_path, "t5_identity", seed, 0.60, lr=1e-3)
    table = paper_table(collect_runs(tmp_path))
    assert table.loc[1, TOP1_HERE] == "60.0 ± 0.0 (n=2)"
    assert len(table.attrs["notes"]) == 1 and "2 configurations" in table.attrs["notes"][0]


def test_protocol_labels_name_data_size_images_model_and_schedule(tmp_path):
    fake_run(tmp_path, "t5_identity", 0, 0.5, model="small", schedule="12 ep x 10% batches")
    fake_run(tmp_path, "t5_identity", 0, 0.5, **IMAGENET)
    fake_run(tmp_path, "t5_pool5", 0, 0.5, epochs=7, schedule="", train_images=None)  # a record older than both
    labels = set(collect_runs(tmp_path)["protocol"])
    assert labels == {"shapes 32 px, 20k img, small, 12 ep x 10% batches",
                      "imagenet 224 px, 1.28M img, poolformer_s12, 300+10 ep",
                      "shapes 32 px, poolformer_s12, 7 ep"}  # fmt: skip


def test_two_protocols_give_a_column_pair_each_named_and_with_its_own_baseline(tmp_path):
    # Table 5 on ImageNet with S12, and `sweep=table5_mixers model=small optim.epochs=1` on shapes
    for seed, (base, identity) in enumerate([(0.770, 0.745), (0.774, 0.741), (0.772, 0.743)]):
        fake_run(tmp_path, "t5_baseline", seed, base, sweep="imagenet", **IMAGENET)
        fake_run(tmp_path, "t5_identity", seed, identity, sweep="imagenet", **IMAGENET)
    fake_run(tmp_path, "t5_baseline", 0, 0.90, sweep="small", model="small", epochs=1)
    fake_run(tmp_path, "t5_identity", 0, 0.80, sweep="small", model="small", epochs=1)
    fake_run(tmp_path, "t5_relu", 0, sweep="small", model="small", epochs=1, status="failed", error="OOM")
    table = paper_table(collect_runs(tmp_path)).set_index("Variant")
    imagenet, small = "imagenet 224 px, 1.28M img, 300+10 ep", "shapes 32 px, 20k img, small, 1 ep"
    assert list(table.columns) == [
        "Ablation", "Params (M)", "MACs (G)", "Top-1 paper (%)", *here_columns(imagenet), *here_columns(small),
        "Δ vs baseline in the paper",
    ]  # most completed runs first; S12 is the rows' own model, so unnamed; "small" is named  # fmt: skip
    assert here_columns(small)[0] == "Top-1 here: shapes 32 px, 20k img, small, 1 ep (%, mean ± std, n)"
    identity = table.loc["Pooling → Identity mapping"]
    assert identity[here_columns(imagenet)[0]] == "74.3 ± 0.2 (n=3)"
    assert identity[here_columns(imagenet)[1]] == "-2.9 [-3.9, -1.9]"  # -2.5, -3.3, -2.9 paired by seed
    assert identity[here_columns(imagenet)[2]] == "-12.6" and identity[here_columns(imagenet)[3]] == "yes"
    assert identity[here_columns(small)[0]] == "80.0 (n=1)" and identity[here_columns(small)[1]] == "-10.0"
    assert table.loc["GELU → ReLU", here_columns(small)[0]] == "— (1 failed)"
    assert table.loc["GELU → ReLU", here_columns(imagenet)[0]] == "—"
    assert any("2 protocols" in note for note in table.attrs["notes"])

    numbers = table.attrs["comparison"]
    assert numbers.attrs["protocols"] == [imagenet, small] and len(numbers) == 2 * 18
    deltas = numbers[numbers["experiment"] == "t5_identity"].set_index("protocol")["delta_here"]
    assert deltas[imagenet] == pytest.approx(74.3 - 77.2) and deltas[small] == pytest.approx(80.0 - 90.0)

    markdown = to_markdown(table.reset_index()).splitlines()
    assert len(markdown) == 2 + 18 and all(line.count("|") == 15 for line in markdown) and small in markdown[0]
    latex = to_latex(table.reset_index())
    assert latex.startswith(r"\begin{tabular}{ll" + "r" * 12 + "}") and r"Top-1 here: shapes 32 px" in latex
    assert all(len(re.findall(r"(?<!\\)&", row)) == 13 for row in latex.splitlines() if row.endswith(r"\\"))
    back = pd.read_csv(io.StringIO(to_csv(table.reset_index())), keep_default_na=False)
    assert list(back.columns) == ["Variant", *table.columns]


def test_the_main_table_names_the_model_only_where_it_is_not_the_rows_own(tmp_path):
    for experiment in ("main_s12", "main_s24"):
        fake_run(tmp_path, experiment, 0, 0.8, model=MODEL[experiment], sweep="paper")
        fake_run(tmp_path, experiment, 0, 0.6, model="small", sweep="small")
    columns = [c for c in paper_table(collect_runs(tmp_path), "main").columns if c.startswith("Top-1 here")]
    assert columns == [here_columns(HERE)[0], here_columns("shapes 32 px, 20k img, small, 3 ep")[0]]


def test_renderings_parse(runs):
    table = paper_table(runs, "table5")
    markdown = to_markdown(table).splitlines()
    assert len(markdown) == 2 + 18 and all(line.count("|") == 11 for line in markdown)
    assert "74.3" in markdown[3] and "Identity mapping" in markdown[3]

    latex = to_latex(table)
    assert latex.startswith(r"\begin{tabular}{") and latex.rstrip().endswith(r"\end{tabular}")
    assert latex.count("{") - latex.count(r"\{") == latex.count("}") - latex.count(r"\}")
    assert "±" not in latex and "Δ" not in latex and "→" not in latex and r"$\pm$" in latex
    rows = [line for line in latex.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 1 + 18 and all(len(re.findall(r"(?<!\\)&", row)) == 9 for row in rows)
    assert latex.count("$") % 2 == 0

    back = pd.read_csv(io.StringIO(to_csv(table)), keep_default_na=False)
    assert list(back.columns) == list(table.columns) and len(back) == 18
    assert back.loc[1, "Ablation"] == "Token mixers" and back.loc[1, "Top-1 paper (%)"] == 74.3


def test_axis_table_for_any_sweep(tmp_path):
    for seed, (pool, identity) in enumerate([(0.5, 0.4), (0.6, 0.4)]):
        fake_run(tmp_path, None, seed, pool, mixer="pooling")
        fake_run(tmp_path, None, seed, identity, mixer="identity")
    table = axis_table(collect_runs(tmp_path))
    assert list(table["mixer"]) == ["identity", "pooling"]
    assert list(table["Top-1 (%, mean ± std, n)"]) == ["40.0 ± 0.0 (n=2)", "55.0 ± 7.1 (n=2)"]
    assert to_latex(table).startswith(r"\begin{tabular}{lrrrr}")  # mixer, params, MACs, top-1, top-5
    assert table.attrs["notes"] == ["protocol of all rows: shapes 32 px, 20k img, poolformer_s12, 3 ep"]


def test_two_proxies_side_by_side_say_which_rows_go_the_papers_way_at_two_standard_errors(tmp_path, capsys):
    # two CPU proxies of Table 5: the relational task (shapes) and Fashion-MNIST (idx), 3 seeds each
    scores = {  # experiment: (shapes top-1 per seed, idx top-1 per seed)
        "t5_baseline": ((0.97, 0.98, 0.97), (0.890, 0.885, 0.888)),
        "t5_identity": ((0.30, 0.22, 0.26), (0.899, 0.896, 0.897)),  # paper -2.9: shapes agrees, idx opposite
        "t5_nonorm": ((0.11, 0.10, 0.11), (0.870, 0.890, 0.881)),  # paper -31.1: idx -2.0, +0.5, -0.7: within 2 SE
        "t5_pool5": ((0.95, 0.96, 0.94), (0.880, 0.880, 0.880)),  # paper 0.0: no sign to agree with
    }
    for experiment, (shapes, idx) in scores.items():
        for seed in range(3):
            fake_run(tmp_path, experiment, seed, shapes[seed], sweep="relational", model="tiny2x2", epochs=16)
            fake_run(tmp_path, experiment, seed, idx[seed], sweep="fmnist", model="tiny", data="idx", epochs=8,
                     train_images=60_000)  # fmt: skip
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr()
    relational, fmnist = "shapes 32 px, 20k img, tiny2x2, 16 ep", "idx 32 px, 60k img, tiny, 8 ep"
    table = protocol_agreement(paper_table(collect_runs(tmp_path)).attrs["comparison"]).set_index("Variant")
    pairs = [list(table.columns[i : i + 2]) for i in (2, 4)]  # a pair per protocol, most completed runs first
    assert list(table.columns[:2]) == ["Ablation", "Δ paper"] and sorted(pairs) == [
        [f"Δ here (Δ / SE): {fmnist}", f"Sign at > 2 SE: {fmnist}"],
        [f"Δ here (Δ / SE): {relational}", f"Sign at > 2 SE: {relational}"]]  # fmt: skip
    identity, nonorm = table.loc["Pooling → Identity mapping"], table.loc["Modified Layer Normalization → None"]
    assert identity[f"Sign at > 2 SE: {relational}"] == "agrees" and identity[f"Sign at > 2 SE: {fmnist}"] == "opposite"
    assert identity[f"Δ here (Δ / SE): {fmnist}"].startswith("+1.0 (+")
    assert nonorm[f"Sign at > 2 SE: {fmnist}"] == "within 2 SE" and nonorm["Δ paper"] == "-31.1"
    assert table.loc["Pooling size 3 → 5", f"Sign at > 2 SE: {fmnist}"] == "—"  # the paper's Δ is 0.0
    assert table.loc["GELU → ReLU", f"Δ here (Δ / SE): {fmnist}"] == "—"  # no runs
    assert "The protocols side by side" in printed.out and "| Sign at > 2 SE: idx 32 px" in printed.out
    assert (f"note: {fmnist}: 0 of 2 rows agree in sign with the paper at > 2 SE; opposite at > 2 SE: "
            "Pooling → Identity mapping; Spearman rank correlation") in printed.err  # fmt: skip
    assert f"note: {relational}: 2 of 2 rows agree" in printed.err
    out = tmp_path / "tables"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    side_by_side = printed.out.split("The protocols side by side")[1].split("\n\n", 1)[1]
    assert (out / "protocols.md").read_text() == side_by_side and (out / "protocols.csv").is_file()
    latex = (out / "protocols.tex").read_text()
    assert "Sign at $>$ 2 SE" in latex and ">" not in latex.replace("$>$", "")  # not ¿ in LaTeX's text mode
    assert main([str(tmp_path / "relational"), "--out", str(out)]) == 0  # one protocol: no side by side
    assert not (out / "protocols.md").exists() and (out / "table.md").is_file()
    assert (out / "comparison.csv").is_file() and (out / "deltas.png").is_file()
    assert main([str(tmp_path / "relational"), "--table", "axes", "--out", str(out)]) == 0  # not a paper table
    assert not (out / "comparison.csv").exists() and not (out / "deltas.png").exists()


def test_runs_on_two_mnist_format_data_sets_are_never_seeds_of_one_configuration(tmp_path):
    # MNIST and Fashion-MNIST: the same sizes, any data.root (left out of config_key); the digest tells them apart
    for name, digest in (("mnist", "aaaaaaaaaaaa"), ("fashion", "bbbbbbbbbbbb")):
        run_dir = fake_run(tmp_path / name, "t5_identity", 0, 0.9, data="idx", train_images=60_000)
        record = json.loads((run_dir / "result.json").read_text())
        (run_dir / "result.json").write_text(json.dumps({**record, "data_digest": digest}))
    runs = collect_runs(tmp_path)
    assert runs["config_key"].nunique() == 2 and not runs["duplicate"].any()
    assert sorted(runs["data_digest"]) == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]


def test_a_budget_that_ends_while_a_configuration_still_learns_is_named(tmp_path, capsys):
    # the gain of top-1 over the last two validations, mean over the seeds with a learning curve
    fake_run(tmp_path, "t5_baseline", 0, 0.80, curve=(0.5, 0.7, 0.795, 0.80, 0.80))  # +0.5
    fake_run(tmp_path, "t5_baseline", 1, 0.80, curve=(0.5, 0.7, 0.79, 0.79, 0.80))  # +1.0
    fake_run(tmp_path, "t5_baseline", 2, 0.80)  # an older record: no curve, left out
    runs = collect_runs(tmp_path)
    assert sorted(runs["late_gain_pct"].dropna().round(6)) == [0.5, 1.0]
    assert main([str(tmp_path)]) == 0
    protocol = "shapes 32 px, 20k img, poolformer_s12, 3 ep"  # the configurations' own, model included
    assert (
        f"note: {protocol}: no configuration was still learning at the end: each of 1 gained under 1 point of "
        "top-1 over the last 2 validations, mean over seeds (most: baseline +0.8)"
    ) in capsys.readouterr().err
    for seed, curve in enumerate([(0.1, 0.2, 0.3, 0.5), (0.1, 0.2, 0.3, 0.4)]):  # +30 and +20 points
        fake_run(tmp_path, "t5_identity", seed, curve[-1], curve=curve)
    assert main([str(tmp_path)]) == 0
    assert (f"note: {protocol}: still learning at the end (1 point or more of top-1 over the last 2 validations, "
            "mean over seeds): identity +25.0; a longer budget may change these rows") in capsys.readouterr().err


def test_axis_table_with_two_protocols_has_a_protocol_column(tmp_path):
    for mixer in ("pooling", "identity"):
        fake_run(tmp_path, None, 0, 0.5, mixer=mixer, epochs=1)
        for seed in (0, 1):
            fake_run(tmp_path, None, seed, 0.6, mixer=mixer, epochs=12)
    table = axis_table(collect_runs(tmp_path))
    assert list(table.columns[:2]) == ["Protocol", "mixer"] and not table.attrs["notes"]
    twelve, one = "shapes 32 px, 20k img, poolformer_s12, 12 ep", "shapes 32 px, 20k img, poolformer_s12, 1 ep"
    assert list(table["Protocol"]) == [twelve, twelve, one, one]  # grouped, most completed runs first
    assert list(table["mixer"]) == ["identity", "pooling", "identity", "pooling"]
    markdown = to_markdown(table)
    assert markdown.count(twelve) == 1 and markdown.count(one) == 1  # named once per group
    assert to_latex(table).startswith(r"\begin{tabular}{llrrrr}") and to_latex(table).count(r"\midrule") == 2
    # a shown axis is not repeated in the protocol
    assert set(axis_table(collect_runs(tmp_path), ["model", "mixer"])["Protocol"]) == {
        "shapes 32 px, 20k img, 12 ep", "shapes 32 px, 20k img, 1 ep"}  # fmt: skip


def test_plots_save_png_and_pdf(runs, tmp_path):
    for name, fig in (("deltas", plot_deltas(paper_table(runs))), ("macs", plot_accuracy_vs_macs(runs))):
        png, pdf = save_figure(fig, tmp_path / "plots" / name)
        assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"


def test_a_plot_with_nothing_to_show_is_none_and_the_notes_say_why(tmp_path):
    nothing = collect_runs()
    assert plot_deltas(compare_to_paper(nothing)) is None and plot_accuracy_vs_macs(nothing) is None
    assert report_notes(nothing, paper_table(nothing)) == ["no completed run yet: nothing to plot"]
    fake_run(tmp_path, "t5_identity", 0, 0.6, macs=None)  # a row without its baseline, and no MACs recorded
    runs = collect_runs(tmp_path)
    table = paper_table(runs)
    assert plot_deltas(table) is None and plot_accuracy_vs_macs(runs) is None
    assert report_notes(runs, table) == [
        "no Δ to plot: no row has completed runs of a protocol in which the baseline (t5_baseline) has some",
        "no completed run records its MACs: no plot of accuracy against compute",
    ]  # fmt: skip


def _assert_readable(fig) -> None:
    """The point labels of `fig` overlap neither each other nor the axes' edges: all lie inside the axes."""
    ax = fig.axes[0]
    boxes = label_extents(ax)
    assert boxes
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[:i] if a.overlaps(b)]
    assert not overlapping
    for box in boxes:
        assert ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and ax.bbox.y0 <= box.y0 and box.y1 <= ax.bbox.y1
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1


def _label_lines(fig) -> list[str]:
    """The point labels of `fig`, one per point: points whose markers overlap share a label, a line each."""
    return [line for text in fig.axes[0].texts for line in text.get_text().split("\n")]


@pytest.fixture(scope="module")
def two_protocols(tmp_path_factory) -> pd.DataFrame:
    """Table 5 on ImageNet with S12 and on shapes with the small model, and a mixer x norm sweep without experiment."""
    root = tmp_path_factory.mktemp("two_protocols")
    table5 = PAPER[PAPER["table"] == "table5"]
    for k, row in enumerate(table5.itertuples()):
        cost = dict(params=int(row.params_verified_m * 1e6), macs=int(row.macs_fvcore_g * 1e9))
        fake_run(root, row.experiment, 0, max(row.top1 - 0.3 * (k % 3), 0.1) / 100, sweep="imagenet", **cost,
                 **IMAGENET)  # fmt: skip
        small = dict(params=cost["params"] // 10, macs=cost["macs"] // 100)
        fake_run(root, row.experiment, 0, 0.8 + (row.top1 - 77) / 400, sweep="small", model="small", **small)
    for i, mixer in enumerate(("pooling", "identity", "attention")):
        for j, norm in enumerate(("layernorm", "batchnorm")):
            fake_run(root, None, 0, 0.7 + 0.03 * i - 0.02 * j, sweep="sweep", model="small", mixer=mixer, norm=norm,
                     params=1_200_000, macs=18_000_000 + 3_000_000 * i)  # fmt: skip
    return collect_runs(root)


def test_accuracy_vs_macs_labels_the_varying_axes_readably(two_protocols):
    fig = plot_accuracy_vs_macs(two_protocols)
    texts = _label_lines(fig)
    sweep = {f"{m}, {n}" for m in ("pooling", "identity", "attention") for n in ("layernorm", "batchnorm")}
    assert sweep <= set(texts) and texts.count("identity") == 2  # t5_identity in each protocol
    assert not [t for t in texts if "=" in t or "optim" in t]  # never the override string
    assert len(texts) == 2 * 18 + 6
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # most runs first: the sweep is on shapes
    assert legend == ["shapes 32 px, 20k img, small, 3 ep", "imagenet 224 px, 1.28M img, poolformer_s12, 300+10 ep"]
    _assert_readable(fig)


def test_deltas_are_a_series_per_protocol_labelled_readably(two_protocols):
    fig = plot_deltas(paper_table(two_protocols))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[1:] == ["imagenet 224 px, 1.28M img, 300+10 ep", "shapes 32 px, 20k img, small, 3 ep"]
    assert len(_label_lines(fig)) == 2 * 17  # every row but the baseline, per protocol
    _assert_readable(fig)


def test_points_whose_markers_overlap_share_a_label_top_to_bottom():
    fig = Figure(figsize=(4, 3), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, y = [1.0, 1.0, 1.0, 2.0], [50.0, 50.02, 49.98, 10.0]
    ax.plot(x, y, "o")
    place_labels(ax, x, y, ["middle", "top", "bottom", "alone"])
    assert sorted(t.get_text() for t in ax.texts) == ["alone", "top\nmiddle\nbottom"]
    _assert_readable(fig)


def test_every_paper_row_names_its_experiments_model():
    for row in PAPER.itertuples():
        assert f"override /model: {row.model}" in (ROOT / "conf" / "experiment" / f"{row.experiment}.yaml").read_text()


def test_every_paper_rows_axes_are_its_experiments():
    # the config is the truth: a row's axes in paper_results.csv are those `python run.py experiment=<name>` records
    written = pd.read_csv(ROOT / "metaformer_lab" / "analysis" / "paper_results.csv", dtype=str, keep_default_na=False)
    for row in written.to_dict("records"):
        cfg = compose_config(f"experiment={row['experiment']}", "data.root=/x")
        axes = run_axes(cfg, build_model(cfg, 1000, device="meta"))
        expected = {axis: str(axes[axis]).lower() if isinstance(axes[axis], bool) else str(axes[axis])
                    for axis in ROW_AXES}  # fmt: skip
        assert {axis: row[axis] for axis in ROW_AXES} == expected, row["experiment"]


def test_a_run_of_another_ablation_is_left_out_of_the_row_and_noted(tmp_path):
    fake_run(tmp_path, "t5_identity", 0, 0.60)
    fake_run(tmp_path, "t5_identity", 0, 0.90, mixer="pooling")  # `run.py experiment=t5_identity mixer=pooling`
    fake_run(tmp_path, "t5_identity", 1, 0.90, mixer="pooling")
    fake_run(tmp_path, "t5_pool5", 0, 0.90, pool_size=3, norm="layernorm")
    fake_run(tmp_path, "t5_ppaa", 0, 0.81)  # per-stage mixers, and a per-stage residual in another run below
    fake_run(tmp_path, "t5_nomlp", 0, 0.05, status="failed", error="OOM", residual="true,true,false,true")
    runs = collect_runs(tmp_path)
    assert runs["residual"].tolist().count("true") == 5  # the per-stage run makes the column strings
    numbers = compare_to_paper(runs).set_index("experiment")
    assert numbers.loc["t5_identity", "n"] == 1 and numbers.loc["t5_identity", "top1_here"] == pytest.approx(60.0)
    assert numbers.loc["t5_pool5", "n"] == 0 and numbers.loc["t5_ppaa", "n"] == 1
    assert numbers.loc["t5_nomlp", "problems"] == ""  # not this row's run, so not this row's failure
    assert numbers.attrs["notes"] == [
        "t5_identity: 2 runs left out: trained mixer=pooling, the row is mixer=identity",
        "t5_nomlp: 1 run left out: trained residual=true,true,false,true, the row is residual=true",
        "t5_pool5: 1 run left out: trained pool_size=3, norm=layernorm, the row is pool_size=5, "
        "norm=modified_layernorm",
    ]  # fmt: skip
    assert paper_table(runs).set_index("Variant").loc["Pooling → Identity mapping", TOP1_HERE] == "60.0 (n=1)"


def test_cli_writes_the_table_and_its_files(runs_root, tmp_path, capsys):
    assert main([str(runs_root), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "| Token mixers" in out and "Identity mapping" in out
    assert "diverged" in err and "JSONDecodeError" in err and "Duplicates" in err
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"table.md", "table.tex", "table.csv", "runs.csv", "comparison.csv", "deltas.png", "deltas.pdf",
            "accuracy_vs_macs.png", "accuracy_vs_macs.pdf"} <= files  # fmt: skip
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 14

    assert main([str(runs_root), "--table", "main", "--format", "csv"]) == 0
    assert len(pd.read_csv(io.StringIO(capsys.readouterr().out))) == 5


def test_cli_writes_no_plot_with_nothing_to_show_and_says_so(tmp_path, capsys):
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    for mixer in ("pooling", "identity"):  # a sweep of no paper row: no Δ to plot
        fake_run(sweep, None, 0, 0.5, mixer=mixer)
    out.mkdir()
    (out / "deltas.png").write_bytes(b"an earlier call's plot")
    assert main([str(sweep), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert {"accuracy_vs_macs.png", "accuracy_vs_macs.pdf"} <= {p.name for p in out.iterdir()}
    assert not (out / "deltas.png").exists() and not (out / "deltas.pdf").exists()
    assert "note: no completed run has the experiment of a row of this table, so no Δ to plot; for other sweeps use " \
           "--table axes" in err  # fmt: skip
    assert "not written, nothing to plot (see the notes): deltas.png, deltas.pdf\n" in err

    failed = tmp_path / "failed"  # no completed run: no plot at all
    fake_run(failed, "t5_baseline", 0, status="failed", error="RuntimeError: out of memory")
    assert main([str(failed), "--table", "axes", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: no completed run yet: nothing to plot" in err
    assert "not written, nothing to plot (see the notes): accuracy_vs_macs.png, accuracy_vs_macs.pdf\n" in err
    assert not [p for p in out.iterdir() if p.suffix in (".png", ".pdf")]


def test_cli_names_an_unknown_axis_and_the_valid_ones(tmp_path, capsys):
    fake_run(tmp_path, None, 0, 0.5, mixer="pooling")
    assert main([str(tmp_path), "--table", "axes", "--axis", "mixr"]) == 2
    assert "error: --axis mixr: not an axis of the records; did you mean mixer? valid: model, mixer," in \
        capsys.readouterr().err  # fmt: skip


def test_cli_with_no_runs_prints_the_paper(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "metaformer_lab.analysis", str(tmp_path / "none"), "--format", "latex"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert r"\begin{tabular}" in result.stdout and "74.3" in result.stdout and "is not a directory" in result.stderr


def test_wandb_offline_fails_clearly_and_runs_read_into_the_schema(monkeypatch):
    class NoNetwork:
        def __init__(self):
            raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=NoNetwork))
    with pytest.raises(RuntimeError, match="cannot reach wandb"):
        collect_wandb("me/metaformer")
    assert main(["--wandb", "me/metaformer"]) == 2

    run = types.SimpleNamespace(
        id="abc", url="https://wandb.ai/me/metaformer/runs/abc", state="finished",
        config={"model": "small", "mixer": "identity", "seed": 1, "experiment": "t5_identity", "params": 5,
                "config": {"seed": 1, "experiment": "t5_identity", "data": {"image_size": 32}},
                "data_digest": "abcdef012345"},
        summary={"params": 5, "macs": 7, "best_val_top1": 0.5, "status": "completed",
                 "val_history": [{"epoch": e, "step": e, "top1": t, "top5": t} for e, t in enumerate((.3, .4, .5))]},
    )  # fmt: skip
    api = types.SimpleNamespace(runs=lambda path: [run])
    df = collect_wandb("me/metaformer", api=api)
    assert list(df.columns[: len(collect_runs().columns)]) == list(collect_runs().columns)
    row = df.iloc[0]
    assert (row["status"], row["mixer"], row["seed"], row["image_size"], row["macs"]) == (
        "completed", "identity", 1, 32, 7)  # fmt: skip
    assert row["data_digest"] == "abcdef012345" and row["late_gain_pct"] == pytest.approx(20.0)
    assert paper_table(df).loc[1, "Top-1 here: 32 px, small (%, mean ± std, n)"] == "50.0 (n=1)"


def test_analysis_imports_no_training_code():
    code = (
        "import sys, metaformer_lab.analysis, metaformer_lab.analysis.__main__\n"
        "bad = ('lightning', 'hydra', 'omegaconf', 'torch', 'wandb', 'metaformer_lab.train', 'metaformer_lab.training',"
        " 'metaformer_lab.config', 'metaformer_lab.models')\n"
        "print([m for m in sys.modules if m.startswith(bad)])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebooks_run_headless_and_show_the_commands_notes(runs_root, tmp_path):
    """Table 5 on runs of its rows; the main table on a sweep of none of its rows, which has nothing to compare."""
    sweep = tmp_path / "sweep"
    for mixer in ("pooling", "identity"):
        fake_run(sweep, None, 0, 0.5, mixer=mixer)
    # and Table 5 on both CPU proxies' committed records: the protocols side by side
    roots, tables = [runs_root, sweep, ROOT / "analysis" / "records" / "table5_proxies"], ["table5", "main", "table5"]
    notebooks = [nbformat.read(path, as_version=4) for path in [*NOTEBOOKS, NOTEBOOKS[0]]]

    async def run_all():  # both kernels at once: their start-up is most of the time
        where = {"metadata": {"path": str(ROOT / "analysis")}}  # the cwd of a notebook opened in Jupyter
        clients = [NotebookClient(nb, timeout=120, kernel_name="python3", resources=where) for nb in notebooks]
        await asyncio.gather(*(client.async_execute(env={**os.environ, "METAFORMER_RUNS": str(root)})
                               for client, root in zip(clients, roots, strict=True)))  # fmt: skip

    asyncio.run(run_all())
    for nb, root, table in zip(notebooks, roots, tables, strict=True):
        text = json.dumps([cell.get("outputs", []) for cell in nb.cells])
        assert "run records under" in text and "image/png" in text
        runs = collect_runs(root)
        printed = [line for output in nb.cells[2].outputs if output.get("name") == "stdout"
                   for line in output.text.splitlines()]  # fmt: skip
        assert printed == [f"note: {note}" for note in report_notes(runs, paper_table(runs, table))]
    assert "Identity mapping" in json.dumps(notebooks[0].cells[2].outputs)
    assert "PoolFormer-S24" in json.dumps(notebooks[1].cells[2].outputs)
    assert "no completed run has the experiment of a row of this table" in json.dumps(notebooks[1].cells[2].outputs)
    assert not notebooks[1].cells[6].outputs  # no Δ: no plot
    assert not notebooks[0].cells[4].outputs  # one protocol: nothing side by side
    side_by_side = json.dumps(notebooks[2].cells[4].outputs)
    assert "Sign at > 2 SE: idx 32 px" in side_by_side and "Spearman rank correlation" in side_by_side


def test_axes_that_vary_by_stage_are_kept_as_strings(tmp_path):
    uniform = RunRecord(status="completed", experiment=None, seed=0, residual=True, pool_size=3, best_val_top1=0.5,
                        best_val_top5=0.9, config={"a": 1})  # fmt: skip
    per_stage = RunRecord(status="completed", experiment=None, seed=0, residual="true,true,false,true",
                          pool_size="3,5,3,3", best_val_top1=0.4, best_val_top5=0.8, config={"a": 2})  # fmt: skip
    write_record(tmp_path / "uniform", uniform)
    write_record(tmp_path / "per_stage", per_stage)
    df = collect_runs(tmp_path)
    assert sorted(df["residual"]) == ["true", "true,true,false,true"]
    assert sorted(df["pool_size"]) == ["3", "3,5,3,3"]
    assert len(aggregate_seeds(df)) == 2 and len(axis_table(df, axis="residual")) == 2


def test_a_point_is_named_after_its_experiment_only_if_it_trained_that_row(tmp_path):
    from metaformer_lab.analysis.plots import point_labels

    fake_run(tmp_path, "t5_identity", 0, 0.6)
    fake_run(tmp_path, "t5_identity", 0, 0.7, mixer="pooling")  # the identity row's name, another mixer
    fake_run(tmp_path, None, 0, 0.5, mixer="dwconv")
    agg = aggregate_seeds(collect_runs(tmp_path))
    labels = dict(zip(agg["top1_mean_pct"].round(), point_labels(agg), strict=True))
    assert labels[60] == "identity" and labels[70] == "pooling" and labels[50] == "dwconv"


def test_mixer_arguments_are_those_the_mixer_classes_take():
    taken = {
        argument: {name for name in MIXERS.names() if argument in inspect.signature(MIXERS.get(name)).parameters}
        for argument in MIXER_ARGUMENTS
    }  # fmt: skip
    assert taken == {argument: set(mixers) for argument, mixers in MIXER_ARGUMENTS.items()}


def test_a_mixers_argument_is_blank_where_no_stage_takes_it(tmp_path):
    configurations = [("pooling", 3, 3, 32), ("pooling", 5, 3, 32), ("identity", 5, 3, 32), ("dwconv", 3, 5, 32),
                      ("sepconv", 3, 7, 32), ("pooling,pooling,attention,attention", 3, 3, 64)]  # fmt: skip
    for k, (mixer, pool_size, kernel_size, head_dim) in enumerate(configurations):
        arguments = dict(pool_size=pool_size, kernel_size=kernel_size, head_dim=head_dim)
        write_record(tmp_path / str(k), RunRecord(status="completed", mixer=mixer, pool_size=pool_size, seed=0,
                                                  best_val_top1=0.5 + k / 100, best_val_top5=0.9, macs=10**9,
                                                  config={"mixer": {"name": mixer, **arguments}}))  # fmt: skip
    runs = collect_runs(tmp_path)
    # head_dim 64 of the one attention model against 32 of models without attention: it does not vary
    assert [c for c in axis_table(runs).columns if c.islower()] == ["mixer", "pool_size", "kernel_size"]
    axes = ["mixer", "pool_size", "kernel_size", "head_dim"]
    assert sorted(map(tuple, axis_table(runs, axes)[axes].to_numpy())) == [
        ("dwconv", "", "5", ""), ("identity", "", "", ""), ("pooling", "3", "", ""), ("pooling", "5", "", ""),
        ("pooling,pooling,attention,attention", "3", "", "64"), ("sepconv", "", "7", ""),
    ]  # fmt: skip
    assert "identity" in point_labels(aggregate_seeds(runs))  # not "identity, pool_size=5, kernel_size=3, ..."
    # an identity model's pool_size differs from the pooling one's, but means nothing: the axis does not vary
    pooling_or_identity = runs[runs["mixer"].eq("identity") | (runs["mixer"].eq("pooling") & runs["pool_size"].eq(3))]
    assert [c for c in axis_table(pooling_or_identity).columns if c.islower()] == ["mixer"]
