"""`python -m bench.report BENCH.json [--title T]`: pytest-benchmark JSON -> a Markdown table.

One row per benchmark group, one median column per backend (the `backend` parameter of
each benchmark), the speed-up of every backend over `native`, and any throughput figure
the benchmark put in extra_info. Prints the table; paste it into bench/RESULTS.md with the
date, machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def table(document: dict) -> str:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in document["benchmarks"]:
        groups[bench["group"]][bench["params"]["backend"]] = bench
    backends = sorted({b for rows in groups.values() for b in rows}, key=lambda b: (b != "native", b))
    header = ["case"] + [f"{b} median (ms)" for b in backends] + [f"{b} / native" for b in backends[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, rows in groups.items():
        medians = {b: rows[b]["stats"]["median"] for b in backends if b in rows}
        cells = [group] + [f"{medians[b] * 1e3:.3f}" if b in medians else "-" for b in backends]
        for b in backends[1:]:
            ratio = medians["native"] / medians[b] if "native" in medians and b in medians else None
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    document = json.loads(args.json.read_text())
    machine = document.get("machine_info", {})
    print(f"{machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
          f"Python {machine.get('python_version', '?')}, {document.get('datetime', '')}\n")
    print(table(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
