"""``recbench leaderboard`` and ``recbench compare``.

- ``leaderboard``: mean ± sample standard deviation over seeds per (dataset, protocol, profile,
  model config), the best mean per column in bold, written to ``results/LEADERBOARD.md`` and as bar
  charts with error bars to ``results/plots/``. Rows are only ever compared within one dataset,
  protocol and profile.
- ``compare``: places a new run (an existing run id, or a model config that is trained now through
  the runner) among the stored rows of the same dataset/protocol/profile, with paired tests on the
  per-case NDCG@10 and Recall@10 against each stored model: a paired t-test and a paired bootstrap
  (10,000 resamples, seeded), the mean difference and Cohen's d_z (mean difference / standard
  deviation of the differences).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars

# Only torch-free modules at import time: `recbench leaderboard` must start in well under two
# seconds, and benchmark.run (torch, Lightning) alone takes several. tests/test_cli.py checks this.
from benchmark.store import atomic_write_text, device_slug, read_rows

BOARD_COLUMNS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr@10")
# Rows are only ever averaged or ranked within one dataset, protocol, profile and device: the quick
# profile has a wall-clock budget, so the same config reaches different epochs on different hardware.
GROUP_COLUMNS = ("dataset", "protocol", "profile", "device")


def load_results(results_dir: Path) -> polars.DataFrame:
    frames = []
    for path in sorted(results_dir.glob("*.csv")):
        rows = read_rows(path)
        if rows:
            frames.append(polars.DataFrame(rows))
    if not frames:
        raise FileNotFoundError(f"no result CSVs in {results_dir}; run `recbench bench` first")
    table = polars.concat(frames, how="diagonal")
    # Metric columns are exactly those named `<metric>@<k>[...]` (benchmark.run.METRIC_COLUMNS and
    # their `_excl` twins); matching the name keeps this module free of torch.
    metrics = [column for column in table.columns if "@" in column]
    numeric = [*metrics, "train_seconds", "test_users_per_second", "parameters", "seconds_per_epoch"]
    return table.with_columns(polars.col(c).cast(polars.Float64, strict=False) for c in numeric)


def summarise(table: polars.DataFrame) -> polars.DataFrame:
    """Mean and std over seeds per model config within each dataset/protocol/profile."""
    aggregations = [polars.len().alias("seeds"), polars.col("model").first()]
    for column in (*BOARD_COLUMNS, "train_seconds", "test_users_per_second", "parameters"):
        aggregations += [polars.col(column).mean().alias(column), polars.col(column).std().alias(f"{column}_std")]
    return table.group_by([*GROUP_COLUMNS, "config"], maintain_order=True).agg(aggregations).sort(
        [*GROUP_COLUMNS, "ndcg@10"], descending=[*(False for _ in GROUP_COLUMNS), True]
    )


def _cell(mean: float | None, std: float | None, bold: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None and not math.isnan(std) else "")
    return f"**{text}**" if bold else text


def render_markdown(summary: polars.DataFrame) -> str:
    out = io.StringIO()
    out.write("# recbench leaderboard\n\nMean ± std over seeds (n = seeds); best mean per column in bold. "
              "Compare rows only within one dataset, protocol, profile and device.\n")
    for (dataset, protocol, profile, device), group in summary.group_by(GROUP_COLUMNS, maintain_order=True):
        out.write(f"\n## {dataset} — {protocol} — profile {profile} — {device}\n\n")
        header = ["model (config)", "n", *BOARD_COLUMNS, "train s", "test users/s", "params"]
        out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        best = {column: group[column].max() for column in BOARD_COLUMNS}
        for row in group.iter_rows(named=True):
            cells = [f"{row['model']} ({row['config']})", str(row["seeds"])]
            cells += [_cell(row[c], row[f"{c}_std"], row[c] == best[c]) for c in BOARD_COLUMNS]
            cells += [f"{row['train_seconds']:.0f}", f"{row['test_users_per_second']:.0f}", f"{row['parameters']:.0f}"]
            out.write("| " + " | ".join(cells) + " |\n")
    return out.getvalue()


def plot(summary: polars.DataFrame, plots_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    plots_dir.mkdir(parents=True, exist_ok=True)
    for (dataset, protocol, profile, device), group in summary.group_by(GROUP_COLUMNS, maintain_order=True):
        figure, axes = plt.subplots(1, 2, figsize=(10, 0.5 * group.height + 2))
        labels = group["config"].to_list()
        for axis, metric in zip(axes, ("ndcg@10", "recall@10"), strict=True):
            std = group[f"{metric}_std"].fill_null(0.0).to_numpy()
            axis.barh(labels, group[metric].to_numpy(), xerr=std, color="#4c72b0", capsize=3)
            axis.invert_yaxis()
            axis.set_xlabel(metric)
        figure.suptitle(f"{dataset} ({protocol}, {profile}, {device}): mean ± std over seeds")
        figure.tight_layout()
        path = plots_dir / f"{dataset}-{protocol}-{profile}-{device_slug(device)}.png"
        temporary = path.with_name(f".{path.name}.tmp.png")
        figure.savefig(temporary, dpi=110)
        plt.close(figure)
        temporary.replace(path)
        written.append(path)
    return written


def leaderboard(results_dir: Path = Path("results"), dataset: str | None = None, profile: str | None = None) -> str:
    """Render ``results_dir/LEADERBOARD.md`` and the plots; returns the Markdown.

    Args:
        results_dir: the directory holding ``<dataset>.csv`` files.
        dataset: only this dataset's sections.
        profile: only this profile's sections.
    """
    table = load_results(results_dir)
    if dataset:
        table = table.filter(polars.col("dataset") == dataset)
    if profile:
        table = table.filter(polars.col("profile") == profile)
    if table.height == 0:
        raise SystemExit("no rows match the filters")
    summary = summarise(table)
    markdown = render_markdown(summary)
    atomic_write_text(results_dir / "LEADERBOARD.md", markdown)
    plots = plot(summary, results_dir / "plots")
    print(markdown)
    print(f"wrote {results_dir / 'LEADERBOARD.md'} and {len(plots)} plot(s) in {results_dir / 'plots'}")
    return markdown


# ---------------------------------------------------------------------- paired comparison
@dataclass(frozen=True)
class PairedTest:
    metric: str
    cases: int
    mean_new: float
    mean_stored: float
    mean_difference: float
    effect_size_dz: float
    t_pvalue: float
    bootstrap_pvalue: float


def paired_test(new: np.ndarray, stored: np.ndarray, metric: str, resamples: int = 10_000, seed: int = 0) -> PairedTest:
    """Paired t-test and paired bootstrap on per-case values of two runs over the same cases.

    The bootstrap p-value is two-sided under the null of zero mean difference: the differences are
    centred, resampled with replacement, and p = share of resampled means at least as extreme as the
    observed one.
    """
    from scipy import stats  # imported here: it costs a second that `recbench leaderboard` never needs

    if new.shape != stored.shape or new.ndim != 1 or len(new) < 2:
        raise ValueError(f"need two equal-length per-case vectors with >= 2 cases, got {new.shape} and {stored.shape}")
    difference = new - stored
    mean = float(difference.mean())
    sd = float(difference.std(ddof=1))
    if sd == 0.0:
        t_p = 1.0 if mean == 0.0 else 0.0
    else:
        t_p = float(stats.ttest_rel(new, stored).pvalue)
    rng = np.random.default_rng(seed)
    centred = difference - mean
    boot = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks bound memory at 1000 x cases
        index = rng.integers(0, len(difference), size=(min(1000, resamples - start), len(difference)))
        boot[start : start + len(index)] = centred[index].mean(axis=1)
    boot_p = float((np.abs(boot) >= abs(mean)).mean()) if sd > 0 else t_p
    return PairedTest(metric, len(new), float(new.mean()), float(stored.mean()), mean,
                      mean / sd if sd > 0 else 0.0, t_p, boot_p)


def _run_cases(results_dir: Path, run_id: str) -> polars.DataFrame:
    path = results_dir / "runs" / run_id / "cases.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no per-case results for run {run_id!r} at {path}")
    return polars.read_parquet(path)


def compare(
    run_or_config: str,
    dataset: str,
    profile: str = "quick",
    seed: int = 1,
    results_dir: Path = Path("results"),
    work_dir: Path = Path("runs/bench"),
) -> None:
    """Place a run among the stored rows of its dataset/protocol/profile, with paired tests.

    Args:
        run_or_config: a run id in ``results_dir/runs``, or a model config (name or YAML) to train now.
        dataset: data short name or YAML.
        profile: the profile to train under and compare within.
        seed: the seed of a run trained now.
        results_dir: stored rows and run directories.
        work_dir: checkpoints and logs of a run trained now.
    """
    from benchmark.run import RunSpec, load_profile, model_config_for, run_one

    if (results_dir / "runs" / run_or_config / "metrics.json").exists():
        new_row = json.loads((results_dir / "runs" / run_or_config / "metrics.json").read_text())
    else:
        loaded_profile = load_profile(profile)
        spec = RunSpec(dataset, model_config_for(run_or_config, loaded_profile), seed, loaded_profile)
        metrics_file = results_dir / "runs" / spec.run_id / "metrics.json"
        if metrics_file.exists():
            print(f"using the stored run {spec.run_id}")
            new_row = json.loads(metrics_file.read_text())
        else:
            new_row = run_one(spec, results_dir, work_dir, {}, {})
    new_cases = _run_cases(results_dir, str(new_row["run_id"]))
    table = load_results(results_dir).filter(
        (polars.col("dataset") == new_row["dataset"])
        & (polars.col("protocol") == new_row["protocol"])
        & (polars.col("profile") == new_row["profile"])
        & (polars.col("device") == new_row["device"])
    )
    summary = summarise(table)
    print(f"\n{new_row['config']} on {new_row['dataset']} ({new_row['protocol']}, {new_row['profile']}, "
          f"{new_row['device']}), "
          f"seed {new_row['seed']}: NDCG@10 {float(new_row['ndcg@10']):.4f}, Recall@10 {float(new_row['recall@10']):.4f}")
    ranking = summary.select("config", "ndcg@10", "recall@10", "seeds").to_dicts()
    if not any(r["config"] == new_row["config"] for r in ranking):
        ranking.append({"config": new_row["config"], "ndcg@10": float(new_row["ndcg@10"]),
                        "recall@10": float(new_row["recall@10"]), "seeds": 1})
    ranking.sort(key=lambda r: -r["ndcg@10"])
    print("\nrank  model config                 NDCG@10   Recall@10  seeds")
    for position, entry in enumerate(ranking, 1):
        marker = "  <- new" if entry["config"] == new_row["config"] else ""
        print(f"{position:>4}  {entry['config']:<28} {entry['ndcg@10']:.4f}    {entry['recall@10']:.4f}     {entry['seeds']}{marker}")

    print("\npaired tests on per-case values (new - stored), same test cases:")
    print(f"{'stored config':<28} {'metric':<10} {'new':>7} {'stored':>7} {'diff':>8} {'d_z':>7} {'p(t)':>9} {'p(boot)':>9}")
    for config, group in table.group_by("config", maintain_order=True):
        config_name = config[0]
        if config_name == new_row["config"]:
            continue
        same_seed = group.filter(polars.col("seed") == str(new_row["seed"]))
        stored_row = (same_seed if same_seed.height else group).row(0, named=True)
        stored_cases = _run_cases(results_dir, stored_row["run_id"])
        joined = new_cases.join(stored_cases, on="case", suffix="_stored")
        if joined.height != new_cases.height:
            print(f"{config_name:<28} cases differ ({joined.height} shared of {new_cases.height}); skipped")
            continue
        for metric in ("ndcg@10", "recall@10"):
            result = paired_test(joined[metric].to_numpy(), joined[f"{metric}_stored"].to_numpy(), metric)
            print(f"{config_name:<28} {metric:<10} {result.mean_new:>7.4f} {result.mean_stored:>7.4f} "
                  f"{result.mean_difference:>+8.4f} {result.effect_size_dz:>+7.3f} {result.t_pvalue:>9.2e} "
                  f"{result.bootstrap_pvalue:>9.4f}")
