"""Tables and plot from a benchmark JSON.

    python -m bench.report bench/results/cpu-fp32-bf16.json

writes cpu-fp32-bf16.md and cpu-fp32-bf16.png beside the JSON. Every number shown is derived here
from the raw per-run times the JSON stores, so a JSON alone regenerates its table and plot. The
label-smoothing variants (bench/variants.py) live in the JSON's "variants" section, the fused
linear + cross-entropy table (bench/linear.py) in its "linear" section and the library integrations
(bench/integrations.py: timm, transformers) in its "integrations" section; each gets a section of the
markdown and a row of the plot.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

# Mode name -> what one timed call does.
MODES = {
    "fwd+bwd": "forward + loss.backward()",
    "fwd+bwd scaled": "forward + (loss * 0.5).backward() (loss scaling, gradient accumulation)",
    "fwd": "forward only, inference under torch.no_grad()",
}
HEADLINE_MODE = "fwd+bwd"
BASELINE = "eager"
FLOOR = "copy"
# Contender name -> column title, in column order.
CONTENDERS = {
    "eager": "eager",
    "compile": "torch.compile",
    "smoothce": "smoothce",
    "liger": "Liger-Kernel",
    "flash_attn": "flash-attn",
    "copy": "copy (floor)",
}
DTYPE_ORDER = ("fp32", "bf16", "fp16")
# The variant rows (bench/variants.py): contender name -> title; the first is every group's baseline.
VARIANT_BASELINE = "plain"
VARIANT_CONTENDERS = {
    "plain": "plain PyTorch",
    "smoothce": "smoothce",
    "smoothce_inplace": "smoothce, inplace_backward=True",
}
VARIANT_MODES = ("fwd+bwd", "fwd")
# The fused linear + cross-entropy table (bench/linear.py): contender name -> title, in row order.
LINEAR_FLOOR = "matmul_floor"
LINEAR_BASELINE = "smoothce"
LINEAR_CONTENDERS = {
    "smoothce": "smoothce.linear_cross_entropy",
    "torch_lce": "torch F.linear_cross_entropy",
    "eager": "eager F.linear + F.cross_entropy",
    "compile": "torch.compile(F.linear + F.cross_entropy)",
    "liger": "Liger-Kernel fused linear CE",
    "cce": "Cut Cross-Entropy",
    "matmul_floor": "matmul floor (3 GEMMs)",
}
# Summary of the linear table: key -> (other contender, words); smoothce's time over the floor's first.
LINEAR_SUMMARY = {
    "smoothce_time_over_floor": (LINEAR_FLOOR, "smoothce time / matmul floor"),
    "smoothce_vs_torch_lce": ("torch_lce", "smoothce speed-up vs torch F.linear_cross_entropy"),
    "smoothce_vs_eager": ("eager", "smoothce speed-up vs eager"),
    "smoothce_vs_compile": ("compile", "smoothce speed-up vs torch.compile"),
}
# The library integrations (bench/integrations.py): contender name -> title. Each group (integration,
# shape, dtype) holds the library's own call and smoothce's drop-in for it.
INTEGRATION_BASELINE = "smoothce"
INTEGRATION_CONTENDERS = {
    "timm": "timm",
    "transformers": "transformers",
    "smoothce": "smoothce.integrations",
}


def smoothce_label(meta: dict) -> str:
    """'smoothce 0.1.0 (avx512 CPU kernels)': the version and, when known, the CPU build measured."""
    if not meta.get("smoothce_version"):
        return "smoothce not installed"
    build = meta.get("smoothce_build") or {}
    capability = build.get("cpu_capability")
    if capability and build.get("cpu_bf16"):
        capability += " + AVX512-BF16"
    return f"smoothce {meta['smoothce_version']}" + (f" ({capability} CPU kernels)" if capability else "")


def minimal_bytes(numel: int, itemsize: int, mode: str) -> int:
    """Bytes a perfect kernel must move: read the logits; with a backward also write the gradient.
    The copy floor always reads and writes them."""
    return numel * itemsize * (1 if mode == "fwd" else 2)


# ----------------------------------------------------------------------------- derived numbers

def time_stats(times_ms: list[float]) -> dict:
    """Median, quartiles and extremes of the per-run times (ms)."""
    ordered = sorted(times_ms)
    if len(ordered) >= 2:
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = median = q3 = ordered[0]
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": ordered[0], "max_ms": ordered[-1]}


def group_rows(rows: list[dict], last: str = "mode") -> dict[tuple, dict[str, dict]]:
    """(shape_str, dtype, row[last]) -> {contender: row}, in the rows' order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["shape_str"], row["dtype"], row[last]), {})[row["contender"]] = row
    return groups


