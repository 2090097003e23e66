"""`python -m bench.report BENCH.json [MORE.json ...]`: pytest-benchmark JSON -> bench/RESULTS.md + chart.

Writes one section per run (device and date) into RESULTS.md: the device, peaks, versions
and command; the goals of the fused backend checked against the run; end-to-end images/s,
speed-up over eager fp32 and roofline fraction per engine backend and batch, and per-step
latency, for each problem (model and image size) the run measured; training steps per op
backend; per-op time, GB/s and bandwidth fraction with the speed-up over native; and what
was skipped and why. A bar chart (images/s and speed-up per batch, a row per problem) goes
next to it as a PNG.

Several JSON files of one device are merged (a GPU suite can be run in parts). A section
with the same device and date is replaced; every other section (earlier runs, other
devices, the text around them) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sr3_engine.io import atomic_path

from .harness import BASELINE_ID as BASELINE

DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
INSERT_MARKER = "<!-- bench.report: new runs go below this line -->"
GOAL_BATCH_LARGE = 16
GOAL_BATCH_ROOFLINE = 32


class ReportError(Exception):
    """A JSON or RESULTS.md the report cannot use; the message names the file."""


# Fields bench/ writes into every row's extra_info, and those of each kind of row.
COMMON_FIELDS = ("device", "device_name", "peak_bf16_tflops", "peak_gbps", "peak_source", "python", "torch",
                 "triton", "cuda", "onnxruntime", "sr3_engine", "torch_threads")
KIND_FIELDS = {
    "sample": ("variant", "backend", "batch", "steps", "config", "height", "width", "flops_per_step",
               "images_per_s", "roofline_fraction"),
    "step": ("variant", "backend", "batch", "steps", "config", "height", "width", "flops_per_step"),
    "op": ("case", "backend", "gbps", "bandwidth_fraction"),
    "train": ("op_backend", "config", "batch", "height", "width", "images_per_s"),
}


@dataclass
class Part:
    """One pytest-benchmark JSON file: one pytest session."""

    path: Path
    datetime: str
    command: str | None
    rows: list[dict]
    skipped: list[dict]


@dataclass
class Run:
    """The parts of one device's run, merged; `info` is the first row of the earliest part."""

    device: str
    device_name: str
    date: str
    commands: list[str]
    info: dict
    parts: int
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def command(self) -> str:
        return "; ".join(self.commands) if self.commands else "(not recorded in the JSON)"

    @property
    def key(self) -> str:
        return f"{self.device_name} | {self.date}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.device}-{self.device_name}-{self.date}".lower()).strip("-")

    def rows_of(self, kind: str) -> list[dict]:
        return [row for row in self.rows if row["kind"] == kind]


