"""The CPU proxy of Table 5: its sweep, one recipe for every row, and the statistics its table reports."""

import math

import pandas as pd
import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf
from test_analysis import fake_run

from metaformer_lab.analysis import collect_runs, paper_results, paper_table
from metaformer_lab.analysis.__main__ import main as analysis_main
from metaformer_lab.analysis.stats import paired_difference, spearman, t975
from metaformer_lab.config import build_model, run_axes
from metaformer_lab.plan import compose_job, expand_sweep

ROWS = list(paper_results("table5")["experiment"])
RECIPE_GROUPS = ("data", "optim", "trainer", "logger")  # what every proxy row must share


def test_t975_is_students_quantile():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(40) == pytest.approx(2.021, abs=1e-3) and t975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError):
        t975(0)


def test_paired_difference_pairs_seeds_and_leaves_out_the_unpaired():
    row = pd.Series({0: 70.0, 1: 72.0, 2: 71.0, 5: 10.0})  # seed 5 has no baseline run
    baseline = pd.Series({0: 75.0, 1: 76.0, 2: 77.0, 3: 90.0})
    paired = paired_difference(row, baseline)
    differences = [-5.0, -4.0, -6.0]
    se = pd.Series(differences).std() / math.sqrt(3)
    assert paired.n == 3 and paired.mean == pytest.approx(-5.0) and paired.se == pytest.approx(se)
    assert (paired.low, paired.high) == pytest.approx((-5.0 - 4.303 * se, -5.0 + 4.303 * se))
    assert paired.t == pytest.approx(-5.0 / se)
    one = paired_difference(pd.Series({0: 1.0}), baseline)
    assert one.n == 1 and one.mean == -74.0 and math.isnan(one.low) and math.isnan(one.t)
    assert paired_difference(pd.Series({9: 1.0}), baseline).n == 0


def test_spearman_ranks_with_ties_averaged():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a * 10 - 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    # ranks [1, 2, 3, 4, 5] against [1.5, 1.5, 3, 5, 4]: Pearson of the ranks
    tied = pd.Series([0.0, 0.0, 7.0, 9.0, 8.0])
    assert spearman(a, tied) == pytest.approx(pd.Series([1, 2, 3, 4, 5.0]).corr(pd.Series([1.5, 1.5, 3, 5, 4])))
    assert math.isnan(spearman(a[:2], a[:2]))


def test_the_table_reports_the_rank_correlation_with_the_paper(tmp_path):
    paper = paper_results("table5").set_index("experiment")["top1"]
    for experiment in ("t5_baseline", "t5_identity", "t5_nonorm", "t5_noresidual", "t5_ppaa"):
        for seed in (0, 1):
            # the paper's order, except that identity and no-norm swap places
            top1 = {"t5_identity": 46.1, "t5_nonorm": 74.3}.get(experiment, paper[experiment]) + seed
            fake_run(tmp_path, experiment, seed, top1 / 100, model="tiny2x2")
    notes = paper_table(collect_runs(tmp_path)).attrs["notes"]
    rho = 1 - 6 * (1 + 1) / (5 * (25 - 1))  # two ranks off by one
    assert f"shapes 32 px, 20k img, tiny2x2, 3 ep: Spearman rank correlation of top-1 here with the paper's over 5 " \
           f"rows: {rho:.2f}" in notes


PROXIES = {"table5": ("tiny2x2", "shapes", []),  # proxy: (model, data, what the sweep needs on its command line)
           "table5_fmnist": ("tiny", "idx", ["data.root=/usr/share/datasets/fashion-mnist"])}


@pytest.mark.parametrize("proxy", PROXIES)
def test_every_row_on_the_proxy_keeps_its_axes_and_shares_one_recipe(proxy):
    model_name, data_name, _ = PROXIES[proxy]
    recipes = set()
    for experiment in ROWS:
        paper_row = compose_config(f"experiment={experiment}", "data=shapes")
        proxy_row = compose_config(f"experiment={experiment}", f"proxy={proxy}")
        assert proxy_row.model.name == model_name and proxy_row.data.name == data_name
        recipe = {group: OmegaConf.to_container(proxy_row[group]) for group in RECIPE_GROUPS}
        model = OmegaConf.to_container(proxy_row.model)
        recipe["model"] = {key: value for key, value in model.items() if key not in ("residual", "mlp")}
        recipes.add(repr(recipe))
        proxy_axes = run_axes(proxy_row, build_model(proxy_row, num_classes=10))
        paper_axes = run_axes(paper_row, build_model(paper_row, num_classes=10))
        assert proxy_axes.pop("model") == model_name and paper_axes.pop("model") == "poolformer_s12"
        assert proxy_axes.pop("data") == data_name and paper_axes.pop("data") == "shapes"
        assert proxy_axes == paper_axes, experiment
    assert len(recipes) == 1  # no per-row tuning: the ImageNet recipe's batch 1024 of the hybrids is gone too


@pytest.mark.parametrize("proxy", PROXIES)
def test_the_proxy_sweep_runs_every_row_in_directories_of_its_own(proxy):
    sweep, (_, _, given) = f"{proxy}_proxy", PROXIES[proxy]
    jobs = expand_sweep([f"sweep={sweep}", "seed=0,1,2", *given])
    assert len(jobs) == 3 * 18
    experiments = {next(o for o in job if o.startswith("experiment=")).split("=")[1] for job in jobs}
    assert experiments == set(ROWS)
    cfg, run_dir, _ = compose_job(jobs[0])
    assert cfg.proxy == proxy and cfg.sweep_name == sweep
    root = "".join(f"{o.replace('/', '_')}," for o in given)  # the command line's own keys name the directory too
    assert run_dir == f"runs/{root}experiment=t5_baseline,proxy={proxy},seed=0"  # not the ImageNet row's directory


RECORDS = ROOT / "analysis" / "records" / "table5_proxies"  # both proxy sweeps' records, 3 seeds each


def test_the_readme_tables_of_both_proxies_are_what_the_analysis_prints_from_the_committed_records(capsys):
    assert analysis_main([str(RECORDS)]) == 0
    printed = capsys.readouterr()
    runs = collect_runs(RECORDS)
    assert len(runs) == 2 * 18 * 3 and (runs["status"] == "completed").all()
    assert sorted(runs["sweep"].unique()) == ["table5_fmnist_proxy", "table5_proxy"]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Table 5 on a laptop: two proxies")[1].split("\n## ")[0]
    for block in printed.out.strip().split("\n\n"):  # the full table, the title, the side-by-side table
        assert block in section
    notes = [line for line in printed.err.splitlines() if line.startswith("note: ")]
    assert len(notes) >= 3 and all(note in section for note in notes)  # rank correlations, learning at the end
