"""The work behind ``recbench data stats|prepare DATASET``, as pure functions the CLI wires up.

- :func:`main` is ``recbench data {stats,prepare} DATASET``; datasets are short names or YAML paths,
  resolved by :func:`benchmark.registry.instantiate_data` exactly as ``recbench fit`` resolves them.
- :func:`prepare` runs ``prepare_data`` and reports its time and whether a verified cache was
  already there (run it twice for the cold and the warm time), or a damaged one was rebuilt (and
  why).
- :func:`format_stats` renders :class:`~recbench.data.DatasetStats` (and the split counts) as text.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmark.registry import config_names, instantiate_data
from recbench.data import DatasetStats, SeqRecDataModule, SplitCounts


@dataclass(frozen=True)
class PrepareReport:
    """What one ``prepare_data`` call did."""

    dataset: str
    cache_path: str
    cache_hit: bool  # a cache that verified existed before the call, so nothing was parsed
    seconds: float
    rebuilt_because: str | None = None  # a cache existed but did not verify: why it was rebuilt

    @property
    def state(self) -> str:
        if self.cache_hit:
            return "warm (cache hit, verified)"
        if self.rebuilt_because:
            return f"rebuilt (the cache did not verify: {self.rebuilt_because})"
        return "cold (parsed the raw files)"


def prepare(datamodule: SeqRecDataModule) -> PrepareReport:
    """Run ``prepare_data`` once, timed; a missing source raises ``MissingDataError``."""
    started = time.perf_counter()
    datamodule.prepare_data()
    seconds = time.perf_counter() - started
    return PrepareReport(
        dataset=datamodule.name,
        cache_path=str(datamodule.cache_path),
        cache_hit=datamodule.cache_outcome == "hit",
        seconds=seconds,
        rebuilt_because=datamodule.cache_problem if datamodule.cache_outcome == "rebuilt" else None,
    )


def format_stats(stats: DatasetStats, split_counts: SplitCounts | None, prepare_seconds: float | None) -> str:
    """A human-readable block of dataset statistics (the ``recbench data stats`` output)."""
    lines = [
        f"dataset          {stats.name}",
        f"users            {stats.users:,}",
        f"items            {stats.items:,}",
        f"interactions     {stats.interactions:,}",
        f"mean length      {stats.mean_length:.2f}",
        f"median length    {stats.median_length:g}",
        f"density          {stats.density:.6f} ({stats.density * 100:.4f}%)",
    ]
    if stats.items_with_field:
        lines.append("items with text field:")
        width = max(len(name) for name in stats.items_with_field)
        for name, count in stats.items_with_field.items():
            lines.append(f"  {name:<{width}}  {count:,} ({count / stats.items:.1%})")
    else:
        lines.append("items with text field: none (no item text in this source)")
    if stats.filtered:
        lines.append("filtered rows:")
        for reason, count in stats.filtered.items():
            lines.append(f"  {count:,}  {reason}")
    else:
        lines.append("filtered rows:   none")
    if stats.duplicates:
        lines.append("duplicates (kept):")
        for reason, count in stats.duplicates.items():
            lines.append(f"  {count:,}  {reason}")
    if split_counts is not None:
        lines += [
            "split:",
            f"  train targets  {split_counts.train_targets:,}",
            f"  val cases      {split_counts.val_cases:,}"
            + (
                f" (validating on a subset of {split_counts.val_subset:,})" if split_counts.val_subset else ""
            ),
            f"  test cases     {split_counts.test_cases:,}",
            f"  users without a test case        {split_counts.users_without_test_case:,}",
            f"  users without a validation case  {split_counts.users_without_val_case:,}",
            f"  users without a training target  {split_counts.users_without_train_target:,}",
        ]
    lines += [f"fingerprint      {stats.fingerprint}", f"cache            {stats.cache_path}"]
    if prepare_seconds is not None:
        lines.append(f"prepare time     {prepare_seconds:.2f} s")
    return "\n".join(lines)


def semantic_id_report(datamodule: SeqRecDataModule, scheme: str, encoder: str) -> str:
    """Embed the items, fit semantic IDs on the training items, and describe both (``data sids``)."""
    from recbench.item_side import item_embeddings_for, semantic_ids_for
    from recbench.semantic_ids import ParallelPQConfig, ResidualKMeansConfig
    from recbench.text import build_item_sentences

    started = time.perf_counter()
    embeddings = item_embeddings_for(datamodule, encoder=encoder)
    embed_seconds = time.perf_counter() - started
    config = ResidualKMeansConfig() if scheme == "rq" else ParallelPQConfig()
    started = time.perf_counter()
    sids = semantic_ids_for(datamodule, config, embeddings)
    fit_seconds = time.perf_counter() - started
    stats = sids.stats()
    lines = [
        f"dataset              {datamodule.name}",
        f"embedding source     {embeddings.source} ({embeddings.dim}-d)",
        f"embedding time       {embed_seconds:.1f} s this call ({'cache hit; ' if embeddings.from_cache else ''}"
        f"original computation {embeddings.seconds:.1f} s)",
    ]
    if embeddings.fields:
        sentences, placeholders = build_item_sentences(datamodule.items_table, embeddings.fields)
        lines.append(f"text fields          {', '.join(embeddings.fields)} ({len(placeholders)} items without text)")
        lines.append(f"example sentence     item 1: {sentences[0]}")
    lines += [
        f"scheme               {sids.scheme}",
        f"training items       {int(datamodule.train_item_mask().sum()):,} of {datamodule.num_items:,} (fit on these only)",
        f"unique IDs           {stats.n_unique_ids:,} of {stats.n_items:,} items (before any collision digit)",
        f"collision rate       {stats.collision_rate:.4f}",
        f"largest collision    {stats.max_collision_group} items",
        "code usage per digit " + ", ".join(str(u) for u in stats.code_usage),
        "entropy bits/digit   " + ", ".join(f"{e:.2f}" for e in stats.code_entropy_bits),
        f"fit time             {fit_seconds:.1f} s this call (original fit {stats.fit_seconds:.1f} s)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="recbench data", description="Prepare datasets and print statistics.")
    parser.add_argument("command", choices=("stats", "prepare", "sids"))
    parser.add_argument("datasets", nargs="+", help=f"short names ({', '.join(config_names('data'))}) or YAML paths")
    parser.add_argument("--scheme", choices=("rq", "pq"), default="rq", help="sids: residual k-means or parallel PQ")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sids: sentence encoder name or path")
    args = parser.parse_args(list(argv))
    for name in args.datasets:
        datamodule = instantiate_data(name)
        if args.command == "sids":
            print(semantic_id_report(datamodule, args.scheme, args.encoder))
            print()
            continue
        report = prepare(datamodule)
        if args.command == "prepare":
            print(f"{report.dataset}: prepared in {report.seconds:.2f} s, {report.state}: {report.cache_path}")
            continue
        datamodule.setup()
        print(format_stats(datamodule.stats(), datamodule.split_counts, report.seconds))
        print(f"prepare          {report.state}")
        print()