def read_part(path: Path) -> Part:
    try:
        document = json.loads(path.read_text())
        benchmarks = document["benchmarks"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ReportError(f"{path}: not a pytest-benchmark JSON file ({error})") from None
    rows = []
    try:
        for bench in benchmarks:
            extra = bench.get("extra_info", {})
            kind = extra.get("kind")
            if kind not in KIND_FIELDS:
                raise ReportError(f"{path}: benchmark {bench.get('name')!r} was not written by bench/ "
                                  "(no known extra_info.kind)")
            missing = [name for name in COMMON_FIELDS + KIND_FIELDS[kind] if name not in extra]
            if missing:
                raise ReportError(f"{path}: benchmark {bench['name']!r} lacks {', '.join(missing)}")
            rows.append({**extra, "median": bench["stats"]["median"], "iqr": bench["stats"].get("iqr"),
                         "name": bench["name"]})
        skipped = document.get("sr3_skipped", [])
        for skip in skipped:
            if not all(isinstance(skip.get(name), str) for name in ("test", "reason")):
                raise ReportError(f"{path}: a sr3_skipped entry lacks its test or reason: {skip!r}")
    except (KeyError, TypeError, AttributeError) as error:
        raise ReportError(f"{path}: a benchmark row lacks a field pytest-benchmark writes ({error!r})") from None
    if not rows:
        raise ReportError(f"{path}: holds no benchmark rows (was it run with --benchmark-disable?)")
    return Part(path, str(document.get("datetime", "")), document.get("sr3_command"), rows, skipped)


def load(paths: list[Path]) -> Run:
    """Merge the parts in the order they were measured, whatever order the paths come in."""
    parts = sorted((read_part(path) for path in paths), key=lambda part: part.datetime)
    first = parts[0].rows[0]
    run = Run(first["device"], first["device_name"], parts[0].datetime[:10], [], first, len(parts))
    seen: dict[str, Path] = {}
    for part in parts:
        if part.rows[0]["device_name"] != run.device_name:
            raise ReportError(f"{part.path}: measured on {part.rows[0]['device_name']}, not {run.device_name} "
                              f"({parts[0].path}); report one device at a time")
        for row in part.rows:
            if row["name"] in seen:
                raise ReportError(f"{part.path}: {row['name']} was measured in {seen[row['name']]} too; "
                                  "give each benchmark to one part")
            seen[row["name"]] = part.path
        if part.command and part.command not in run.commands:
            run.commands.append(part.command)
        run.rows.extend(part.rows)
    # A case skipped in one part may have been measured in another; a case is listed once.
    skipped = {}
    for part in parts:
        for skip in part.skipped:
            case = f"{skip['test']}[{skip.get('case', '')}]"
            if case not in seen:
                skipped.setdefault(case, skip)
    run.skipped = list(skipped.values())
    return run


def fmt(value: float | None) -> str:
    """Three significant figures at most, the same decimals for every value of one magnitude."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def roofline(value: float | None) -> str:
    """A roofline fraction; one above 1 is a peak measured too low, never a figure."""
    if value is not None and value > 1:
        return "error: above the peak"
    return percent(value)


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _by_variant_and_batch(rows: list[dict]) -> tuple[list[str], list[int], dict[tuple[str, int], dict]]:
    cells = {(row["variant"], row["batch"]): row for row in rows}
    # The order the rows came in (one JSON: the suite's own), the baseline first.
    variants = sorted(dict.fromkeys(row["variant"] for row in rows), key=lambda v: v != BASELINE)
    batches = sorted({row["batch"] for row in rows})
    return variants, batches, cells


def _grid(variants: list[str], batches: list[int], cells: dict, cell) -> list[str]:
    """A backend-by-batch table: cell(row, variant, batch) for each measured pair, "-" elsewhere."""
    return _table(["backend", *(f"batch {b}" for b in batches)], [
        [v, *(cell(cells[(v, b)], v, b) if (v, b) in cells else "-" for b in batches)] for v in variants])


def over_baseline(cells: dict, variant: str, batch: int) -> float | None:
    """Speed-up over the baseline: over the baseline rounds paired with this row's when it has
    them (same machine conditions), else over the baseline's own row."""
    if variant == BASELINE:
        return 1.0
    row = cells.get((variant, batch))
    if row is None:
        return None
    if row.get("paired_baseline_seconds"):
        return row["paired_baseline_seconds"] / row["median"]
    baseline = cells.get((BASELINE, batch))
    return baseline["median"] / row["median"] if baseline else None


def speedup(cells: dict, variant: str, batch: int, over: str = BASELINE) -> float | None:
    """`variant` over `over`, both through their speed-ups over the baseline (which cancels drift)."""
    mine, theirs = over_baseline(cells, variant, batch), over_baseline(cells, over, batch)
    return mine / theirs if mine is not None and theirs else None


def all_paired(rows: list[dict]) -> bool:
    return all(row.get("paired_baseline_seconds") for row in rows if row["variant"] != BASELINE)


def images_per_s(row: dict) -> str:
    if not row.get("iqr"):
        return fmt(row["images_per_s"])
    return f"{fmt(row['images_per_s'])} ±{100 * row['iqr'] / row['median'] / 2:.0f}%"


def by_problem(rows: list[dict]) -> list[list[dict]]:
    """The rows of each problem (model, image size, steps, tile), problems in the order they were measured."""
    problems: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["config"], row["height"], row["width"], row["steps"], row.get("tile"))
        problems.setdefault(key, []).append(row)
    return list(problems.values())


