"""``bayestune report`` (the score tables, paired differences, candidates and provenance of a
run, from its metrics.json files) and ``bayestune figures`` (:class:`Figures`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bayestune.cli.flags import from_args

HELP = "score tables from metrics.json files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", choices=["glue", "vtab"], required=True)
    parser.add_argument("--metrics", type=Path, nargs="+", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--model", default="", help="adds published rows when roberta-base")
    parser.add_argument("--reference", default="bayestune",
                        help="method whose paired differences against every other are "
                             "tabulated")
    parser.add_argument("--main-budget", type=float, default=0.005,
                        help="budget of the reference when compared with full, lora and bitfit")
    parser.add_argument("--label-presets", action="store_true",
                        help="name each bayestune row by its stage-1 preset, e.g. 'bayestune "
                             "(cold)', to set the runs of several chains side by side (then "
                             "e.g. --reference 'bayestune (reference)')")


@dataclass(frozen=True, kw_only=True)
class Settings:
    benchmark: str
    metrics: list[Path]
    out_dir: Path
    model: str
    reference: str
    main_budget: float
    label_presets: bool


def settings(args: argparse.Namespace) -> Settings:
    return from_args(Settings, args)


def run(settings: Settings) -> None:
    from bayestune.reports import provenance, tables

    scores = tables.collect_scores(settings.metrics, label_presets=settings.label_presets)
    tables.write_tables(scores, settings.out_dir, settings.benchmark, settings.model,
                        reference=settings.reference,
                        main_budget=format(settings.main_budget, "g"))
    provenance.write_provenance(settings.metrics, settings.out_dir, settings.benchmark)
    tables.write_selection(settings.metrics, settings.out_dir, settings.benchmark)
    tables.write_table_html(settings.out_dir, settings.benchmark)


class Figures:
    """``bayestune figures``: figures of scales, masks, scores, validation curves and the
    paired differences. Beside ``report`` in this module: the two draw on the same reports
    package, and the workflow reruns them on the same code."""

    HELP = "figures of scales, masks and scores"

    @dataclass(frozen=True, kw_only=True)
    class Settings:
        scales: list[Path]
        masks: list[Path]
        scores_csv: Path | None
        metrics: list[Path]
        paired_csv: Path | None
        out_dir: Path

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scales", type=Path, nargs="*", default=[])
        parser.add_argument("--masks", type=Path, nargs="*", default=[])
        parser.add_argument("--scores-csv", type=Path, default=None)
        parser.add_argument("--metrics", type=Path, nargs="*", default=[],
                            help="metrics.json files: validation curves, one figure per task")
        parser.add_argument("--paired-csv", type=Path, default=None,
                            help="<benchmark>_paired.csv: forest plot of the paired "
                                 "differences")
        parser.add_argument("--out-dir", type=Path, required=True)

    @staticmethod
    def settings(args: argparse.Namespace) -> Figures.Settings:
        return from_args(Figures.Settings, args)

    @staticmethod
    def run(settings: Figures.Settings) -> None:
        from bayestune.reports.figures import write_figures

        write_figures(settings.out_dir, scales=settings.scales, masks=settings.masks,
                      scores_csv=settings.scores_csv, metrics=settings.metrics,
                      paired_csv=settings.paired_csv)