def derive(data: dict) -> dict:
    """Fills in each measurement's statistics, GB/s, % of the copy bandwidth measured in the same
    group, speed-up vs eager, and the summary. Idempotent; returns data."""
    for row in data["measurements"]:
        row.update(time_stats(row["times_ms"]))
        row["gbps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
    for group in group_rows(data["measurements"]).values():
        eager, copy = group.get(BASELINE), group.get(FLOOR)
        for row in group.values():
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"] if eager else None
            row["pct_of_copy"] = 100.0 * row["gbps"] / copy["gbps"] if copy else None
    data["summary"] = summarize(data["measurements"])
    if data.get("variants"):
        derive_variants(data["variants"])
    if data.get("linear"):
        derive_linear(data["linear"])
    if data.get("integrations"):
        derive_integrations(data["integrations"])
    if data.get("overhead"):
        derive_overhead(data["overhead"])
    return data


# Issue-tracked goal for smoothce's per-call overhead (fwd+bwd on the overhead shape), in µs.
OVERHEAD_GOAL_US = 40.0
# The overhead section's extra row: x.sum().backward() on the same logits, the least any autograd loss
# costs on the machine (torch's backward call and engine); smoothce's own share is its time above it.
OVERHEAD_FLOOR = "autograd_floor"
OVERHEAD_TITLES = {OVERHEAD_FLOOR: "x.sum().backward() (autograd floor)"}


def derive_overhead(section: dict) -> dict:
    """The per-call overhead rows' median and quartiles (µs per call), smoothce's ratio to each and its
    time above the autograd floor (None where either is missing; older files have no floor). Idempotent."""
    rows = {}
    for row in section["rows"]:
        stats = time_stats(row["times_us"])
        row.update({"median_us": stats["median_ms"], "q1_us": stats["q1_ms"], "q3_us": stats["q3_ms"]})
        rows[row["contender"]] = row
    mine, floor = rows.get("smoothce"), rows.get(OVERHEAD_FLOOR)
    for row in section["rows"]:
        row["smoothce_speedup"] = row["median_us"] / mine["median_us"] if mine else None
    section["smoothce_above_floor_us"] = mine["median_us"] - floor["median_us"] if mine and floor else None
    return section


def overhead_summary_lines(section: dict) -> list[str]:
    """The per-call overhead in words (plain ASCII, for the console)."""
    shown = ", ".join(f"{row['contender']} {row['median_us']:.1f} us" for row in section["rows"])
    above = section.get("smoothce_above_floor_us")
    floor = "" if above is None else f"; smoothce {above:.1f} us above the autograd floor"
    return [f"per-call overhead ({section['shape_str']} {section['dtype']} {section['mode']}): {shown}{floor}"]


def overhead_markdown(section: dict) -> list[str]:
    titles = {**CONTENDERS, **OVERHEAD_TITLES}
    rows = [[titles.get(row["contender"], row["contender"]),
             f"**{row['median_us']:.1f} µs** [IQR {row['q1_us']:.1f}–{row['q3_us']:.1f}]",
             fmt_ratio(row["smoothce_speedup"])] for row in section["rows"]]
    calls = section["rows"][0]["calls_per_run"] if section["rows"] else 0
    above = section.get("smoothce_above_floor_us")
    floor = [] if above is None else [
        "", f"smoothce's own share, its time above the autograd floor: **{above:.1f} µs**. The floor is "
        f"the smallest graph torch differentiates (one sum of the same logits and its backward): what "
        f"`loss.backward()` costs on this machine whatever the loss."]
    return ["", f"## Per-call overhead: {section['mode']} on {section['shape_str']} {section['dtype']}", "",
            f"An input this small costs almost nothing to compute: the time is the call's fixed cost (Python, "
            f"autograd, dispatch, allocation, starting threads). Each timed run is a loop of {calls} calls, .grad "
            f"set to None before each; round-robin with the other contenders; label smoothing "
            f"{section['label_smoothing']}. Goal for smoothce: below {OVERHEAD_GOAL_US:g} µs.", ""] + \
        markdown_table(["contender", "time per call", "smoothce speed-up"], rows) + floor


def derive_variants(section: dict) -> dict:
    """The variant rows' statistics and speed-up over the plain-PyTorch version measured in the same
    group (variant, shape, dtype, mode); with the section's checks, its summary too. Idempotent."""
    for row in section["measurements"]:
        row.update(time_stats(row["times_ms"]))
    for group in variant_groups(section["measurements"]).values():
        plain = group.get(VARIANT_BASELINE)
        for row in group.values():
            row["speedup_vs_plain"] = plain["median_ms"] / row["median_ms"] if plain else None
    if "checks" in section:
        section["summary"] = summarize_variants(section["measurements"])
    return section


def variant_groups(rows: list[dict]) -> dict[tuple[str, str, str, str], dict[str, dict]]:
    """(variant, shape_str, dtype, mode) -> {contender: row}, in the rows' order."""
    groups: dict[tuple[str, str, str, str], dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["shape_str"], row["dtype"], row["mode"]), {})[row["contender"]] = row
    return groups


def summarize_variants(rows: list[dict]) -> dict:
    """variant -> mode -> contender -> geometric mean over shapes of its speed-up vs the plain version."""
    ratios: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (variant, _, _, mode), group in variant_groups(rows).items():
        for name, row in group.items():
            if name != VARIANT_BASELINE and row["speedup_vs_plain"] is not None:
                ratios.setdefault(variant, {}).setdefault(mode, {}).setdefault(name, []).append(row["speedup_vs_plain"])
    return {variant: {mode: {name: {"geomean": geometric_mean(values), "cells": len(values)}
                             for name, values in by_name.items()}
                      for mode, by_name in by_mode.items()}
            for variant, by_mode in ratios.items()}


def linear_groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(shape_str, dtype, label_smoothing) -> {contender: row}, in the rows' order."""
    return group_rows(rows, "label_smoothing")


def derive_linear(section: dict) -> dict:
    """The linear rows' statistics and, within each group (shape, dtype, ε): time over the matmul
    floor's, smoothce's speed-up over the row (the row's time / smoothce's) and the row's peak memory
    over smoothce's; with the section's checks, its summary too. Idempotent; returns section."""
    for row in section["measurements"]:
        row.update(time_stats(row["times_ms"]))
    for group in linear_groups(section["measurements"]).values():
        floor = group.get(LINEAR_FLOOR)
        for row in group.values():
            row["time_over_floor"] = row["median_ms"] / floor["median_ms"] if floor else None
        set_ratios_to_smoothce(group, group.get(LINEAR_BASELINE))
    if "checks" in section:
        section["summary"] = summarize_linear(section["measurements"])
    return section


def summarize_linear(rows: list[dict]) -> dict:
    """"ε" -> key -> geometric mean over (shape, dtype) of smoothce's time over the floor's and of its
    speed-up over each other contender."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for (_, _, eps), group in linear_groups(rows).items():
        mine = group.get(LINEAR_BASELINE)
        if mine is None:
            continue
        entry = ratios.setdefault(f"{eps:g}", {key: [] for key in LINEAR_SUMMARY})
        for key, (other, _) in LINEAR_SUMMARY.items():
            if other in group:
                ratio = group[other]["median_ms"] / mine["median_ms"]
                entry[key].append(1 / ratio if other == LINEAR_FLOOR else ratio)
    return {eps: {key: {"geomean": geometric_mean(values), "cells": len(values)} for key, values in by_key.items()}
            for eps, by_key in ratios.items()}


def integration_groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(shape_str, dtype, integration) -> {contender: row}, in the rows' order."""
    return group_rows(rows, "integration")


def set_ratios_to_smoothce(group: dict[str, dict], mine: dict | None) -> None:
    """Each row of a group: smoothce's speed-up over it (its time / smoothce's) and its peak extra
    memory over smoothce's (None where either is missing)."""
    for row in group.values():
        row["smoothce_speedup"] = row["median_ms"] / mine["median_ms"] if mine else None
        row["memory_vs_smoothce"] = (row["peak_extra_bytes"] / mine["peak_extra_bytes"]
                                     if mine and mine.get("peak_extra_bytes") and row.get("peak_extra_bytes")
                                     is not None else None)


