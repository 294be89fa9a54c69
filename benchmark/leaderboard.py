"""``recbench leaderboard`` and ``recbench compare``.

- ``leaderboard``: per (dataset, protocol, profile), the mean ± sample standard deviation over seeds
  per model config of the *converged* rows only, with both protocols (history kept, and history
  excluded as ``…_excl``), the epochs, best epoch, what stopped the fits and which devices produced
  them; rows a wall-clock limit or a cap cut short are listed below the table and never averaged.
  Efficiency (seconds, users/s, memory) depends on the hardware, so it gets its own table per device.
  Published figures (``benchmark/references.yaml``) are shown as reference lines, visibly not ours.
  ``LEADERBOARD.md`` always holds every dataset; ``--dataset`` only narrows what is printed.
  Plots: per section a bar chart of NDCG@10 and Recall@10 (each panel sorted by its own metric,
  published figures as dashed lines) and a quality-versus-compute scatter (NDCG@10 against training
  seconds, one marker per row, coloured by device).
- ``compare``: places a new run (an existing run id, or a model config that is trained now through
  the runner) among the stored rows of the same dataset/protocol/profile, with paired tests on the
  per-case NDCG@10 and Recall@10 against each stored model: a paired t-test and a paired bootstrap
  (10,000 resamples, seeded), the mean difference and Cohen's d_z (mean difference / standard
  deviation of the differences).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars
import yaml

# Only torch-free modules at import time: `recbench leaderboard` must start in well under two
# seconds, and benchmark.run (torch, Lightning) alone takes several. tests/test_cli.py checks this.
from benchmark.store import (
    EXCLUDED_METRIC_COLUMNS,
    METRIC_COLUMNS,
    REFERENCE_RESULTS_DIR,
    atomic_write_text,
    read_rows,
    resolve_results_dir,
)

BOARD_COLUMNS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20")
EXCLUDED_BOARD_COLUMNS = ("recall@10_excl", "ndcg@10_excl")
# Rows are only ever averaged or ranked within one dataset, protocol and profile.
GROUP_COLUMNS = ("dataset", "protocol", "profile")
EFFICIENCY_COLUMNS = ("train_seconds", "seconds_per_epoch", "test_users_per_second", "peak_memory_mb", "parameters")
NUMERIC_COLUMNS = (*METRIC_COLUMNS, *EXCLUDED_METRIC_COLUMNS, *EFFICIENCY_COLUMNS, "epochs", "best_epoch")
REFERENCES_FILE = Path(__file__).parent / "references.yaml"


@dataclass(frozen=True)
class PublishedFigure:
    """One published number set (``benchmark/references.yaml``): a reference line, never our run."""

    source: str
    model: str
    dataset: str
    history: str  # "kept" or "excluded"
    confidence: str  # V, V3 or ?
    metrics: dict[str, float]
    note: str = ""


def load_references(path: Path = REFERENCES_FILE) -> list[PublishedFigure]:
    figures = []
    for index, entry in enumerate(yaml.safe_load(path.read_text()) or [], 1):
        fields = {key: entry[key] for key in ("source", "model", "dataset", "history", "confidence")}
        if fields["history"] not in ("kept", "excluded"):
            raise ValueError(f"{path}: entry {index}: history must be kept or excluded, got {fields['history']!r}")
        metrics = {key: float(value) for key, value in entry.items() if "@" in key}
        figures.append(PublishedFigure(**fields, metrics=metrics, note=str(entry.get("note", ""))))
    return figures


def load_results(results_dir: Path) -> polars.DataFrame:
    frames = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        rows = read_rows(path)
        if rows:
            frames.append(polars.DataFrame(rows, infer_schema_length=None))
    if not frames:
        raise FileNotFoundError(f"no result CSVs in {results_dir}; run `recbench bench` first")
    table = polars.concat(frames, how="diagonal")
    missing = [c for c in NUMERIC_COLUMNS if c not in table.columns]
    table = table.with_columns(polars.lit(None, dtype=polars.Utf8).alias(c) for c in missing)
    return table.with_columns(
        [polars.col(c).cast(polars.Float64, strict=False) for c in NUMERIC_COLUMNS]
        + [(polars.col("converged") == "True").alias("converged")]
    )


def summarise(table: polars.DataFrame) -> polars.DataFrame:
    """Mean and std over seeds per config within each dataset/protocol/profile, converged rows only."""
    converged = table.filter(polars.col("converged"))
    aggregations = [
        polars.len().alias("seeds"),
        polars.col("model").first(),
        polars.col("device").unique().sort().str.join(", ").alias("devices"),
        polars.col("stopped_by").unique().sort().str.join(", ").alias("stopped_by"),
    ]
    for column in (*BOARD_COLUMNS, *EXCLUDED_BOARD_COLUMNS, "epochs", "best_epoch"):
        aggregations += [polars.col(column).mean().alias(column), polars.col(column).std().alias(f"{column}_std")]
    return converged.group_by([*GROUP_COLUMNS, "config"], maintain_order=True).agg(aggregations).sort(
        [*GROUP_COLUMNS, "ndcg@10"], descending=[*(False for _ in GROUP_COLUMNS), True]
    )


def _cell(mean: float | None, std: float | None, seeds: int, bold: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    # One seed has no spread: say so instead of printing a zero error bar.
    spread = f" ± {std:.4f}" if seeds > 1 and std is not None and not math.isnan(std) else ""
    text = f"{mean:.4f}{spread}"
    return f"**{text}**" if bold else text


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _sections(table: polars.DataFrame) -> list[tuple[tuple[str, str, str], polars.DataFrame]]:
    keys = table.select(GROUP_COLUMNS).unique(maintain_order=True).sort(GROUP_COLUMNS).iter_rows()
    return [(key, table.filter(*(polars.col(c) == v for c, v in zip(GROUP_COLUMNS, key, strict=True))))
            for key in keys]


def render_section(key: tuple[str, str, str], rows: polars.DataFrame, references: list[PublishedFigure]) -> str:
    """One dataset/protocol/profile section: means, published lines, rows left out, efficiency."""
    dataset, protocol, profile = key
    out = io.StringIO()
    out.write(f"\n## {dataset} — {protocol} — profile {profile}\n\n")
    summary = summarise(rows)
    header = ["model (config)", "n", *BOARD_COLUMNS, *EXCLUDED_BOARD_COLUMNS, "epochs", "best epoch",
              "stopped by", "devices"]
    out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    best = {column: summary[column].max() for column in (*BOARD_COLUMNS, *EXCLUDED_BOARD_COLUMNS)}
    for row in summary.iter_rows(named=True):
        seeds = int(row["seeds"])
        cells = [f"{row['model']} ({row['config']})", f"{seeds}" + ("¹" if seeds == 1 else "")]
        cells += [_cell(row[c], row[f"{c}_std"], seeds, row[c] is not None and row[c] == best[c])
                  for c in (*BOARD_COLUMNS, *EXCLUDED_BOARD_COLUMNS)]
        cells += [_number(row["epochs"]), _number(row["best_epoch"]), row["stopped_by"], row["devices"]]
        out.write("| " + " | ".join(cells) + " |\n")
    if summary.height == 0:
        out.write("| (no converged row yet) |" + " |" * (len(header) - 1) + "\n")
    out.write("\nMean ± std over seeds of converged rows (n = seeds; ¹ one seed, no spread); best mean per column "
              "in bold. `_excl`: history items excluded from the ranking; `–`: not measured (rows older than "
              "schema 2).\n")

    published = [figure for figure in references if figure.dataset == dataset and protocol == "leave_one_out"]
    if published:
        out.write("\nPublished figures (reference lines, not our runs):\n\n")
        columns = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
        out.write("| source | model | history | " + " | ".join(columns) + " | confidence |\n|" + "---|" * 8 + "\n")
        for figure in published:
            values = [f"{figure.metrics[c]:.4f}" if c in figure.metrics else "–" for c in columns]
            confidence = {"V": "verified", "V3": "quoted by a third party", "?": "unverified"}.get(
                figure.confidence, figure.confidence)
            note = f"; {figure.note}" if figure.note else ""
            out.write(f"| {figure.source} | {figure.model} | {figure.history} | " + " | ".join(values)
                      + f" | {confidence}{note} |\n")
    else:
        out.write("\nPublished figures: none for this data and protocol (`benchmark/references.yaml` lists only "
                  "figures measured on the same split; its header says why a dataset has none).\n")

    left_out = rows.filter(~polars.col("converged"))
    if left_out.height:
        out.write("\nNot in the means (the fit did not converge):\n\n| config | seed | stopped by | epochs | N@10 | device |\n"
                  "|---|---|---|---|---|---|\n")
        for row in left_out.sort("config", "seed").iter_rows(named=True):
            out.write(f"| {row['config']} | {row['seed']} | {row['stopped_by']} | {_number(row['epochs'])} | "
                      f"{_number(row['ndcg@10'], 4)} | {row['device']} |\n")

    efficiency = (
        rows.filter(polars.col("converged"))
        .group_by("config", "device", maintain_order=True)
        .agg(polars.len().alias("n"), *(polars.col(c).mean() for c in EFFICIENCY_COLUMNS),
             polars.col("threads").first(), polars.col("precision").first())
        .sort("config", "device")
    )
    if efficiency.height:
        out.write("\nEfficiency per device (converged rows; depends on the hardware, not part of a row's identity):\n\n"
                  "| config | device | threads | precision | n | train s | s/epoch | test users/s | peak MB | params |\n"
                  "|---|---|---|---|---|---|---|---|---|---|\n")
        for row in efficiency.iter_rows(named=True):
            out.write(f"| {row['config']} | {row['device']} | {row['threads'] or '–'} | {row['precision']} | {row['n']} | "
                      f"{_number(row['train_seconds'])} | {_number(row['seconds_per_epoch'], 1)} | "
                      f"{_number(row['test_users_per_second'])} | {_number(row['peak_memory_mb'])} | "
                      f"{_number(row['parameters'])} |\n")
    return out.getvalue()


def render_markdown(table: polars.DataFrame, references: list[PublishedFigure] | None = None) -> str:
    references = load_references() if references is None else references
    head = ("# recbench leaderboard\n\nEach section is one dataset, protocol and profile; rows are compared only "
            "within a section. A row is a property of (dataset, protocol, config, seed, profile); the device is a "
            "column. Only fits that converged (early stopping, or a model that cannot change any more) are "
            "averaged.\n")
    return head + "".join(render_section(key, rows, references) for key, rows in _sections(table))


#: Bump when the drawing code changes, so cached PNGs are redrawn.
PLOT_LAYOUT_VERSION = 1
PLOT_DIGESTS = ".digests.json"


def _section_digest(rows: polars.DataFrame, references: list[PublishedFigure], dataset: str) -> str:
    """What a section's plots are drawn from: its rows and the dataset's published figures."""
    published = [(f.source, f.model, f.history, sorted(f.metrics.items())) for f in references if f.dataset == dataset]
    blob = json.dumps([PLOT_LAYOUT_VERSION, rows.sort("config", "seed", "run_id").write_csv(), published], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plot(table: polars.DataFrame, plots_dir: Path, references: list[PublishedFigure] | None = None) -> list[Path]:
    """Per section: ``<dataset>-<protocol>-<profile>.png`` (bars) and ``…-compute.png`` (quality vs
    compute). Stale PNGs from earlier layouts in ``plots_dir`` are removed: the folder is rendered.

    A section whose rows and published figures are unchanged since its PNGs were drawn (a digest per
    section in ``plots_dir/.digests.json``) keeps them: matplotlib costs seconds per figure, and most
    calls change one section or none.
    """
    references = load_references() if references is None else references
    written: list[Path] = []
    plots_dir.mkdir(parents=True, exist_ok=True)
    digest_file = plots_dir / PLOT_DIGESTS
    previous: dict[str, str] = json.loads(digest_file.read_text()) if digest_file.exists() else {}
    digests: dict[str, str] = {}
    pending: list[tuple[tuple[str, str, str], polars.DataFrame]] = []
    for key, rows in _sections(table):
        stem = "-".join(key)
        digests[stem] = _section_digest(rows, references, key[0])
        names = [f"{stem}-compute.png"] + ([f"{stem}.png"] if rows["converged"].any() else [])
        if previous.get(stem) == digests[stem] and all((plots_dir / name).exists() for name in names):
            written += [plots_dir / name for name in names]
        else:
            pending.append((key, rows))
    if pending:
        written += _draw(pending, plots_dir, references)
    for stale in set(plots_dir.glob("*.png")) - set(written):
        stale.unlink()
    atomic_write_text(digest_file, json.dumps(digests, indent=1, sort_keys=True))
    return written


def _draw(
    sections: list[tuple[tuple[str, str, str], polars.DataFrame]], plots_dir: Path, references: list[PublishedFigure]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(figure: object, name: str) -> None:
        path = plots_dir / name
        temporary = path.with_name(f".{path.name}.tmp.png")
        figure.savefig(temporary, dpi=110)  # type: ignore[attr-defined]
        plt.close(figure)  # type: ignore[arg-type]
        temporary.replace(path)
        written.append(path)

    for (dataset, protocol, profile), rows in sections:
        stem = f"{dataset}-{protocol}-{profile}"
        summary = summarise(rows)
        if summary.height:
            figure, axes = plt.subplots(1, 2, figsize=(11, 0.5 * summary.height + 2.5))
            published = [f for f in references if f.dataset == dataset and f.history == "kept"
                         and protocol == "leave_one_out"]
            for axis, metric in zip(axes, ("ndcg@10", "recall@10"), strict=True):
                ordered = summary.sort(metric, descending=True)  # each panel sorted by its own metric
                labels = [f"{c} (n={n})" for c, n in zip(ordered["config"], ordered["seeds"], strict=True)]
                axis.barh(labels, ordered[metric].to_numpy(), color="#4c72b0")
                # Error bars only where there is a spread to show: one seed gets none, not a zero bar.
                several = (ordered["seeds"] > 1).to_numpy()
                if several.any():
                    positions = np.arange(ordered.height)[several]
                    axis.errorbar(ordered[metric].to_numpy()[several], positions,
                                  xerr=ordered[f"{metric}_std"].fill_null(0.0).to_numpy()[several],
                                  fmt="none", ecolor="black", capsize=3)
                axis.invert_yaxis()
                for index, figure_ref in enumerate(f for f in published if metric in f.metrics):
                    axis.axvline(figure_ref.metrics[metric], color=f"C{index + 1}", linestyle="--", linewidth=1,
                                 label=f"{figure_ref.model} ({figure_ref.source.split(' (')[0]}) [published]")
                axis.set_xlabel(f"{metric} (history kept)")
            handles, legend_labels = axes[0].get_legend_handles_labels()
            if handles:
                figure.legend(handles, legend_labels, loc="lower center", fontsize=7, ncol=2)
            figure.suptitle(f"{dataset} ({protocol}, {profile}): mean ± std over converged seeds; dashed = published")
            figure.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
            save(figure, f"{stem}.png")

        figure, axis = plt.subplots(figsize=(8, 5))
        devices = sorted(set(rows["device"].to_list()))
        for index, device in enumerate(devices):
            subset = rows.filter(polars.col("device") == device)
            for converged, marker in ((True, "o"), (False, "x")):
                part = subset.filter(polars.col("converged") == converged)
                if part.height:
                    axis.scatter(part["train_seconds"].to_numpy(), part["ndcg@10"].to_numpy(), color=f"C{index}",
                                 marker=marker, label=f"{device}{'' if converged else ' (not converged)'}")
                    for row in part.iter_rows(named=True):
                        axis.annotate(row["config"], (row["train_seconds"], row["ndcg@10"]), fontsize=6,
                                      xytext=(3, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("training seconds (log scale)")
        axis.set_ylabel("test NDCG@10 (history kept)")
        axis.set_title(f"{dataset} ({protocol}, {profile}): quality versus compute, one marker per row")
        axis.legend(fontsize=7)
        figure.tight_layout()
        save(figure, f"{stem}-compute.png")
    return written


def leaderboard(results_dir: Path = REFERENCE_RESULTS_DIR, dataset: str | None = None, profile: str | None = None) -> str:
    """Render ``results_dir/LEADERBOARD.md`` and the plots from every row; print (and return) the
    sections of ``dataset`` / ``profile`` (all when not given).

    Args:
        results_dir: the directory holding ``<dataset>.csv`` files.
        dataset: print only this dataset's sections (the file keeps them all).
        profile: print only this profile's sections (the file keeps them all).
    """
    table = load_results(Path(results_dir))
    references = load_references()
    atomic_write_text(Path(results_dir) / "LEADERBOARD.md", render_markdown(table, references))
    plots = plot(table, Path(results_dir) / "plots", references)
    shown = table
    if dataset:
        shown = shown.filter(polars.col("dataset") == dataset)
    if profile:
        shown = shown.filter(polars.col("profile") == profile)
    if shown.height == 0:
        raise SystemExit(f"no rows for dataset={dataset} profile={profile} in {results_dir}")
    markdown = render_markdown(shown, references)
    print(markdown)
    print(f"wrote {Path(results_dir) / 'LEADERBOARD.md'} (all datasets) and {len(plots)} plot(s) in "
          f"{Path(results_dir) / 'plots'}")
    return markdown


def print_reference_comparison(
    results_dir: Path, reference_dir: Path, dataset: str, protocol: str, profile: str
) -> None:
    """The user's rows of one dataset/protocol/profile beside the stored reference rows of the same
    configs: means over seeds, and per seed a paired t-test on per-case NDCG@10 where both runs kept
    their per-case values (same test cases, so the pairing is exact)."""

    def section(directory: Path) -> polars.DataFrame | None:
        if not list(Path(directory).glob("*.csv")):
            return None
        table = load_results(directory)
        return table.filter((polars.col("dataset") == dataset) & (polars.col("protocol") == protocol)
                            & (polars.col("profile") == profile))

    mine = section(results_dir)
    if mine is None or mine.height == 0:
        return
    reference = section(reference_dir)
    print(f"\nyour rows ({results_dir}) beside the stored reference ({reference_dir}), {dataset} / {protocol} / {profile}:")
    print(f"{'config':<22} {'seed':>4} {'conv':>4} {'N@10':>7} {'N@10 excl':>9} {'ref N@10':>9} {'ref n':>5} "
          f"{'diff':>8} {'p(t) same seed':>14}")
    for row in mine.sort("config", "seed").iter_rows(named=True):
        stored = (reference.filter((polars.col("config") == row["config"]) & polars.col("converged"))
                  if reference is not None else polars.DataFrame())
        ref_mean = float(stored["ndcg@10"].mean()) if stored.height else None
        p_value = "–"
        same_seed = stored.filter(polars.col("seed") == row["seed"]) if stored.height else stored
        if same_seed.height:
            mine_cases = Path(results_dir) / "runs" / row["run_id"] / "cases.parquet"
            ref_cases = Path(reference_dir) / "runs" / same_seed["run_id"][0] / "cases.parquet"
            if mine_cases.exists() and ref_cases.exists():
                joined = polars.read_parquet(mine_cases).join(polars.read_parquet(ref_cases), on="case",
                                                              suffix="_ref")
                if joined.height:
                    result = paired_test(joined["ndcg@10"].to_numpy(), joined["ndcg@10_ref"].to_numpy(), "ndcg@10",
                                         resamples=1000)
                    p_value = f"{result.t_pvalue:.2e}"
        excluded, ndcg = row["ndcg@10_excl"], row["ndcg@10"]
        print(f"{row['config']:<22} {row['seed']:>4} {'yes' if row['converged'] else 'no':>4} {row['ndcg@10']:>7.4f} "
              f"{'–' if excluded is None else f'{excluded:.4f}':>9} "
              f"{'–' if ref_mean is None else f'{ref_mean:.4f}':>9} {stored.height:>5} "
              f"{'–' if ref_mean is None else f'{ndcg - ref_mean:+.4f}':>8} {p_value:>14}")
    if reference is None or reference.height == 0:
        print(f"(no stored reference rows for {dataset} / {protocol} / {profile} in {reference_dir})")


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
    #: 95% confidence interval of the mean difference (paired t: mean ± t(0.975, n-1) sd / sqrt(n)).
    ci_low: float
    ci_high: float


def holm_adjusted(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the family-wise error rate over the comparisons one ``compare``
    makes (one per stored model and metric). The i-th smallest p becomes max over j <= i of
    min(1, (m - j + 1) p_(j)), returned in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda index: pvalues[index])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


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
    half_width = float(stats.t.ppf(0.975, len(difference) - 1)) * sd / math.sqrt(len(difference))
    return PairedTest(metric, len(new), float(new.mean()), float(stored.mean()), mean,
                      mean / sd if sd > 0 else 0.0, t_p, boot_p, mean - half_width, mean + half_width)


@dataclass(frozen=True)
class SeedTest:
    """Welch's t-test on two configs' per-seed test metrics: it measures training-seed variance,
    which a per-case test within one seed never sees (two seeds of one config often differ there
    with p < 1e-4)."""

    metric: str
    seeds_new: int
    seeds_stored: int
    mean_new: float
    mean_stored: float
    mean_difference: float
    pvalue: float
    #: 95% interval of the difference of seed means (Welch-Satterthwaite degrees of freedom).
    ci_low: float
    ci_high: float


def seed_test(new: Sequence[float], stored: Sequence[float], metric: str) -> SeedTest:
    """Welch's two-sample t-test over seeds (each value one seed's test metric); >= 2 seeds each."""
    from scipy import stats

    a, b = np.asarray(new, dtype=float), np.asarray(stored, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a seed-level test needs >= 2 seeds on each side, got {len(a)} and {len(b)}")
    difference = float(a.mean() - b.mean())
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(var_a + var_b)
    if se == 0.0:
        return SeedTest(metric, len(a), len(b), float(a.mean()), float(b.mean()), difference,
                        1.0 if difference == 0.0 else 0.0, difference, difference)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    pvalue = float(2 * stats.t.sf(abs(difference) / se, df))
    half_width = float(stats.t.ppf(0.975, df)) * se
    return SeedTest(metric, len(a), len(b), float(a.mean()), float(b.mean()), difference, pvalue,
                    difference - half_width, difference + half_width)


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
    results_dir: Path | None = None,
    reference_dir: Path = REFERENCE_RESULTS_DIR,
    work_dir: Path = Path("runs/bench"),
) -> None:
    """Place a run among the stored reference rows of its dataset/protocol/profile, with paired tests.

    Args:
        run_or_config: a run id (in ``results_dir/runs`` or ``reference_dir/runs``), or a model config
            (name or YAML) to train now.
        dataset: data short name or YAML.
        profile: the profile to train under and compare within.
        seed: the seed of a run trained now.
        results_dir: where a run trained now is written (default: ``$RECBENCH_RESULTS_DIR``, else the
            git-ignored ``runs/results``).
        reference_dir: the stored leaderboard to compare with (converged rows only).
        work_dir: checkpoints and logs of a run trained now.
    """
    from benchmark.registry import require_config
    from benchmark.run import RunSpec, load_profile, model_config_for, run_one

    results_dir = resolve_results_dir(results_dir)
    reference_dir = Path(reference_dir)
    stored_run = next((d / "runs" / run_or_config for d in (results_dir, reference_dir)
                       if (d / "runs" / run_or_config / "metrics.json").exists()), None)
    if stored_run is not None:
        new_row = json.loads((stored_run / "metrics.json").read_text())
        new_cases_dir = stored_run.parent.parent
    else:
        require_config("model", run_or_config)  # a typo stops here with the valid names, before any work
        loaded_profile = load_profile(profile)
        spec = RunSpec(dataset, model_config_for(run_or_config, loaded_profile), seed, loaded_profile)
        metrics_file = results_dir / "runs" / spec.run_id / "metrics.json"
        if metrics_file.exists():
            print(f"using the run {spec.run_id} from {results_dir}")
            new_row = json.loads(metrics_file.read_text())
        else:
            new_row = run_one(spec, results_dir, work_dir, {}, {})
        new_cases_dir = results_dir
    new_cases = _run_cases(new_cases_dir, str(new_row["run_id"]))
    table = load_results(reference_dir).filter(
        (polars.col("dataset") == new_row["dataset"])
        & (polars.col("protocol") == new_row["protocol"])
        & (polars.col("profile") == new_row["profile"])
        & polars.col("converged")
        & (polars.col("run_id") != new_row["run_id"])
    )
    summary = summarise(table)
    converged = str(new_row.get("converged")) == "True"
    print(f"\n{new_row['config']} on {new_row['dataset']} ({new_row['protocol']}, {new_row['profile']}), "
          f"seed {new_row['seed']}, {new_row['device']}: NDCG@10 {float(new_row['ndcg@10']):.4f}, "
          f"Recall@10 {float(new_row['recall@10']):.4f} ({'converged' if converged else 'NOT converged'}: "
          f"{new_row.get('stopped_by', '?')})")
    ranking = [{**entry, "new": False} for entry in summary.select("config", "ndcg@10", "recall@10", "seeds").to_dicts()]
    ranking.append({"config": new_row["config"], "ndcg@10": float(new_row["ndcg@10"]),
                    "recall@10": float(new_row["recall@10"]), "seeds": 1, "new": True})
    ranking.sort(key=lambda r: -r["ndcg@10"])
    print(f"\nrank among the stored converged rows of {reference_dir}:")
    print("rank  model config                 NDCG@10   Recall@10  seeds")
    for position, entry in enumerate(ranking, 1):
        marker = "  <- new" if entry["new"] else ""
        print(f"{position:>4}  {entry['config']:<28} {entry['ndcg@10']:.4f}    {entry['recall@10']:.4f}     {entry['seeds']}{marker}")

    results: list[tuple[str, PairedTest]] = []
    skipped: list[str] = []
    for config, group in table.group_by("config", maintain_order=True):
        config_name = config[0]
        same_seed = group.filter(polars.col("seed") == str(new_row["seed"]))
        stored_row = (same_seed if same_seed.height else group).row(0, named=True)
        cases_path = reference_dir / "runs" / stored_row["run_id"] / "cases.parquet"
        if not cases_path.exists():
            skipped.append(f"{config_name:<28} no per-case values stored ({cases_path}); skipped")
            continue
        joined = new_cases.join(polars.read_parquet(cases_path), on="case", suffix="_stored")
        if joined.height != new_cases.height:
            skipped.append(f"{config_name:<28} cases differ ({joined.height} shared of {new_cases.height}); skipped")
            continue
        for metric in ("ndcg@10", "recall@10"):
            results.append((config_name, paired_test(joined[metric].to_numpy(), joined[f"{metric}_stored"].to_numpy(),
                                                     metric)))
    # One family per metric: the new run against every stored model.
    holm: dict[int, float] = {}
    for metric in ("ndcg@10", "recall@10"):
        indices = [i for i, (_, result) in enumerate(results) if result.metric == metric]
        holm |= dict(zip(indices, holm_adjusted([results[i][1].t_pvalue for i in indices]), strict=True))
    print(f"\npaired tests on per-case values (new - stored), same test cases; p(Holm) corrects p(t) over the "
          f"{len(results) // 2} stored model(s) per metric:")
    print(f"{'stored config':<28} {'metric':<10} {'new':>7} {'stored':>7} {'diff':>8} {'95% CI':>19} {'d_z':>7} "
          f"{'p(t)':>9} {'p(Holm)':>9} {'p(boot)':>9}")
    for index, (config_name, result) in enumerate(results):
        interval = f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}]"
        print(f"{config_name:<28} {result.metric:<10} {result.mean_new:>7.4f} {result.mean_stored:>7.4f} "
              f"{result.mean_difference:>+8.4f} {interval:>19} {result.effect_size_dz:>+7.3f} {result.t_pvalue:>9.2e} "
              f"{holm[index]:>9.2e} {result.bootstrap_pvalue:>9.4f}")
    for line in skipped:
        print(line)
    _print_seed_tests(table, new_row, converged)


def _print_seed_tests(table: polars.DataFrame, new_row: dict[str, Any], new_converged: bool) -> None:
    """The seed-level section of ``compare``: the new config's converged seeds (the new run and the
    config's other stored seeds) against each stored config's, Holm over the stored configs."""
    metrics = ("ndcg@10", "recall@10")
    config = str(new_row["config"])
    own = table.filter((polars.col("config") == config) & (polars.col("seed") != str(new_row["seed"])))
    new_values = {m: [float(v) for v in own[m].to_list()] + ([float(new_row[m])] if new_converged else []) for m in metrics}
    seeds_new = len(new_values["ndcg@10"])
    print(f"\nseed-level tests (Welch t over per-seed test metrics, training-seed variance included; "
          f"{config}: {seeds_new} converged seed(s)):")
    if seeds_new < 2:
        print(f"  needs >= 2 converged seeds of {config}; run more seeds (recbench bench --seeds 1,2,3)")
        return
    tests: list[tuple[str, SeedTest]] = []
    for (stored_config,), group in table.filter(polars.col("config") != config).group_by("config", maintain_order=True):
        if group.height >= 2:
            tests += [(str(stored_config), seed_test(new_values[m], group[m].cast(polars.Float64).to_list(), m))
                      for m in metrics]
    if not tests:
        print("  no stored config has >= 2 converged seeds")
        return
    holm: dict[int, float] = {}
    for metric in metrics:
        indices = [i for i, (_, test) in enumerate(tests) if test.metric == metric]
        holm |= dict(zip(indices, holm_adjusted([tests[i][1].pvalue for i in indices]), strict=True))
    print(f"{'stored config':<28} {'metric':<10} {'seeds':>7} {'new':>7} {'stored':>7} {'diff':>8} {'95% CI':>19} "
          f"{'p(Welch)':>9} {'p(Holm)':>9}")
    for index, (stored_config, test) in enumerate(tests):
        interval = f"[{test.ci_low:+.4f}, {test.ci_high:+.4f}]"
        print(f"{stored_config:<28} {test.metric:<10} {f'{test.seeds_new}/{test.seeds_stored}':>7} {test.mean_new:>7.4f} "
              f"{test.mean_stored:>7.4f} {test.mean_difference:>+8.4f} {interval:>19} {test.pvalue:>9.2e} {holm[index]:>9.2e}")
