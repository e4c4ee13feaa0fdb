"""Run every benchmark side by side and print one table of ratios.

    python -m benchmarks [--quick] [--only SECTION ...] [--results benchmarks/RESULTS.md]

Each section times nnhandler against its plain-PyTorch baseline in the same process, in
interleaved rounds, and reports the median ratio with its target from issue 5.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path

from . import load_cost, loop_overhead
from ._common import Row, machine_line

SECTIONS: dict[str, Callable[[bool], list[Row]]] = {
    "loop": lambda quick: loop_overhead.run(rounds=5 if quick else 15),
    "load": lambda quick: load_cost.run(rounds=3 if quick else 9),
}


def format_table(rows: list[Row]) -> str:
    lines = ["| section | case | baseline | baseline | nnhandler | ratio | target |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        unit = row.unit
        lines.append(
            f"| {row.section} | {row.case} | {row.baseline} | {row.baseline_value:.4g} {unit} "
            f"| {row.ours_value:.4g} {unit} | {row.ratio:.3f}x | {row.verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--results", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    header = f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {machine_line()}"
    print(header, flush=True)
    rows: list[Row] = []
    for name in args.only:
        section_rows = SECTIONS[name](args.quick)
        rows += section_rows
        for row in section_rows:
            print(f"  {row.section:<14} {row.case:<58} {row.ratio:7.3f}x  {row.verdict}",
                  flush=True)
    table = format_table(rows)
    print()
    print(table)
    if args.results is not None:
        args.results.write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
