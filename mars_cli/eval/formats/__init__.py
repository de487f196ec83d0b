"""The benchmark formats `mars data convert` reads, by name.

Each format is a row function `(row, rowno, ctx) -> task | None` (None skips the row)
plus which files it reads inside a directory given as input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mars_cli.eval.formats import mcq, search


@dataclass(frozen=True)
class FormatSpec:
    row: Callable
    dir_suffixes: tuple[str, ...]
    file_filter: Callable[[Path], bool] | None = None
    help: str = ""


FORMATS: dict[str, FormatSpec] = {
    "hr-mmsearch": FormatSpec(search.hr_mmsearch_row, (".parquet", ".jsonl"), help="HR-MMSearch parquet"),
    "mmsearch": FormatSpec(search.mmsearch_row, (".parquet", ".jsonl"), help="MMSearch end-to-end"),
    "fvqa": FormatSpec(search.fvqa_row, (".parquet", ".jsonl"), help="FVQA parquet (verl layout)"),
    "sensenova-mars": FormatSpec(search.sensenova_row, (".jsonl",), help="SenseNova-MARS jsonl (or a manifest .json)"),
    "vstar": FormatSpec(mcq.vstar_row, (".json",), file_filter=mcq.is_vstar_file, help="V* Bench folder or jsonl"),
    "hr-bench": FormatSpec(mcq.hrbench_row, (".tsv",), help="HR-Bench TSV (base64 images)"),
    "mme-realworld": FormatSpec(mcq.mme_realworld_row, (".json", ".tsv"), help="MME-RealWorld json or TSV"),
}