def derive_integrations(section: dict) -> dict:
    """The integration rows' statistics and, within each group (integration, shape, dtype): smoothce's
    speed-up over the row (the row's time / smoothce's) and the row's peak memory over smoothce's; with
    the section's checks, its summary too. Idempotent; returns section."""
    for row in section["measurements"]:
        row.update(time_stats(row["times_ms"]))
    for group in integration_groups(section["measurements"]).values():
        set_ratios_to_smoothce(group, group.get(INTEGRATION_BASELINE))
    if "checks" in section:
        section["summary"] = summarize_integrations(section["measurements"])
    return section


def summarize_integrations(rows: list[dict]) -> dict:
    """integration -> {"library", "speedup", "memory_ratio"}: geometric means over (shape, dtype) of the
    library's time / smoothce's and of the library's peak extra memory / smoothce's."""
    ratios: dict[str, dict] = {}
    for (_, _, integration), group in integration_groups(rows).items():
        mine = group.get(INTEGRATION_BASELINE)
        for name, row in group.items():
            if name == INTEGRATION_BASELINE or mine is None:
                continue
            entry = ratios.setdefault(integration, {"library": name, "speedup": [], "memory_ratio": []})
            entry["speedup"].append(row["smoothce_speedup"])
            if row["memory_vs_smoothce"] is not None:
                entry["memory_ratio"].append(row["memory_vs_smoothce"])
    return {integration: {"library": entry["library"],
                          **{key: {"geomean": geometric_mean(entry[key]), "cells": len(entry[key])}
                             for key in ("speedup", "memory_ratio")}}
            for integration, entry in ratios.items()}