def problem_title(row: dict) -> str:
    tiles = f" in {row['tile']}x{row['tile']} tiles (overlap {row.get('tile_overlap')})" if row.get("tile") else ""
    return f"{row['config']} at {row['height']}x{row['width']}{tiles}"


def end_to_end_tables(run: Run) -> list[str]:
    return [line for rows in by_problem(run.rows_of("sample")) for line in _end_to_end_tables(rows)]


def _end_to_end_tables(rows: list[dict]) -> list[str]:
    variants, batches, cells = _by_variant_and_batch(rows)
    first = rows[0]
    lines = [f"#### End to end: `engine.sample`, {problem_title(first)}, {first['steps']} steps", "",
             "Images/s (higher is better; ± half the interquartile range of the rounds, relative):", ""]
    lines += _grid(variants, batches, cells, lambda row, v, b: images_per_s(row))
    pairing = (f"each timed round of a backend followed a round of {BASELINE}, and the ratio is to those paired "
               "rounds" if all_paired(rows) else f"over {BASELINE}'s rounds paired with the row's where it has "
               f"them, else over {BASELINE}'s own row")
    lines += ["", f"Speed-up over {BASELINE} at the same batch ({pairing}):", ""]
    lines += _grid(variants, batches, cells, lambda row, v, b: ratio(speedup(cells, v, b)))
    precisions = ", ".join(dict.fromkeys(f"{row['variant']}: {row['roofline_precision']} "
                                         f"{fmt(row['roofline_peak_tflops'])} TFLOP/s"
                                         for row in rows if row.get("roofline_precision")))
    of_peak = f"of the peak each row computes in: {precisions}" if precisions else "of the bf16 peak"
    lines += ["", f"Fraction of the FLOP roofline ({fmt(first['flops_per_step'] / first['batch'] / 1e9)} "
              f"GFLOP per image per step; {of_peak}):", ""]
    lines += _grid(variants, batches, cells, lambda row, v, b: roofline(row["roofline_fraction"]))
    modes = dict.fromkeys(f"{row['variant']}: {row['compile_mode']}" for row in rows if row.get("compile_mode"))
    if modes:
        lines += ["", f"torch.compile mode: {', '.join(modes)}."]
    if any(row.get("peak_memory_bytes") for row in rows):
        lines += ["", "Peak device memory of one call, GiB (the engine's weights, the memory its captured graphs "
                  "hold and the call's own allocations):", ""]
        lines += _grid(variants, batches, cells, lambda row, v, b: fmt(row["peak_memory_bytes"] / 2**30)
                       if row.get("peak_memory_bytes") else "-")
    return lines + [""]


def step_table(run: Run) -> list[str]:
    lines = []
    for rows in by_problem(run.rows_of("step")):
        variants, batches, cells = _by_variant_and_batch(rows)
        lines += [f"#### Per step, {problem_title(rows[0])}: one denoiser call and posterior update, ms "
                  f"(speed-up over {BASELINE}, unpaired)", ""]
        lines += _grid(variants, batches, cells,
                       lambda row, v, b: f"{fmt(row['median'] * 1e3)} ({ratio(speedup(cells, v, b))})")
        lines.append("")
    return lines


def train_table(run: Run) -> list[str]:
    rows = run.rows_of("train")
    if not rows:
        return []
    native = next((row for row in rows if row["op_backend"] == "native"), None)
    first = rows[0]
    table_rows = [[row["op_backend"], fmt(row["median"]), fmt(row["images_per_s"]),
                   ratio(native["median"] / row["median"]) if native else "-"] for row in rows]
    return [f"#### Training step: {first['config']}, batch {first['batch']} of {first['height']}x{first['width']} "
            "crops, forward + backward + AdamW, float32 (unpaired)", "",
            *_table(["GroupNorm+SiLU op backend", "s/step", "images/s", "speed-up over native"], table_rows), ""]


def per_call(row: dict) -> float:
    """Seconds per op call: on CUDA a round replays a graph of `calls_per_round` calls."""
    return row["median"] / row.get("calls_per_round", 1)