def geometric_mean(values: list[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def summarize(rows: list[dict]) -> dict:
    """Per mode, geometric means over (shape, dtype) of smoothce's speed-up vs eager and vs
    torch.compile, and of smoothce's time over the copy's time."""
    ratios: dict[str, dict[str, list[float]]] = {
        mode: {"smoothce_vs_eager": [], "smoothce_vs_compile": [], "smoothce_time_over_copy": []}
        for mode in MODES}
    for (_, _, mode), group in group_rows(rows).items():
        mine = group.get("smoothce")
        if mine is None or mode not in ratios:
            continue
        for key, other, mine_is_numerator in (("smoothce_vs_eager", "eager", False),
                                              ("smoothce_vs_compile", "compile", False),
                                              ("smoothce_time_over_copy", "copy", True)):
            if other in group:
                ratio = group[other]["median_ms"] / mine["median_ms"]
                ratios[mode][key].append(1 / ratio if mine_is_numerator else ratio)
    return {mode: {key: {"geomean": geometric_mean(values), "cells": len(values)}
                   for key, values in by_key.items()}
            for mode, by_key in ratios.items()}


def summary_lines(summary: dict, mode: str = HEADLINE_MODE) -> list[str]:
    """The end-of-run summary in words (plain ASCII, for the console)."""
    entry = summary.get(mode, {})
    if not any(v["cells"] for v in entry.values()):
        return [f"summary ({mode}): smoothce was not measured"]
    lines = [f"summary ({mode}, geometric mean over shape x dtype):"]
    for key, text in (("smoothce_vs_eager", "smoothce speed-up vs eager"),
                      ("smoothce_vs_compile", "smoothce speed-up vs torch.compile"),
                      ("smoothce_time_over_copy", "smoothce time / copy time")):
        value = entry[key]
        shown = f"{value['geomean']:.2f}x" if value["geomean"] is not None else "n/a"
        lines.append(f"  {text:<36} {shown:>8}   ({value['cells']} cells)")
    return lines


def variant_summary_lines(section: dict) -> list[str]:
    """The variants' end-of-run summary in words (plain ASCII, for the console)."""
    summary = section.get("summary") or {}
    if not summary:
        return ["variants: none measured"]
    lines = ["variants (fwd+bwd, speed-up vs the plain-PyTorch version, geometric mean over shapes):"]
    for variant, by_mode in summary.items():
        for name, value in by_mode.get("fwd+bwd", {}).items():
            lines.append(f"  {variant:<17} {name:<17} {value['geomean']:>6.2f}x   ({value['cells']} shapes)")
    failed = [c for c in section.get("checks", []) if not c["passed"]]
    if failed:
        lines.append(f"  {len(failed)} check(s) FAILED: those pairs were not timed")
    return lines


def linear_summary_lines(section: dict) -> list[str]:
    """The linear table's end-of-run summary in words (plain ASCII, for the console)."""
    summary = section.get("summary") or {}
    if not summary:
        lines = ["linear (fused linear + cross-entropy): none measured"]
    else:
        lines = ["linear (fused linear + cross-entropy, fwd+bwd, geometric mean over shapes):"]
        for eps, entry in summary.items():
            for key, (_, words) in LINEAR_SUMMARY.items():
                value = entry[key]
                if not value["cells"]:
                    continue
                lines.append(f"  eps={eps:<4} {words:<50} {value['geomean']:>6.2f}x   ({value['cells']} shapes)")
    failed = [c for c in section.get("checks", []) if not c["passed"]]
    if failed:
        lines.append(f"  {len(failed)} linear check(s) FAILED: those groups were not timed")
    return lines


def integration_summary_lines(section: dict) -> list[str]:
    """The integrations' end-of-run summary in words (plain ASCII, for the console)."""
    summary = section.get("summary") or {}
    if not summary:
        lines = ["integrations (timm, transformers): none measured"]
    else:
        lines = ["integrations (fwd+bwd, geometric mean over shapes; speed-up: library time / smoothce time, "
                 "memory: library peak / smoothce peak):"]
        for integration, entry in summary.items():
            memory = entry["memory_ratio"]["geomean"]
            lines.append(f"  {integration:<18} vs {entry['library']:<13} speed-up {entry['speedup']['geomean']:>6.2f}x"
                         f"   memory {'n/a' if memory is None else f'{memory:.2f}x':>7}"
                         f"   ({entry['speedup']['cells']} shapes)")
    skipped = sorted({s["contender"] for s in section.get("skipped", []) if s.get("shape_str") is None
                      and s["contender"] != "smoothce"})
    if skipped:
        lines.append(f"  skipped: {', '.join(skipped)} (see the report)")
    failed = [c for c in section.get("checks", []) if not c["passed"]]
    if failed:
        lines.append(f"  {len(failed)} integration check(s) FAILED: those groups were not timed")
    return lines


# ----------------------------------------------------------------------------- formatting

def fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3g}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n == 0:
        return "0"
    if n >= 2**30:
        return f"+{n / 2**30:.2f} GiB"
    if n >= 2**20 // 10:
        return f"+{n / 2**20:.1f} MiB"
    return f"+{n / 2**10:.1f} KiB"


def fmt_ratio(value: float | None, suffix: str = "×") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def ordered_keys(data: dict) -> list[tuple[str, str]]:
    """(shape_str, dtype) in the order the cells were requested."""
    keys = [(cell["shape_str"], cell["dtype"]) for cell in data.get("cells", [])]
    for row in data["measurements"]:
        if (row["shape_str"], row["dtype"]) not in keys:
            keys.append((row["shape_str"], row["dtype"]))
    return keys


def contenders_present(rows: list[dict]) -> list[str]:
    names = {row["contender"] for row in rows}
    return [c for c in CONTENDERS if c in names] + sorted(names - set(CONTENDERS))


def compact_cell(row: dict | None) -> str:
    if row is None:
        return "—"
    return " · ".join((f"**{fmt_ms(row['median_ms'])} ms**", fmt_ratio(row["speedup_vs_eager"]),
                       f"{row['gbps']:.1f} GB/s", fmt_pct(row["pct_of_copy"]),
                       fmt_bytes(row["peak_extra_bytes"])))


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def to_markdown(data: dict) -> str:
    meta, rows = data["meta"], data["measurements"]
    groups = group_rows(rows)
    contenders = contenders_present(rows)
    keys = ordered_keys(data)
    title_dtypes = (" + ".join(meta.get("dtypes", [])) if rows else "label-smoothing variants" if data.get("variants")
                    else "fused linear + cross-entropy" if data.get("linear")
                    else "library integrations" if data.get("integrations") else "no measurements")
    lines = [
        f"# smoothce benchmark: {meta['device']}, {title_dtypes}",
        "",
        f"{meta['device_name']} · {meta['threads']} threads · torch {meta['torch_version']} · "
        f"{smoothce_label(meta)} · {meta['date']} · "
        f"`{meta.get('command', 'python -m bench')}`",
        "",
    ]
    if rows:  # the standard table's set-up (the variants' section describes its own)
        lines += [
            f"- Loss: label smoothing {meta['label_smoothing']}, reduction `mean`; "
            f"segmentation shapes (more than 2 dims) use ignore_index {meta['segmentation_ignore_index']} "
            f"on {meta['ignored_fraction']:.0%} of the positions, other shapes ignore nothing.",
            f"- Timing: {meta['timing_method']}",
            f"- Runs: {meta['runs_policy']}",
            f"- GB/s: minimal bytes (N·C·itemsize read, plus as much written for the gradient when there "
            f"is a backward) / median time; % of copy: that over the bandwidth of `dst.copy_(src)` of "
            f"the same N·C tensor, measured in the same round-robin.",
            f"- Peak extra memory: {meta['memory_method']}",
            ]
    lines += [f"- Note: {note}" for note in meta.get("notes", [])]
    if rows:
        lines += main_tables(data, groups, contenders, keys)
    if data.get("overhead"):
        lines += overhead_markdown(data["overhead"])
    if data.get("variants"):
        lines += variants_markdown(data["variants"], meta)
    if data.get("linear"):
        lines += linear_markdown(data["linear"], meta)
    if data.get("integrations"):
        lines += integrations_markdown(data["integrations"], meta)

    if data.get("skipped"):
        lines += ["", "## Skipped", ""]
        for skip in data["skipped"]:
            where = f"{skip['shape_str']} {skip['dtype']}" if skip.get("shape_str") else "all shapes"
            lines.append(f"- {CONTENDERS.get(skip['contender'], skip['contender'])} ({where}): {skip['reason']}")
    notes = sorted({(row["contender"], row["note"]) for row in rows if row.get("note")})
    if notes:
        lines += ["", "## Contender notes", ""]
        lines += [f"- {CONTENDERS.get(name, name)}: {note}" for name, note in notes]
    if rows:
        lines += all_measurements_table(groups, contenders, keys)
    return "\n".join(lines) + "\n"


def main_tables(data: dict, groups: dict, contenders: list[str], keys: list[tuple[str, str]]) -> list[str]:
    """The summary and one table per mode of the standard shapes."""
    lines = ["", "## Summary (geometric mean over shape × dtype)", ""]
    summary_rows = []
    for mode in MODES:
        entry = data["summary"].get(mode)
        if not entry or not entry["smoothce_vs_eager"]["cells"]:
            continue
        summary_rows.append([mode] + [fmt_ratio(entry[k]["geomean"]) for k in
                                      ("smoothce_vs_eager", "smoothce_vs_compile",
                                       "smoothce_time_over_copy")]
                            + [str(entry["smoothce_vs_eager"]["cells"])])
    if summary_rows:
        lines += markdown_table(["mode", "smoothce speed-up vs eager", "smoothce speed-up vs torch.compile",
                                 "smoothce time / copy time", "cells"], summary_rows)
    else:
        lines.append("smoothce was not measured.")

    for mode, description in MODES.items():
        if not any(m == mode for (_, _, m) in groups):
            continue
        lines += ["", f"## {mode}: {description}", "",
                  "Each cell: median ms · speed-up vs eager · GB/s · % of copy bandwidth · peak extra memory.", ""]
        table = []
        for shape_str, dtype in keys:
            group = groups.get((shape_str, dtype, mode), {})
            table.append([shape_str, dtype] + [compact_cell(group.get(c)) for c in contenders])
        lines += markdown_table(["shape", "dtype"] + [CONTENDERS.get(c, c) for c in contenders], table)
    return lines


def all_measurements_table(groups: dict, contenders: list[str], keys: list[tuple[str, str]]) -> list[str]:
    lines = ["", "## All measurements", ""]
    table = []
    for shape_str, dtype in keys:
        for mode in MODES:
            group = groups.get((shape_str, dtype, mode), {})
            for name in contenders:
                row = group.get(name)
                if row is None:
                    continue
                table.append([shape_str, dtype, mode, name,
                              f"{row['runs']}{' (reduced)' if row.get('reduced_runs') else ''}",
                              fmt_ms(row["median_ms"]),
                              f"{fmt_ms(row['q1_ms'])}–{fmt_ms(row['q3_ms'])}",
                              f"{fmt_ms(row['min_ms'])}–{fmt_ms(row['max_ms'])}",
                              f"{row['gbps']:.1f}", fmt_pct(row["pct_of_copy"]),
                              fmt_ratio(row["speedup_vs_eager"]), fmt_bytes(row["peak_extra_bytes"])])
    lines += markdown_table(["shape", "dtype", "mode", "contender", "runs", "median ms", "IQR ms",
                             "min–max ms", "GB/s", "% of copy", "vs eager", "peak extra"], table)
    return lines


def fmt_rel(value: float | None) -> str:
    return "n/a" if value is None else ("0" if value == 0 else f"{value:.1e}")


def variants_markdown(section: dict, meta: dict) -> list[str]:
    """The variants' section: how each pair was built, the headline table, every measurement."""
    settings = section.get("settings", {})
    method = section.get("method", {})
    rows = section.get("measurements", [])
    groups = variant_groups(rows)
    checks = {(c["variant"], c["shape_str"], c["contender"]): c for c in section.get("checks", [])}
    lines = ["", f"## Label-smoothing variants ({section.get('dtype', 'fp32')}): smoothce against the plain-PyTorch version",
             "",
             f"{meta['device_name']} · {meta['threads']} threads · torch {meta['torch_version']} · "
             f"ε = {settings.get('label_smoothing')}, mixup lam = {settings.get('lam')}, z-loss α = {settings.get('z_loss')}, "
             f"target values {tuple(settings.get('target_values', ()))}, segmentation ignore_index "
             f"{settings.get('ignore_index')} on {settings.get('ignored_fraction', 0):.0%} of the positions.",
             ""]
    lines += [f"- Timing: {method['timing']}" if method.get("timing") else None,
              f"- Runs: {section['runs_policy']}" if section.get("runs_policy") else None,
              f"- Peak extra memory: {method['memory']}" if method.get("memory") else None,
              f"- Check: {method['check']}" if method.get("check") else None]
    lines = [line for line in lines if line is not None]
    if section.get("elapsed_s") is not None:
        lines.append(f"- The variant rows took {section['elapsed_s']:.0f} s of this run.")
    lines.append("- What each timed call runs (plain PyTorch: eager, as users write it):")
    for definition in section.get("definitions", []):
        lines.append(f"  - **{definition['variant']}** — {definition['title']}"
                     + (f"; {definition['setup']}" if definition.get("setup") else "") + ":")
        for name, code in definition["contenders"].items():
            lines.append(f"    {VARIANT_CONTENDERS.get(name, name)}: `{code}`")

    table = []
    for (variant, shape_str, dtype, mode), group in groups.items():
        if mode != VARIANT_MODES[0]:
            continue
        plain = group.get(VARIANT_BASELINE)
        fwd = groups.get((variant, shape_str, dtype, "fwd"), {})
        for name, row in group.items():
            if name == VARIANT_BASELINE:
                continue
            check = checks.get((variant, shape_str, name), {})
            table.append([variant, VARIANT_CONTENDERS.get(name, name), shape_str,
                          fmt_ms(plain["median_ms"]) if plain else "—", f"**{fmt_ms(row['median_ms'])}**",
                          f"**{fmt_ratio(row['speedup_vs_plain'])}**",
                          fmt_ratio(fwd[name]["speedup_vs_plain"]) if name in fwd else "—",
                          fmt_bytes(plain["peak_extra_bytes"]) if plain else "—", fmt_bytes(row["peak_extra_bytes"]),
                          f"{fmt_rel(check.get('loss_rel_diff'))} / {fmt_rel(check.get('grad_rel_diff'))}"])
    lines += ["", "fwd+bwd: forward + loss.backward(); fwd: forward under torch.no_grad(). Ratios: plain PyTorch's "
                  "median time / this row's, in the same round-robin.", ""]
    if table:
        lines += markdown_table(["variant", "contender", "shape", "plain ms (fwd+bwd)", "ms (fwd+bwd)",
                                 "speed-up fwd+bwd", "speed-up fwd", "peak extra, plain", "peak extra",
                                 "check: loss / grad rel. diff"], table)
    else:
        lines.append("No variant was measured.")
    for (variant, shape_str, dtype, mode), group in groups.items():
        if variant == "inplace_backward" and {"smoothce", "smoothce_inplace"} <= set(group):
            off, on = group["smoothce"], group["smoothce_inplace"]
            lines.append(f"\ninplace_backward {shape_str} {mode}: time with / without "
                         f"{on['median_ms'] / off['median_ms']:.2f}× ({fmt_ms(on['median_ms'])} vs "
                         f"{fmt_ms(off['median_ms'])} ms); peak extra memory {fmt_bytes(on['peak_extra_bytes'])} with, "
                         f"{fmt_bytes(off['peak_extra_bytes'])} without.")
    for skip in section.get("skipped", []):
        where = skip["shape_str"] or "all shapes"
        lines.append(f"\n- Not measured: {skip['variant']} ({where}): {skip['reason']}")

    lines += ["", "### Variant measurements", ""]
    table = []
    for (variant, shape_str, dtype, mode), group in groups.items():
        for name, row in group.items():
            table.append([variant, shape_str, dtype, mode, name,
                          f"{row['runs']}{' (reduced)' if row.get('reduced_runs') else ''}",
                          fmt_ms(row["median_ms"]), f"{fmt_ms(row['q1_ms'])}–{fmt_ms(row['q3_ms'])}",
                          f"{fmt_ms(row['min_ms'])}–{fmt_ms(row['max_ms'])}", fmt_ratio(row["speedup_vs_plain"]),
                          fmt_bytes(row["peak_extra_bytes"])])
    lines += markdown_table(["variant", "shape", "dtype", "mode", "contender", "runs", "median ms", "IQR ms",
                             "min–max ms", "vs plain", "peak extra"], table)
    return lines


def linear_markdown(section: dict, meta: dict) -> list[str]:
    """The fused linear + cross-entropy section: set-up, summary, a table per ε, checks, every measurement."""
    settings, method = section.get("settings", {}), section.get("method", {})
    rows = section.get("measurements", [])
    groups = linear_groups(rows)
    versions = section.get("versions", {})
    lines = ["", "## Fused linear + cross-entropy: smoothce.linear_cross_entropy against the alternatives", "",
             f"{meta['device_name']} · {meta['threads']} threads · torch {meta['torch_version']} · {smoothce_label(meta)}"
             + "".join(f" · {LINEAR_CONTENDERS.get(k, k)} {v}" for k, v in versions.items() if k != "torch")
             + f" · shapes (N, H, V): N rows of hidden size H, vocabulary V; input (N, H) and weight (V, H) are "
               f"leaves requiring grad; index targets with ignore_index {settings.get('ignore_index')} on "
               f"{settings.get('ignored_fraction', 0):.0%} of the rows; reduction `{settings.get('reduction')}`; "
               f"each timed call is one fwd+bwd (loss.backward(): gradients of the input and the weight).",
             ""]
    for key, title in (("timing", "Timing"), ("memory", "Peak extra memory"), ("check", "Check"),
                       ("floor", "× floor")):
        if method.get(key):
            lines.append(f"- {title}: {method[key]}")
    if section.get("runs_policy"):
        lines.append(f"- Runs: {section['runs_policy']}")
    if section.get("elapsed_s") is not None:
        lines.append(f"- The linear table took {section['elapsed_s']:.0f} s of this run.")
    lines.append("- What each timed call runs:")
    for name, definition in section.get("definitions", {}).items():
        lines.append(f"  - {LINEAR_CONTENDERS.get(name, name)}: `{definition['code']}`"
                     + (f" — {definition['note']}" if definition.get("note") else ""))
    chunks = [cell for cell in section.get("cells", []) if cell.get("torch_chunking")]
    if chunks:
        lines.append("- torch's chunked path (ε = 0) picked: " + "; ".join(
            f"{c['shape_str']} {c['dtype']}: {c['torch_chunking']['batch_chunk_size']} rows per chunk, acc_policy "
            f"'{c['torch_chunking']['acc_policy']}'" for c in chunks) + ". smoothce's default chunk: " + "; ".join(
            f"{c['shape_str']} {c['dtype']}: {c['smoothce_chunk_rows']} rows" for c in chunks) + ".")
    compiled = [cell for cell in section.get("cells", []) if cell.get("compile_seconds") is not None]
    if compiled:
        lines.append("- torch.compile time (not in the timings): " + "; ".join(
            f"{c['shape_str']} {c['dtype']} ε={c['label_smoothing']:g}: {c['compile_seconds']:.1f} s" for c in compiled)
            + ".")

    summary = section.get("summary") or {}
    if summary:
        lines += ["", "### Summary (fwd+bwd, geometric mean over shapes)", ""]
        table = [[f"{eps}"] + [fmt_ratio(entry[key]["geomean"]) for key in LINEAR_SUMMARY]
                 + [str(entry["smoothce_time_over_floor"]["cells"])] for eps, entry in summary.items()]
        lines += markdown_table(["ε"] + [words for _, words in LINEAR_SUMMARY.values()] + ["shapes"], table)

    for eps in dict.fromkeys(key[2] for key in groups):
        lines += ["", f"### ε = {eps:g}" + (" (torch's chunked path applies)" if eps == 0 else
                                            " (torch's chunked path does not apply: it falls back to full logits)"),
                  "", "Times: median of the runs; × floor: time / the matmul floor's; smoothce speed-up: this "
                  "row's time / smoothce's; memory vs smoothce: this row's peak extra memory / smoothce's.", ""]
        table = []
        for (shape, dtype, group_eps), group in groups.items():
            if group_eps != eps:
                continue
            for name in list(LINEAR_CONTENDERS) + sorted(set(group) - set(LINEAR_CONTENDERS)):
                row = group.get(name)
                if row is None:
                    continue
                bold = name == LINEAR_BASELINE
                table.append([shape, dtype, f"**{LINEAR_CONTENDERS.get(name, name)}**" if bold
                              else LINEAR_CONTENDERS.get(name, name),
                              fmt_ms(row["median_ms"]), fmt_ratio(row["time_over_floor"]),
                              "—" if name in (LINEAR_BASELINE, LINEAR_FLOOR) else fmt_ratio(row["smoothce_speedup"]),
                              fmt_bytes(row["peak_extra_bytes"]),
                              "—" if name == LINEAR_BASELINE else fmt_ratio(row["memory_vs_smoothce"])])
        lines += markdown_table(["shape (N×H×V)", "dtype", "contender", "time ms", "× floor", "smoothce speed-up",
                                 "peak extra memory", "memory vs smoothce"], table)
    if not groups:
        lines += ["", "No linear group was measured."]

    checks = section.get("checks", [])
    if checks:
        lines += ["", "### Checks: smoothce against eager, before timing", ""]
        lines += markdown_table(
            ["shape", "dtype", "ε", "loss rel. diff", "grad rel. diff (input / weight)", "rtol", "result"],
            [[c["shape_str"], c["dtype"], f"{c['label_smoothing']:g}", fmt_rel(c.get("loss_rel_diff")),
              f"{fmt_rel(c.get('grad_rel_diff_input'))} / {fmt_rel(c.get('grad_rel_diff_linear_weight'))}",
              f"{c['rtol']:g}", "passed" if c["passed"] else f"FAILED{': ' + c['error'] if c.get('error') else ''}"]
             for c in checks])
    if section.get("skipped"):
        lines.append("")
    for skip in section.get("skipped", []):
        where = (f"{skip['shape_str']} {skip['dtype']} ε={skip['label_smoothing']:g}" if skip.get("shape_str")
                 else "all shapes")
        lines.append(f"- Not measured: {LINEAR_CONTENDERS.get(skip['contender'], skip['contender'])} ({where}): "
                     f"{skip['reason']}")

    lines += ["", "### Linear measurements", ""]
    table = []
    for (shape, dtype, eps), group in groups.items():
        for name, row in group.items():
            table.append([shape, dtype, f"{eps:g}", name, str(row["runs"]), fmt_ms(row["median_ms"]),
                          f"{fmt_ms(row['q1_ms'])}–{fmt_ms(row['q3_ms'])}", f"{fmt_ms(row['min_ms'])}–{fmt_ms(row['max_ms'])}",
                          fmt_ratio(row["time_over_floor"]), fmt_ratio(row["smoothce_speedup"]),
                          fmt_bytes(row["peak_extra_bytes"])])
    lines += markdown_table(["shape", "dtype", "ε", "contender", "runs", "median ms", "IQR ms", "min–max ms",
                             "× floor", "smoothce speed-up", "peak extra"], table)
    return lines


def integrations_markdown(section: dict, meta: dict) -> list[str]:
    """The library integrations' section: set-up, summary, the headline table, checks, every measurement."""
    settings, method = section.get("settings", {}), section.get("method", {})
    rows = section.get("measurements", [])
    groups = integration_groups(rows)
    versions = section.get("versions", {})
    checks = {(c["integration"], c["shape_str"], c["dtype"]): c for c in section.get("checks", [])}
    definitions = section.get("definitions", {})
    lines = ["", "## Library integrations: timm and transformers against smoothce.integrations", "",
             f"{meta['device_name']} · {meta['threads']} threads · torch {meta['torch_version']} · {smoothce_label(meta)}"
             + "".join(f" · {k} {v}" for k, v in versions.items() if k != "torch")
             + " · each timed call is one training step's loss: forward + loss.backward() on logits that are a "
               "leaf requiring grad (the model's output).",
             ""]
    for key, title in (("timing", "Timing"), ("memory", "Peak extra memory"), ("check", "Check")):
        if method.get(key):
            lines.append(f"- {title}: {method[key]}")
    if section.get("runs_policy"):
        lines.append(f"- Runs: {section['runs_policy']}")
    if section.get("elapsed_s") is not None:
        lines.append(f"- The integration rows took {section['elapsed_s']:.0f} s of this run.")
    if settings:
        lines.append("- Settings: " + "; ".join(f"{key} {value}" for key, value in settings.items()) + ".")
    lines.append("- What each timed call runs:")
    for integration, definition in definitions.items():
        lines.append(f"  - **{integration}** — {definition['title']}"
                     + (f"; {definition['note']}" if definition.get("note") else "") + ":")
        for name, code in definition["contenders"].items():
            lines.append(f"    {INTEGRATION_CONTENDERS.get(name, name)}: `{code}`")

    summary = section.get("summary") or {}
    if summary:
        lines += ["", "### Summary (fwd+bwd, geometric mean over shapes)", ""]
        lines += markdown_table(
            ["integration", "library", "smoothce speed-up (library time / smoothce time)",
             "memory ratio (library peak / smoothce peak)", "shapes"],
            [[integration, entry["library"], fmt_ratio(entry["speedup"]["geomean"]),
              fmt_ratio(entry["memory_ratio"]["geomean"]), str(entry["speedup"]["cells"])]
             for integration, entry in summary.items()])

    lines += ["", "### Integrations (fwd+bwd)", "",
              "Times: median of the runs; smoothce speed-up: the library's time / smoothce's; memory ratio: the "
              "library's peak extra memory / smoothce's; both measured in the same round-robin.", ""]
    table = []
    for (shape, dtype, integration), group in groups.items():
        mine = group.get(INTEGRATION_BASELINE)
        for name, row in group.items():
            if name == INTEGRATION_BASELINE:
                continue
            check = checks.get((integration, shape, dtype), {})
            table.append([integration, shape, dtype, INTEGRATION_CONTENDERS.get(name, name), fmt_ms(row["median_ms"]),
                          f"**{fmt_ms(mine['median_ms'])}**" if mine else "—",
                          f"**{fmt_ratio(row['smoothce_speedup'])}**", fmt_bytes(row["peak_extra_bytes"]),
                          fmt_bytes(mine["peak_extra_bytes"]) if mine else "—", fmt_ratio(row["memory_vs_smoothce"]),
                          f"{fmt_rel(check.get('loss_rel_diff'))} / {fmt_rel(check.get('grad_rel_diff'))}"])
    if table:
        lines += markdown_table(["integration", "shape", "dtype", "library", "library ms", "smoothce ms",
                                 "smoothce speed-up", "library peak extra", "smoothce peak extra", "memory ratio",
                                 "check: loss / grad rel. diff"], table)
    else:
        lines.append("No integration was measured.")

    if checks:
        lines += ["", "### Checks: smoothce against the library, before timing", ""]
        lines += markdown_table(
            ["integration", "shape", "dtype", "loss (library / smoothce)", "loss rel. diff", "grad rel. diff",
             "rtol", "result"],
            [[c["integration"], c["shape_str"], c["dtype"],
              f"{c['reference_loss']:.6g} ({c.get('reference_loss_dtype', '?')}) / {c['loss']:.6g} "
              f"({c.get('loss_dtype', '?')})" if c.get("loss") is not None else "—",
              fmt_rel(c.get("loss_rel_diff")), fmt_rel(c.get("grad_rel_diff")), f"{c['rtol']:g}",
              "passed" if c["passed"] else f"FAILED{': ' + c['error'] if c.get('error') else ''}"]
             for c in checks.values()])
    if section.get("skipped"):
        lines.append("")
    for skip in section.get("skipped", []):
        where = f"{skip['shape_str']} {skip['dtype']}" if skip.get("shape_str") else "all shapes"
        lines.append(f"- Not measured: {skip.get('integration') or 'all integrations'} "
                     f"({INTEGRATION_CONTENDERS.get(skip['contender'], skip['contender'])}, {where}): {skip['reason']}")

    lines += ["", "### Integration measurements", ""]
    table = []
    for (shape, dtype, integration), group in groups.items():
        for name, row in group.items():
            table.append([integration, shape, dtype, name,
                          f"{row['runs']}{' (reduced)' if row.get('reduced_runs') else ''}", fmt_ms(row["median_ms"]),
                          f"{fmt_ms(row['q1_ms'])}–{fmt_ms(row['q3_ms'])}",
                          f"{fmt_ms(row['min_ms'])}–{fmt_ms(row['max_ms'])}", fmt_ratio(row["smoothce_speedup"]),
                          fmt_bytes(row["peak_extra_bytes"])])
    lines += markdown_table(["integration", "shape", "dtype", "contender", "runs", "median ms", "IQR ms",
                             "min–max ms", "smoothce speed-up", "peak extra"], table)
    return lines


# ----------------------------------------------------------------------------- plot

def plot(data: dict, path: Path) -> None:
    """Per dtype: speed-up vs eager and % of copy bandwidth (fwd+bwd), shapes ordered by C; then, when
    the variants were measured, their speed-up over the plain-PyTorch version and their peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in data["measurements"] if row["mode"] == HEADLINE_MODE]
    present = {row["dtype"] for row in rows}
    dtypes = [d for d in DTYPE_ORDER if d in present] + sorted(present - set(DTYPE_ORDER))
    contenders = contenders_present(rows)
    variant_rows = [row for row in (data.get("variants") or {}).get("measurements", []) if row["mode"] == HEADLINE_MODE]
    linear_rows = (data.get("linear") or {}).get("measurements", [])
    integration_rows = (data.get("integrations") or {}).get("measurements", [])
    panel_rows = max(len(dtypes) + (1 if variant_rows else 0) + (1 if linear_rows else 0)
                     + (1 if integration_rows else 0), 1)
    fig, axes = plt.subplots(panel_rows, 2, figsize=(13, 4.2 * panel_rows), squeeze=False)
    for axes_row, dtype in zip(axes, dtypes):
        mine = [row for row in rows if row["dtype"] == dtype]
        # Several shapes can share C, so the axis is categorical: shapes sorted by (C, size).
        shapes = sorted({(row["num_classes"], math.prod(row["shape"]), row["shape_str"]) for row in mine})
        labels = [shape_str for _, _, shape_str in shapes]
        by_key = {(row["shape_str"], row["contender"]): row for row in mine}
        for ax, metric, title in ((axes_row[0], "speedup_vs_eager", "speed-up vs eager (×)"),
                                  (axes_row[1], "pct_of_copy", "% of copy bandwidth")):
            for name in contenders:
                values = [by_key.get((label, name), {}).get(metric) for label in labels]
                values = [math.nan if v is None else v for v in values]
                style = dict(linestyle="--", color="0.5") if name == FLOOR else {}
                ax.plot(range(len(labels)), values, marker="o", label=CONTENDERS.get(name, name), **style)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
            ax.set_xlabel("shape, ordered by number of classes C")
            ax.set_title(f"{dtype}, {HEADLINE_MODE}: {title}")
            ax.grid(True, alpha=0.3)
        axes_row[0].set_yscale("log")
        axes_row[0].axhline(1.0, color="black", linewidth=0.8)
        axes_row[0].legend(fontsize=8)
    if variant_rows:
        plot_variants(axes[len(dtypes)], variant_rows)
    if linear_rows:
        plot_linear(axes[len(dtypes) + (1 if variant_rows else 0)], linear_rows)
    if integration_rows:
        plot_integrations(axes[len(dtypes) + (1 if variant_rows else 0) + (1 if linear_rows else 0)],
                          integration_rows)
    meta = data["meta"]
    fig.suptitle(f"smoothce {meta.get('smoothce_version') or '(not installed)'} vs alternatives: "
                 f"{meta['device']} ({meta['device_name']}, {meta['threads']} threads), "
                 f"torch {meta['torch_version']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


VARIANT_COLORS = {"plain": "0.6", "smoothce": "C0", "smoothce_inplace": "C1"}


def grouped_bars(ax, groups: dict, metric: str, names_of, color_of, label_of, min_bytes: int = 0) -> None:
    """One cluster of bars per group (its names_of(group) contenders' row[metric]; peak_extra_bytes in
    MiB, at least min_bytes), each contender in the legend once."""
    labelled = set()
    for position, group in enumerate(groups.values()):
        names = names_of(group)
        width = 0.8 / max(len(names), 1)
        for index, name in enumerate(names):
            value = group[name].get(metric)
            if value is None:
                continue
            if metric == "peak_extra_bytes":
                value = max(value, min_bytes) / 2**20
            ax.bar(position + (index - (len(names) - 1) / 2) * width, value, width, color=color_of(name),
                   label=None if name in labelled else label_of(name))
            labelled.add(name)


def plot_variants(axes_row, rows: list[dict]) -> None:
    """Bars per (variant, shape): speed-up over the plain version; peak extra memory of each contender."""
    groups = variant_groups(rows)
    labels = [f"{variant}\n{shape_str}" for variant, shape_str, _, _ in groups]
    for ax, metric, title in ((axes_row[0], "speedup_vs_plain", "speed-up vs plain PyTorch (×)"),
                              (axes_row[1], "peak_extra_bytes", "peak extra memory (MiB)")):
        grouped_bars(ax, groups, metric, lambda group, metric=metric: [
            n for n in VARIANT_CONTENDERS if n in group and (metric != "speedup_vs_plain" or n != VARIANT_BASELINE)],
            VARIANT_COLORS.get, VARIANT_CONTENDERS.get)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"label-smoothing variants, fp32, {HEADLINE_MODE}: {title}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes_row[0].axhline(1.0, color="black", linewidth=0.8)


def plot_linear(axes_row, rows: list[dict]) -> None:
    """Bars per (shape, dtype, ε): each contender's time over the matmul floor; its peak extra memory."""
    groups = linear_groups(rows)
    labels = [f"{shape} {dtype}\nε={eps:g}" for shape, dtype, eps in groups]
    for ax, metric, title in ((axes_row[0], "time_over_floor", "time / matmul floor (×)"),
                              (axes_row[1], "peak_extra_bytes", "peak extra memory (MiB)")):
        grouped_bars(ax, groups, metric, lambda group, metric=metric: [
            n for n in LINEAR_CONTENDERS if n in group and not (metric == "time_over_floor" and n == LINEAR_FLOOR)],
            lambda name: f"C{list(LINEAR_CONTENDERS).index(name)}", LINEAR_CONTENDERS.get, min_bytes=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"fused linear + cross-entropy, fwd+bwd: {title}")
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes_row[1].get_legend_handles_labels()  # the memory panel shows every contender
    axes_row[0].legend(handles, labels, fontsize=7, loc="upper left")
    axes_row[0].axhline(1.0, color="black", linewidth=0.8)


def plot_integrations(axes_row, rows: list[dict]) -> None:
    """Bars per (integration, shape, dtype): smoothce's speed-up over the library; each contender's peak
    extra memory."""
    groups = integration_groups(rows)
    labels = [f"{integration}\n{shape} {dtype}" for shape, dtype, integration in groups]
    for ax, metric, title in ((axes_row[0], "smoothce_speedup", "smoothce speed-up: library time / smoothce time (×)"),
                              (axes_row[1], "peak_extra_bytes", "peak extra memory (MiB)")):
        grouped_bars(ax, groups, metric, lambda group, metric=metric: [
            n for n in list(INTEGRATION_CONTENDERS) + sorted(set(group) - set(INTEGRATION_CONTENDERS))
            if n in group and not (metric == "smoothce_speedup" and n == INTEGRATION_BASELINE)],
            lambda name: f"C{list(INTEGRATION_CONTENDERS).index(name)}" if name in INTEGRATION_CONTENDERS else "0.5",
            lambda name: INTEGRATION_CONTENDERS.get(name, name), min_bytes=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"library integrations, fwd+bwd: {title}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes_row[0].axhline(1.0, color="black", linewidth=0.8)


def write_reports(data: dict, json_path: Path) -> tuple[Path, Path]:
    """Writes <stem>.md and <stem>.png beside json_path; returns their paths."""
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(to_markdown(data), encoding="utf-8")
    plot(data, png_path)
    return md_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Regenerate the .md table and .png plot of benchmark JSON files.")
    parser.add_argument("json", nargs="+", type=Path, help="results written by python -m bench")
    args = parser.parse_args(argv)
    for json_path in args.json:
        data = derive(json.loads(json_path.read_text(encoding="utf-8")))
        md_path, png_path = write_reports(data, json_path)
        print("\n".join(summary_lines(data["summary"]) if data["measurements"] else []))
        if data.get("variants"):
            print("\n".join(variant_summary_lines(data["variants"])))
        if data.get("linear"):
            print("\n".join(linear_summary_lines(data["linear"])))
        if data.get("integrations"):
            print("\n".join(integration_summary_lines(data["integrations"])))
        print(f"wrote {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