def op_table(run: Run) -> list[str]:
    rows = run.rows_of("op")
    if not rows:
        return []
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        cases[row["case"]][row["backend"]] = row
    backends = [b for b in ("native", "triton", "cpp", "compile") if any(b in c for c in cases.values())]
    fused = [b for b in backends if b != "native"]
    header = ["case", *(f"{b}: us, GB/s (% of peak)" for b in backends), *(f"{b} speed-up over native" for b in fused)]
    table_rows = []
    for case, by_backend in cases.items():
        cells = [case]
        for b in backends:
            row = by_backend.get(b)
            cells.append("-" if row is None else
                         f"{fmt(per_call(row) * 1e6)}, {fmt(row['gbps'])} ({percent(row['bandwidth_fraction'])})")
        for b in fused:
            native, other = by_backend.get("native"), by_backend.get(b)
            cells.append(ratio(per_call(native) / per_call(other)) if native and other else "-")
        table_rows.append(cells)
    return ["#### Per op: median time per call, bytes moved / time", "", *_table(header, table_rows), "",
            "Above 100% of the bandwidth, the bytes the op moves stayed in cache between rounds: the peak is "
            "the device memory's, measured or from the data sheet.", ""]


def goals_table(run: Run) -> list[str]:
    problems = by_problem(run.rows_of("sample"))
    rows = problems[0] if problems else []  # the goals are about the device's first problem
    fused = sorted({r["variant"] for r in rows if r["backend"] == "fused"})
    if not fused:
        return []
    variants, batches, cells = _by_variant_and_batch(rows)
    compiled = [v for v in variants if v.startswith("compile-")]
    missing = "not in this run"
    table_rows = []
    for variant in fused:
        def over_eager(batch: int) -> str:
            return ratio(speedup(cells, variant, batch)) if (variant, batch) in cells else missing

        over_compile = [[speedup(cells, variant, b, over=c) for c in compiled] for b in batches]
        fraction = cells.get((variant, GOAL_BATCH_ROOFLINE), {}).get("roofline_fraction")
        table_rows += [
            [f"{variant} vs {BASELINE}, batch 1", ">= 4x", over_eager(1)],
            [f"{variant} vs {BASELINE}, batch {GOAL_BATCH_LARGE}", ">= 2.5x", over_eager(GOAL_BATCH_LARGE)],
            *([f"{variant} vs the faster compile variant, batch {b}", ">= 1.25x",
               ratio(min(r for r in ratios if r is not None)) if any(ratios) else missing]
              for b, ratios in zip(batches, over_compile)),
            [f"{variant} roofline fraction, batch {GOAL_BATCH_ROOFLINE}", ">= 50%",
             roofline(fraction) if fraction is not None else missing],
        ]
    return ["#### Goals of the fused backend", "", *_table(["goal", "target", "this run"], table_rows), ""]


def skipped_lines(run: Run) -> list[str]:
    cases: dict[tuple[str, str, str], int] = defaultdict(int)
    for skip in run.skipped:
        cases[(skip["test"], skip.get("backend", ""), skip["reason"])] += 1
    if not cases:
        return []
    return ["Not measured in this run:", "", *(
        f"- `{test}` {backend} ({count} case{'s' if count > 1 else ''}): {reason}"
        for (test, backend, reason), count in sorted(cases.items())), ""]


def tf32_note(run: Run) -> str:
    if run.device != "cuda":
        return ""
    convolutions = "TF32" if run.info.get("cudnn_allow_tf32") else "full fp32"
    matmuls = "TF32" if run.info.get("matmul_allow_tf32") else "full fp32"
    return f" In fp32 rows convolutions run in {convolutions} and matmuls in {matmuls} (torch.backends settings)."


def provenance(run: Run) -> str:
    if run.parts == 1:
        return "Medians of one run, every backend side by side. Command"
    return (f"Medians of {run.parts} runs on this machine, one after another, each side by side within itself "
            "(versions and peaks from the first). Commands, in order")


def section(run: Run, chart_name: str | None) -> str:
    info = run.info
    heading = "GPU" if run.device == "cuda" else "CPU"
    lines = [
        f"<!-- bench-run: {run.key} -->",
        f"### {heading}: {run.device_name}, {run.date}",
        "",
        f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, onnxruntime {info['onnxruntime']}, "
        f"Python {info['python']}, {info['torch_threads']} torch threads, sr3_engine {info['sr3_engine']}. "
        f"Peaks: {info['peak_bf16_tflops']:.3g} TFLOP/s bf16"
        + (f" ({'native' if info['native_bf16'] else 'emulated'})" if "native_bf16" in info else "")
        + (f", {info['peak_fp32_tflops']:.3g} TFLOP/s fp32" if "peak_fp32_tflops" in info else "")
        + f", {fmt(info['peak_gbps'])} GB/s "
        f"({info['peak_source']}).{tf32_note(run)} {provenance(run)}:",
        "",
        f"    {run.command}",
        "",
        *goals_table(run),
        *end_to_end_tables(run),
        *([f"![images/s and speed-up per batch]({chart_name})", ""] if chart_name else []),
        *step_table(run),
        *train_table(run),
        *op_table(run),
        *skipped_lines(run),
        "<!-- /bench-run -->",
    ]
    return "\n".join(lines)


def chart(run: Run, path: Path) -> bool:
    """Grouped bar charts of end-to-end images/s and speed-up per batch, one row per problem; False
    when there is nothing to plot."""
    problems = by_problem(run.rows_of("sample"))
    if not problems:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(problems), 2, figsize=(12, 4.5 * len(problems)), squeeze=False)
    for rows, (left, right) in zip(problems, axes):
        variants, batches, cells = _by_variant_and_batch(rows)
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(batches))]
            left.bar(xs, [cells[(variant, b)]["images_per_s"] if (variant, b) in cells else 0 for b in batches],
                     width, label=variant)
            right.bar(xs, [speedup(cells, variant, b) or 0 for b in batches], width, label=variant)
        first = rows[0]
        for axis, title in ((left, "images/s (log scale)"), (right, f"speed-up over {BASELINE}")):
            axis.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
            axis.set_title(f"{problem_title(first)}, {first['steps']} steps: {title}")
        left.set_yscale("log")
        right.axhline(1.0, color="black", linewidth=0.8)
        right.legend(fontsize=8, ncol=2)
    figure.suptitle(f"engine.sample - {run.device_name}, {run.date}")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return True


def update_results(results: Path, run: Run, text: str) -> str:
    """RESULTS.md with this run's section inserted (newest first) or replacing the one of the same key."""
    if not results.is_file():
        raise ReportError(f"{results}: missing; it must exist and hold the line {INSERT_MARKER}")
    document = results.read_text()
    pattern = re.compile(rf"<!-- bench-run: {re.escape(run.key)} -->.*?<!-- /bench-run -->", re.S)
    if pattern.search(document):
        return pattern.sub(lambda _: text, document, count=1)
    if INSERT_MARKER not in document:
        raise ReportError(f"{results}: has no line {INSERT_MARKER} to insert new runs after")
    return document.replace(INSERT_MARKER, f"{INSERT_MARKER}\n\n{text}", 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON files of one device")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the Markdown file to update")
    parser.add_argument("--command", help="the command to quote (default: the pytest command in the JSON)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the section and write nothing")
    args = parser.parse_args(argv)
    try:
        run = load(args.json)
        if args.command:
            run.commands = [args.command]
        chart_path = args.results.parent / f"RESULTS-{run.slug}.png"
        if args.print_only:
            print(section(run, None))
            return 0
        text = section(run, chart_path.name if run.rows_of("sample") else None)
        updated = update_results(args.results, run, text)
        if chart(run, chart_path):
            print(f"wrote {chart_path}")
        else:
            chart_path.unlink(missing_ok=True)  # a chart of an earlier report of this run no longer matches
        with atomic_path(args.results) as tmp:
            tmp.write_text(updated)
        print(f"wrote {args.results}")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
