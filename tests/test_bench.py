"""The benchmark runs end to end and its JSON, markdown table and PNG plot agree with each other.

How fast anything is is not tested here: only that every measurement is recorded, shown and drawn.
"""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only  # runs the CPU kernels on purpose (bench, example)

ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"torch_version", "smoothce_version", "device", "device_name", "threads", "date",
             "timing_method", "memory_method", "runs_policy", "dtypes"}
MODES = {"fwd", "fwd+bwd", "fwd+bwd scaled"}
VARIANT_MODES = {"others": {"fwd+bwd", "fwd"}, "z_loss": {"fwd+bwd", "fwd"}, "mixup": {"fwd+bwd", "fwd"},
                 "target_values": {"fwd+bwd", "fwd"}, "inplace_backward": {"fwd+bwd"}}
# The linear table's contenders measured on CPU with --no-compile (Liger and Cut Cross-Entropy: CUDA only).
LINEAR_CONTENDERS = {"matmul_floor", "smoothce", "torch_lce", "eager"}
LINEAR_SMOOTHINGS = {0.1, 0.0}
# The integration groups (bench/integrations.py) and the library each is measured against.
INTEGRATION_GROUPS = {"timm_mixup": "timm", "hf_label_smoother": "transformers", "hf_causal_lm_loss": "transformers"}
SUITES = ("ops", "variants", "linear", "integrations")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_report_module():
    # bench/ is not an installed package: load report.py (which imports nothing from bench) by path.
    spec = importlib.util.spec_from_file_location("bench_report_under_test", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(*args, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_quick(out, *extra):
    stdout = run_python("-m", "bench", "--quick", "--device", "cpu", "--out", str(out), *extra)
    json_files = sorted(out.glob("*.json"))
    expected = ["cpu-fp32-bf16-quick.json"] + ([] if "--no-distributed" in extra else ["cpu-distributed-quick.json"])
    assert sorted(p.name for p in json_files) == sorted(expected), stdout
    return stdout, out / "cpu-fp32-bf16-quick.json"


def md_measurement_rows(md, heading="## All measurements"):
    """The rows of the table under heading (up to the next heading), as lists of cells."""
    table = md.split(heading, 1)[1].split("\n#", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # skip header


def check_overhead(data, md):
    """The per-call overhead section: every contender of the main table's fwd+bwd but the copy, and the
    autograd floor (x.sum().backward()), timed as loops of calls (µs per call), smoothce's ratio taken to
    each and its time above the floor, all shown in the .md."""
    report = load_report_module()
    section = data["overhead"]
    assert (section["shape_str"], section["dtype"], section["mode"]) == ("8x10", "fp32", "fwd+bwd")
    main_contenders = {row["contender"] for row in data["measurements"] if row["mode"] == "fwd+bwd"}
    rows = {row["contender"]: row for row in section["rows"]}
    assert set(rows) == main_contenders - {"copy"} | {report.OVERHEAD_FLOOR}
    for row in rows.values():
        assert row["calls_per_run"] > 1 and row["times_us"] and all(t > 0 for t in row["times_us"])
        assert row["q1_us"] <= row["median_us"] <= row["q3_us"]
        if "smoothce" in rows:
            assert row["smoothce_speedup"] == pytest.approx(row["median_us"] / rows["smoothce"]["median_us"])
    above = rows["smoothce"]["median_us"] - rows[report.OVERHEAD_FLOOR]["median_us"]
    assert section["smoothce_above_floor_us"] == pytest.approx(above)
    table = md_measurement_rows(md, "## Per-call overhead")
    names = {**report.CONTENDERS, **report.OVERHEAD_TITLES}
    assert [cells[0] for cells in table] == [names.get(name, name) for name in rows]
    for cells, row in zip(table, rows.values()):
        assert f"{row['median_us']:.1f} µs" in cells[1]
    overhead_text = md.split("## Per-call overhead", 1)[1].split("\n#", 1)[0]
    assert f"above the autograd floor: **{above:.1f} µs**" in overhead_text


def test_overhead_without_floor_derives():
    """A results file from before the floor row (no autograd_floor) still derives and renders."""
    report = load_report_module()
    section = {"shape_str": "8x10", "dtype": "fp32", "mode": "fwd+bwd", "label_smoothing": 0.1, "skipped": [],
               "rows": [{"contender": name, "calls_per_run": 100, "times_us": times}
                        for name, times in (("eager", [5.0, 6.0, 7.0]), ("smoothce", [2.0, 3.0, 4.0]))]}
    report.derive_overhead(section)
    assert section["smoothce_above_floor_us"] is None
    assert section["rows"][0]["smoothce_speedup"] == pytest.approx(2.0)
    text = "\n".join(report.overhead_markdown(section))
    assert "autograd floor" not in text and "**3.0 µs**" in text
    section["rows"].append({"contender": report.OVERHEAD_FLOOR, "calls_per_run": 100, "times_us": [1.0, 2.0, 2.5]})
    report.derive_overhead(section)
    assert section["smoothce_above_floor_us"] == pytest.approx(1.0)
    text = "\n".join(report.overhead_markdown(section))
    assert "x.sum().backward() (autograd floor)" in text and "above the autograd floor: **1.0 µs**" in text


def check_variants(data, md):
    """The variant rows: every variant checked before it was timed, its groups complete, ratios taken
    against the plain version of the same group, memory of both in-place settings, all shown in the .md."""
    section = data["variants"]
    rows = section["measurements"]
    assert {row["variant"] for row in rows} == set(VARIANT_MODES)
    checks = section["checks"]
    assert checks and all(check["passed"] for check in checks), checks
    for check in checks:
        assert check["loss_rel_diff"] <= check["rtol"] and check["grad_rel_diff"] <= check["rtol"]
    checked = {(check["variant"], check["shape_str"], check["contender"]) for check in checks}
    groups = {}
    for row in rows:
        assert row["dtype"] == "fp32"
        assert row["runs"] == len(row["times_ms"]) >= 1 and all(t > 0 for t in row["times_ms"])
        assert row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] <= row["max_ms"]
        assert row["peak_extra_bytes"] is not None
        if row["contender"] != "plain":
            assert (row["variant"], row["shape_str"], row["contender"]) in checked, f"timed unchecked: {row}"
        groups.setdefault((row["variant"], row["shape_str"], row["mode"]), {})[row["contender"]] = row
    for variant, modes in VARIANT_MODES.items():
        assert {mode for (v, _, mode) in groups if v == variant} == modes, variant
    for (variant, shape_str, mode), group in groups.items():
        assert {"plain", "smoothce"} <= set(group), (variant, shape_str, mode)
        for row in group.values():
            assert row["speedup_vs_plain"] == pytest.approx(group["plain"]["median_ms"] / row["median_ms"])
        assert (len(group["plain"]["shape"]) == 4) == (variant == "target_values")
        if variant == "inplace_backward":  # allocation counts, not timings: the gradient is no allocation
            assert group["smoothce_inplace"]["peak_extra_bytes"] < group["smoothce"]["peak_extra_bytes"]
    assert all(section["summary"][variant]["fwd+bwd"]["smoothce"]["geomean"] > 0 for variant in VARIANT_MODES)

    assert "## Label-smoothing variants" in md and data["meta"]["device_name"] in md
    table = md_measurement_rows(md, "### Variant measurements")
    assert len(table) == len(rows), "the variants' markdown table and the JSON disagree"
    shown = {tuple(cells[:5]) for cells in table}
    for row in rows:
        assert (row["variant"], row["shape_str"], row["dtype"], row["mode"], row["contender"]) in shown, row


def check_linear(data, md):
    """The fused linear + cross-entropy table: every (shape, dtype) at both ε, smoothce checked against
    eager before it was timed, ratios taken within the group, memory recorded, all shown in the .md."""
    section = data["linear"]
    rows = section["measurements"]
    checks = section["checks"]
    assert checks and all(check["passed"] for check in checks), checks
    for check in checks:
        assert check["loss_rel_diff"] <= check["rtol"] and check["grad_rel_diff"] <= check["rtol"]
    checked = {(check["shape_str"], check["dtype"], check["label_smoothing"]) for check in checks}
    groups = {}
    for row in rows:
        assert row["runs"] == len(row["times_ms"]) >= 1 and all(t > 0 for t in row["times_ms"])
        assert row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] <= row["max_ms"]
        assert row["peak_extra_bytes"] is not None and row["peak_extra_bytes"] > 0, row
        assert len(row["shape"]) == 3 and row["shape_str"] == "x".join(map(str, row["shape"]))
        assert (row["shape_str"], row["dtype"], row["label_smoothing"]) in checked, f"timed unchecked: {row}"
        groups.setdefault((row["shape_str"], row["dtype"]), {}).setdefault(row["label_smoothing"], {})[
            row["contender"]] = row
    assert {dtype for _, dtype in groups} == {"fp32", "bf16"}
    assert {(cell["shape_str"], cell["dtype"]) for cell in section["cells"]} == set(groups)
    no_compile = "--no-compile" in data["meta"]["command"]
    compile_skips = {(s["shape_str"], s["dtype"], s["label_smoothing"]) for s in section["skipped"]
                     if s["contender"] == "compile"}
    for key, by_eps in groups.items():
        assert set(by_eps) == LINEAR_SMOOTHINGS, key
        for eps, group in by_eps.items():
            compiled = not no_compile and key + (eps,) not in compile_skips  # else skipped with a reason
            assert set(group) == LINEAR_CONTENDERS | ({"compile"} if compiled else set()), (key, eps, sorted(group))
            floor, mine = group["matmul_floor"], group["smoothce"]
            for row in group.values():
                assert row["time_over_floor"] == pytest.approx(row["median_ms"] / floor["median_ms"])
                assert row["smoothce_speedup"] == pytest.approx(row["median_ms"] / mine["median_ms"])
                assert row["memory_vs_smoothce"] == pytest.approx(row["peak_extra_bytes"] / mine["peak_extra_bytes"])
            assert group["torch_lce"]["note"] == ("chunked path" if eps == 0 else
                                                  "reference path (full logits): its chunked path has no label smoothing")
    for eps in ("0.1", "0"):
        for key in ("smoothce_time_over_floor", "smoothce_vs_torch_lce", "smoothce_vs_eager"):
            entry = section["summary"][eps][key]
            assert entry["cells"] == len(groups) and entry["geomean"] > 0, (eps, key)
        if no_compile:
            assert section["summary"][eps]["smoothce_vs_compile"]["cells"] == 0
    if no_compile:
        assert any(s["contender"] == "compile" and s["reason"] == "--no-compile" for s in section["skipped"])
    assert {s["contender"] for s in section["skipped"] if s["reason"] == "CUDA only"} == {"liger", "cce"}
    assert set(section["definitions"]) >= LINEAR_CONTENDERS | {"compile", "liger", "cce"}
    assert "options ignored" in section["definitions"]["torch_lce"]["note"].replace("``", "")

    assert "## Fused linear + cross-entropy" in md
    linear_md = md.split("## Fused linear + cross-entropy", 1)[1]
    assert data["meta"]["device_name"] in linear_md and data["meta"]["torch_version"] in linear_md
    for heading in ("### ε = 0.1", "### ε = 0 "):
        assert heading in linear_md, heading
        header = md_measurement_rows(md, heading)
        assert len(header) == sum(len(by_eps[float(heading.split("= ")[1])]) for by_eps in groups.values())
    table = md_measurement_rows(md, "### Linear measurements")
    assert len(table) == len(rows), "the linear markdown table and the JSON disagree"
    shown = {tuple(cells[:4]) for cells in table}
    for row in rows:
        assert (row["shape_str"], row["dtype"], f"{row['label_smoothing']:g}", row["contender"]) in shown, row


def check_integrations(data, md):
    """The library integrations: every group checked against the library before it was timed (Mixup's
    images mixed alike), each group the library's call and smoothce's, ratios taken within the group,
    memory recorded, all shown in the .md."""
    section = data["integrations"]
    rows = section["measurements"]
    checks = section["checks"]
    assert checks and all(check["passed"] for check in checks), checks
    for check in checks:
        assert check["loss_rel_diff"] <= check["rtol"] and check["grad_rel_diff"] <= check["rtol"]
        assert check["reference"] == INTEGRATION_GROUPS[check["integration"]] and check["contender"] == "smoothce"
        assert check.get("same_mixed_images") is (True if check["integration"] == "timm_mixup" else None), check
    checked = {(check["integration"], check["shape_str"], check["dtype"]) for check in checks}
    groups = {}
    for row in rows:
        assert row["runs"] == len(row["times_ms"]) >= 1 and all(t > 0 for t in row["times_ms"])
        assert row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] <= row["max_ms"]
        assert row["peak_extra_bytes"] is not None and row["peak_extra_bytes"] > 0, row
        assert row["library"] == INTEGRATION_GROUPS[row["integration"]]
        assert row["shape_str"] == "x".join(map(str, row["shape"]))
        key = (row["integration"], row["shape_str"], row["dtype"])
        assert key in checked, f"timed unchecked: {row}"
        groups.setdefault(key, {})[row["contender"]] = row
    assert {integration for integration, _, _ in groups} == set(INTEGRATION_GROUPS)
    assert {dtype for _, _, dtype in groups} == {"fp32", "bf16"}
    assert {(c["integration"], c["shape_str"], c["dtype"]) for c in section["cells"]} == set(groups) == checked
    for (integration, _, _), group in groups.items():
        assert set(group) == {INTEGRATION_GROUPS[integration], "smoothce"}, (integration, sorted(group))
        mine = group["smoothce"]
        for row in group.values():
            assert row["smoothce_speedup"] == pytest.approx(row["median_ms"] / mine["median_ms"])
            assert row["memory_vs_smoothce"] == pytest.approx(row["peak_extra_bytes"] / mine["peak_extra_bytes"])
    for integration, library in INTEGRATION_GROUPS.items():
        entry = section["summary"][integration]
        shapes = sum(1 for key in groups if key[0] == integration)
        assert entry["library"] == library and entry["speedup"]["cells"] == entry["memory_ratio"]["cells"] == shapes
        assert entry["speedup"]["geomean"] > 0 and entry["memory_ratio"]["geomean"] > 0
        assert set(section["definitions"][integration]["contenders"]) == {library, "smoothce"}
    assert {"timm", "transformers", "torch"} <= set(section["versions"])

    assert "## Library integrations" in md
    integrations_md = md.split("## Library integrations", 1)[1]
    assert data["meta"]["device_name"] in integrations_md and data["meta"]["torch_version"] in integrations_md
    assert len(md_measurement_rows(md, "### Integrations (fwd+bwd)")) == len(groups)
    assert len(md_measurement_rows(md, "### Checks: smoothce against the library")) == len(checks)
    table = md_measurement_rows(md, "### Integration measurements")
    assert len(table) == len(rows), "the integrations' markdown table and the JSON disagree"
    shown = {tuple(cells[:4]) for cells in table}
    for row in rows:
        assert (row["integration"], row["shape_str"], row["dtype"], row["contender"]) in shown, row


def check_png(png_path):
    png = png_path.read_bytes()
    assert png.startswith(PNG_SIGNATURE), "not a PNG file"
    assert len(png) > 1024, f"PNG of {len(png)} bytes is too small to hold the plot"


def check_results(json_path):
    """JSON, .md and .png beside it are complete and consistent; returns the JSON document."""
    data = json.loads(json_path.read_text(encoding="utf-8"))
    missing = META_KEYS - data["meta"].keys()
    assert not missing, f"metadata lacks {sorted(missing)}"
    assert data["meta"]["device"] == "cpu"
    assert isinstance(data["meta"]["threads"], int) and data["meta"]["threads"] >= 1
    rows = data["measurements"]
    assert rows, "no measurements"

    groups = {}
    for row in rows:
        assert row["runs"] == len(row["times_ms"]) >= 1
        assert all(t > 0 for t in row["times_ms"])
        assert row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] <= row["max_ms"]
        assert row["gbps"] > 0
        groups.setdefault((row["shape_str"], row["dtype"]), {}).setdefault(row["mode"], set()).add(row["contender"])
    assert {(cell["shape_str"], cell["dtype"]) for cell in data["cells"]} == set(groups)
    for key, modes in groups.items():
        assert set(modes) == MODES, f"{key}: modes {sorted(modes)}"
        for mode, contenders in modes.items():
            assert {"eager", "copy"} <= contenders, f"{key} {mode}: contenders {sorted(contenders)}"
    for row in rows:  # ratios are taken against eager and copy of the same group
        assert row["speedup_vs_eager"] > 0 and row["pct_of_copy"] > 0
        if row["contender"] == "eager":
            assert row["speedup_vs_eager"] == pytest.approx(1.0)
        if row["contender"] == "copy":
            assert row["pct_of_copy"] == pytest.approx(100.0)
    segmentation = [row for row in rows if len(row["shape"]) > 2]
    assert segmentation and all(row["ignore_index"] == 255 for row in segmentation)

    md = json_path.with_suffix(".md").read_text(encoding="utf-8")
    table = md_measurement_rows(md)
    assert len(table) == len(rows), "the markdown table and the JSON disagree on the number of measurements"
    shown = {tuple(cells[:4]) for cells in table}
    for row in rows:
        assert (row["shape_str"], row["dtype"], row["mode"], row["contender"]) in shown, row
    assert data["meta"]["torch_version"] in md
    check_overhead(data, md)
    if data["meta"].get("variants"):
        check_variants(data, md)
    if data["meta"].get("linear"):
        check_linear(data, md)
    if data["meta"].get("integrations"):
        check_integrations(data, md)
    check_png(json_path.with_suffix(".png"))
    return data


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m bench --quick --no-compile` once for the fast tests: (stdout, json path)."""
    return run_quick(tmp_path_factory.mktemp("bench"), "--no-compile")


def test_quick_run_writes_consistent_results(quick_run):
    stdout, json_path = quick_run
    data = check_results(json_path)
    assert data["meta"]["variants"] and "variants" in data, "the variants run by default"
    assert any(s["contender"] == "compile" and s["reason"] == "--no-compile" for s in data["skipped"])
    # Progress: a header line per measurement group, as it goes, and the summary at the end.
    groups = len({(r["shape_str"], r["dtype"], r["mode"]) for r in data["measurements"]})
    assert stdout.count(f"/{groups}] cpu ") == groups
    assert "summary (fwd+bwd" in stdout
    assert stdout.count("variants [") == sum(len(modes) for modes in VARIANT_MODES.values())
    assert data["meta"]["linear"] and "linear" in data, "the linear table runs by default"
    assert stdout.count("linear [") == len(data["linear"]["cells"]) == 4  # 2 quick shapes x 2 ε
    assert "linear (fused linear + cross-entropy, fwd+bwd" in stdout
    assert data["meta"]["integrations"] and "integrations" in data, "the integrations run by default"
    assert stdout.count("integrations [") == len(data["integrations"]["cells"]) == 6  # 3 groups x 2 quick shapes
    assert "integrations (fwd+bwd" in stdout
    check_distributed(json_path.with_name("cpu-distributed-quick.json"), stdout)


def check_distributed(json_path, stdout):
    """The vocabulary-parallel table: every contender timed and checked in each (shape, ε) row, DTensor's
    loss_parallel skipped with its reason at ε > 0, the .md beside the JSON, a console line per row."""
    from bench import distributed

    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["meta"]["world_size"] == 2 and data["meta"]["backend"] == "gloo"
    assert {(tuple(r["shape"]), r["label_smoothing"]) for r in data["rows"]} == {
        (tuple(shape[:2]), eps) for shape in distributed.QUICK_SHAPES for eps in (0.1, 0.0)}
    for row in data["rows"]:
        assert row["check_failures"] == [], row["check_failures"]
        timed = set(row["times_ms"])
        if row["label_smoothing"] > 0:
            assert "dtensor" in row["skipped"] and timed == set(distributed.CONTENDERS) - {"dtensor"}
        else:
            assert timed == set(distributed.CONTENDERS)
        assert all(len(times) == distributed.QUICK_RUNS and min(times) > 0 for times in row["times_ms"].values())
        assert all(row["peak_bytes"][name] is not None and row["peak_bytes"][name] > 0 for name in timed)
    md = json_path.with_suffix(".md").read_text(encoding="utf-8")
    assert md.startswith("# Vocabulary-parallel cross-entropy: 2 ranks (gloo, CPU)")
    assert md.count("| ok |") == sum(len(r["times_ms"]) for r in data["rows"])
    assert stdout.count("vocab-parallel ") == len(data["rows"])


def test_distributed_options():
    from bench import bench

    args = bench.parse_args([])
    assert args.distributed and not args.distributed_only and bench.runs_distributed(args)
    assert not bench.runs_distributed(bench.parse_args(["--no-distributed"]))
    args = bench.parse_args(["--distributed-only", "--quick"])
    assert bench.runs_distributed(args) and not bench.runs_linear(args) and not bench.runs_integrations(args)
    assert not bench.runs_variants(args) and bench.cells_for("cpu", args) == []
    for only in ("--linear-only", "--variants-only", "--integrations-only"):
        assert not bench.runs_distributed(bench.parse_args([only])), only
    for wrong in (["--distributed-only", "--no-distributed"], ["--distributed-only", "--linear-only"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


def test_a_wrong_vocab_parallel_loss_fails_its_check(monkeypatch):
    """The plain-PyTorch contender made to smooth with the local class count (Megatron-LM's mistake;
    SMOOTHCE_BENCH_WRONG_VP=1 in the ranks' environment) disagrees with smoothce on the full logits at
    ε > 0: the rows' checks report it, and only it."""
    from bench import distributed

    monkeypatch.setenv("SMOOTHCE_BENCH_WRONG_VP", "1")
    data = distributed.measure(quick=True, runs=1)
    failures = [f for row in data["rows"] if row["label_smoothing"] > 0 for f in row["check_failures"]]
    assert failures and all(f.startswith("torch_vp:") for f in failures), failures
    assert all(not row["check_failures"] for row in data["rows"] if row["label_smoothing"] == 0)


def test_smoothce_is_measured_when_importable(quick_run):
    _, json_path = quick_run
    data = json.loads(json_path.read_text(encoding="utf-8"))
    measured = {row["contender"] for row in data["measurements"]}
    if data["meta"]["smoothce_version"] is None:
        assert any(s["contender"] == "smoothce" for s in data["skipped"]), "smoothce missing without a reason"
    else:
        assert "smoothce" in measured
        assert data["summary"]["fwd+bwd"]["smoothce_vs_eager"]["geomean"] > 0


def test_report_regenerates_the_same_markdown_from_the_json(quick_run, tmp_path):
    _, json_path = quick_run
    copied = tmp_path / json_path.name
    shutil.copy(json_path, copied)
    run_python("-m", "bench.report", str(copied))
    assert copied.with_suffix(".md").read_text(encoding="utf-8") == json_path.with_suffix(".md").read_text(encoding="utf-8")
    check_results(copied)


def test_script_entry_point_parses_its_options():
    usage = run_python("bench/bench.py", "--help")
    for option in ("--no-variants", "--variants-only", "--no-linear", "--linear-only", "--no-integrations",
                   "--integrations-only", "--no-compile"):
        assert option in usage


def test_suites_import_only_the_harness():
    """bench/harness.py imports nothing from bench/ (but report); no suite imports another suite."""
    import ast

    def bench_imports(name):
        tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text(encoding="utf-8"))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
                found |= ({node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names})
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
        return found

    assert bench_imports("harness") <= {"report"}
    assert bench_imports("report") == set()
    for suite in SUITES:
        assert bench_imports(suite) <= {"harness", "report"}, suite
    assert bench_imports("bench") >= set(SUITES)  # the command line runs them


def test_linear_options():
    from bench import bench

    args = bench.parse_args([])
    assert args.linear and not args.linear_only and bench.runs_linear(args)
    assert not bench.runs_linear(bench.parse_args(["--no-linear"]))
    args = bench.parse_args(["--variants-only", "--quick"])
    assert bench.runs_variants(args) and not bench.runs_linear(args), "--variants-only runs the variants only"
    args = bench.parse_args(["--linear-only", "--quick"])
    assert bench.runs_linear(args) and not bench.runs_variants(args) and bench.cells_for("cpu", args) == []
    for wrong in (["--linear-only", "--no-linear"], ["--linear-only", "--variants-only"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


def test_integration_options():
    from bench import bench

    args = bench.parse_args([])
    assert args.integrations and not args.integrations_only and bench.runs_integrations(args)
    assert not bench.runs_integrations(bench.parse_args(["--no-integrations"]))
    assert bench.runs_linear(bench.parse_args(["--no-integrations"])), "--no-integrations leaves the other suites"
    args = bench.parse_args(["--integrations-only", "--quick"])
    assert bench.runs_integrations(args) and not bench.runs_linear(args) and not bench.runs_variants(args)
    assert bench.cells_for("cpu", args) == []
    for only in ("--linear-only", "--variants-only"):
        assert not bench.runs_integrations(bench.parse_args([only])), only
    for wrong in (["--integrations-only", "--no-integrations"], ["--integrations-only", "--linear-only"],
                  ["--integrations-only", "--variants-only"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


def test_variant_options():
    from bench import bench

    assert bench.parse_args([]).variants and not bench.parse_args([]).variants_only
    assert not bench.parse_args(["--no-variants"]).variants
    args = bench.parse_args(["--variants-only", "--quick"])
    assert args.variants and bench.cells_for("cpu", args) == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants-only", "--no-variants"])


def test_a_variant_that_disagrees_is_not_timed(monkeypatch, capsys):
    """A smoothce call that computes another loss than the plain version fails its check and is not timed."""
    import argparse

    import smoothce
    from bench import variants

    right = variants.contenders_for

    def wrong(variant, inputs, library):
        plain, mine = right(variant, inputs, library)
        x, target = inputs.leaves[0], inputs.target  # 'uniform' where the plain version spreads ε over C−1
        return [plain, variants.Contender(mine.name, mine.code,
                                          lambda: smoothce.cross_entropy(x, target, label_smoothing=0.1))]

    monkeypatch.setattr(variants, "VARIANTS", tuple(v for v in variants.VARIANTS if v.name == "others"))
    monkeypatch.setattr(variants, "contenders_for", wrong)
    section = variants.run("cpu", argparse.Namespace(quick=True, runs=None, variant_budget=None), smoothce, None)
    assert section["measurements"] == []
    assert section["checks"] and not any(check["passed"] for check in section["checks"])
    assert "check failed" in section["skipped"][0]["reason"]
    assert "CHECK FAILED" in capsys.readouterr().out


def test_derived_numbers():
    report = load_report_module()
    numel, itemsize = 1000, 4
    rows = [{"shape": [10, 100], "shape_str": "10x100", "dtype": "fp32", "mode": "fwd+bwd", "contender": name,
             "bytes": report.minimal_bytes(numel, itemsize, "fwd+bwd"), "times_ms": times}
            for name, times in (("eager", [4.0, 4.0, 5.0]), ("smoothce", [1.0, 2.0, 9.0]), ("copy", [0.5, 0.5]))]
    report.derive({"measurements": rows})
    eager, mine, copy = rows
    assert mine["median_ms"] == 2.0 and mine["min_ms"] == 1.0 and mine["max_ms"] == 9.0
    assert mine["speedup_vs_eager"] == pytest.approx(2.0)
    assert mine["gbps"] == pytest.approx(2 * numel * itemsize / 2e-3 / 1e9)
    assert mine["pct_of_copy"] == pytest.approx(25.0)  # 2 ms against the copy's 0.5 ms for the same bytes
    summary = report.summarize(rows)["fwd+bwd"]
    assert summary["smoothce_vs_eager"]["geomean"] == pytest.approx(2.0)
    assert summary["smoothce_time_over_copy"]["geomean"] == pytest.approx(4.0)
    assert summary["smoothce_vs_compile"]["cells"] == 0

    variant_rows = [{"variant": "mixup", "shape": shape, "shape_str": "x".join(map(str, shape)), "dtype": "fp32",
                     "mode": "fwd+bwd", "contender": name, "times_ms": times, "runs": len(times),
                     "peak_extra_bytes": 0}
                    for shape in ([8, 10], [8, 20])
                    for name, times in (("plain", [8.0, 9.0, 10.0]), ("smoothce", [100.0 / shape[1]] * 2))]
    section = report.derive_variants({"measurements": variant_rows, "checks": []})
    assert [row["speedup_vs_plain"] for row in variant_rows] == pytest.approx([1.0, 9 / 10, 1.0, 9 / 5])
    assert section["summary"]["mixup"]["fwd+bwd"]["smoothce"]["geomean"] == pytest.approx((9 / 10 * 9 / 5) ** 0.5)
    # A variants-only document: the variants' section, no empty standard table.
    meta = {"device": "cpu", "device_name": "test CPU", "threads": 1, "torch_version": "9.9", "date": "today",
            "dtypes": ["fp32"]}
    md = report.to_markdown(report.derive({"meta": meta, "measurements": [], "variants": section}))
    assert "## Label-smoothing variants" in md and "## All measurements" not in md
    assert len(md_measurement_rows(md, "### Variant measurements")) == len(variant_rows)

    # The linear table: ratios within a (shape, dtype, ε) group, geometric means over shapes.
    linear_rows = [{"shape": [8, 4, v], "shape_str": f"8x4x{v}", "dtype": "fp32", "label_smoothing": 0.1,
                    "contender": name, "runs": 2, "times_ms": times, "peak_extra_bytes": memory}
                   for v in (10, 20)
                   for name, times, memory in (("matmul_floor", [1.0, 1.0], 100), ("smoothce", [2.0, 2.0], 50),
                                               ("torch_lce", [2.0 * v / 10] * 2, 400), ("eager", [4.0, 4.0], 400))]
    linear = report.derive_linear({"measurements": linear_rows, "checks": []})
    floor, mine, torch_lce, eager = linear_rows[:4]
    assert mine["time_over_floor"] == pytest.approx(2.0) and eager["smoothce_speedup"] == pytest.approx(2.0)
    assert floor["memory_vs_smoothce"] == pytest.approx(2.0) and torch_lce["memory_vs_smoothce"] == pytest.approx(8.0)
    summary = linear["summary"]["0.1"]
    assert summary["smoothce_time_over_floor"]["geomean"] == pytest.approx(2.0)
    assert summary["smoothce_vs_torch_lce"]["geomean"] == pytest.approx(2 ** 0.5)  # 1x and 2x
    assert summary["smoothce_vs_compile"]["cells"] == 0
    md = report.to_markdown(report.derive({"meta": meta, "measurements": [], "linear": linear}))
    assert "# smoothce benchmark: cpu, fused linear + cross-entropy" in md and "## All measurements" not in md
    assert len(md_measurement_rows(md, "### Linear measurements")) == len(linear_rows)
    assert len(md_measurement_rows(md, "### ε = 0.1")) == len(linear_rows)

    # The integrations: ratios within an (integration, shape, dtype) group, geometric means over shapes.
    integration_rows = [{"integration": "hf_causal_lm_loss", "library": "transformers", "shape": [1, 2, v],
                         "shape_str": f"1x2x{v}", "dtype": "fp32", "contender": name, "runs": 2, "times_ms": times,
                         "peak_extra_bytes": memory}
                        for v in (10, 20)
                        for name, times, memory in (("transformers", [4.0 * v / 10] * 2, 300), ("smoothce", [2.0] * 2, 100))]
    integration = report.derive_integrations({"measurements": integration_rows, "checks": []})
    theirs, mine = integration_rows[:2]
    assert theirs["smoothce_speedup"] == pytest.approx(2.0) and mine["smoothce_speedup"] == pytest.approx(1.0)
    assert integration_rows[2]["smoothce_speedup"] == pytest.approx(4.0)
    assert theirs["memory_vs_smoothce"] == pytest.approx(3.0)
    entry = integration["summary"]["hf_causal_lm_loss"]
    assert entry["library"] == "transformers" and entry["speedup"]["cells"] == 2
    assert entry["speedup"]["geomean"] == pytest.approx(8 ** 0.5) and entry["memory_ratio"]["geomean"] == pytest.approx(3.0)
    md = report.to_markdown(report.derive({"meta": meta, "measurements": [], "integrations": integration}))
    assert "# smoothce benchmark: cpu, library integrations" in md and "## All measurements" not in md
    assert len(md_measurement_rows(md, "### Integration measurements")) == len(integration_rows)
    assert len(md_measurement_rows(md, "### Integrations (fwd+bwd)")) == 2


def quick_linear_args(**overrides):
    import argparse

    return argparse.Namespace(**{"quick": True, "runs": None, "no_compile": True, "dtypes": None, **overrides})


def test_a_linear_group_that_disagrees_is_not_timed(monkeypatch, capsys):
    """smoothce computing another loss than eager's fails the linear check: the group is not timed."""
    import smoothce
    from bench import linear

    class Wrong:  # ε ignored: smoothce without label smoothing against eager with it
        empty_cache = staticmethod(smoothce.empty_cache)

        @staticmethod
        def linear_cross_entropy(x, w, t, label_smoothing=0.0):
            return smoothce.linear_cross_entropy(x, w, t)

    monkeypatch.setattr(linear, "QUICK_SHAPES", linear.QUICK_SHAPES[:1])
    section = linear.run("cpu", quick_linear_args(), Wrong, None)
    by_eps = {check["label_smoothing"]: check for check in section["checks"]}
    assert not by_eps[0.1]["passed"] and by_eps[0.0]["passed"]
    assert {row["label_smoothing"] for row in section["measurements"]} == {0.0}, "the failed group was timed"
    assert any("check failed" in skip["reason"] for skip in section["skipped"])
    assert "CHECK FAILED linear" in capsys.readouterr().out


def test_integrations_only_quick_run_writes_consistent_results(tmp_path, capsys):
    """`python -m bench --integrations-only --quick --no-compile`: its own JSON, .md and .png, nothing else."""
    from bench import bench

    assert bench.main(["--integrations-only", "--quick", "--no-compile", "--device", "cpu", "--out", str(tmp_path)]) == 0
    json_files = list(tmp_path.glob("*.json"))
    assert [p.name for p in json_files] == ["cpu-integrations-quick.json"]
    data = json.loads(json_files[0].read_text(encoding="utf-8"))
    assert data["measurements"] == [] and "variants" not in data and "linear" not in data
    assert data["meta"]["integrations_only"] and data["meta"]["integrations"]
    md = json_files[0].with_suffix(".md").read_text(encoding="utf-8")
    assert md.startswith("# smoothce benchmark: cpu, library integrations") and "## All measurements" not in md
    check_integrations(data, md)
    check_png(json_files[0].with_suffix(".png"))
    stdout = capsys.readouterr().out
    assert stdout.count("integrations [") == len(data["integrations"]["cells"])
    assert "integrations (fwd+bwd" in stdout and "linear [" not in stdout and "variants [" not in stdout


def quick_integration_args(**overrides):
    import argparse

    return argparse.Namespace(**{"quick": True, "runs": None, "no_compile": True, "dtypes": None, **overrides})


def test_an_integration_group_that_disagrees_is_not_timed(monkeypatch, capsys):
    """smoothce's LabelSmoother without its ε against transformers' with it: that group fails its check
    and is not timed; the others are."""
    import smoothce
    from bench import integrations

    right = integrations.contenders_for

    def wrong(cell, inputs, libs):
        library, mine = right(cell, inputs, libs)
        if cell.integration.name != "hf_label_smoother":
            return [library, mine]
        smoother = libs.ours["transformers"]["LabelSmoother"](epsilon=0.0)
        outputs = {"logits": inputs.logits}
        return [library, integrations.Contender(mine.name, mine.code,
                                                lambda: smoother(outputs, inputs.labels, shift_labels=True))]

    monkeypatch.setattr(integrations, "contenders_for", wrong)
    section = integrations.run("cpu", quick_integration_args(dtypes=["fp32"]), smoothce, None)
    by_name = {check["integration"]: check for check in section["checks"]}
    assert not by_name["hf_label_smoother"]["passed"]
    assert by_name["timm_mixup"]["passed"] and by_name["hf_causal_lm_loss"]["passed"]
    assert {row["integration"] for row in section["measurements"]} == {"timm_mixup", "hf_causal_lm_loss"}, \
        "the failed group was timed"
    assert any("check failed" in skip["reason"] for skip in section["skipped"]
               if skip["integration"] == "hf_label_smoother")
    assert "hf_label_smoother" not in section["summary"]
    assert "CHECK FAILED integrations hf_label_smoother" in capsys.readouterr().out


def test_integrations_without_a_library_or_smoothce_are_skipped_with_the_reason(monkeypatch):
    import smoothce
    from bench import integrations

    # timm missing: its modules (and smoothce's integration of it) cannot be imported
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")] + ["timm", "smoothce.integrations.timm"]:
        monkeypatch.setitem(sys.modules, name, None)
    section = integrations.run("cpu", quick_integration_args(dtypes=["fp32"]), smoothce, None)
    assert {row["integration"] for row in section["measurements"]} == {"hf_label_smoother", "hf_causal_lm_loss"}
    skips = [skip for skip in section["skipped"] if skip["integration"] == "timm_mixup"]
    assert len(skips) == 1 and skips[0]["contender"] == "timm" and "not importable" in skips[0]["reason"]
    assert "timm" not in section["versions"] and section["definitions"]["timm_mixup"]["contenders"] == {}

    section = integrations.run("cpu", quick_integration_args(), None, "not importable (ImportError: test)")
    assert section["measurements"] == [] and section["summary"] == {}
    assert {skip["integration"] for skip in section["skipped"]} == set(INTEGRATION_GROUPS)
    assert all(skip["contender"] == "smoothce" and "ImportError" in skip["reason"] for skip in section["skipped"])


def test_integration_cells():
    from bench import integrations

    assert {cell.dtype for cell in integrations.cells_for("cpu", True, ["bf16"])} == {"bf16"}
    cells = integrations.cells_for("cpu", False, None)
    assert {cell.integration.name for cell in cells} == set(INTEGRATION_GROUPS)
    assert {(cell.shape, cell.dtype) for cell in cells if cell.integration.library == "transformers"} == {
        ((4, 256, 32000), "fp32"), ((4, 256, 32000), "bf16")}
    assert all(len(cell.shape) == (2 if cell.integration.library == "timm" else 3) for cell in cells)
    sizes = [cell.shape[0] * cell.shape[1] * (cell.shape[2] if len(cell.shape) > 2 else 1) for cell in cells]
    assert sizes == sorted(sizes), "the cheapest groups first, so the adaptive budget goes to the dear ones"


def test_linear_dtypes_filter_and_missing_smoothce():
    from bench import linear

    assert [cell.dtype for cell in linear.cells_for("cpu", True, ["bf16"])] == ["bf16"]
    assert {cell.dtype for cell in linear.cells_for("cuda", False, None)} == {"bf16", "fp32"}
    assert any(cell.v == 128256 for cell in linear.cells_for("cpu", False, None))
    section = linear.run("cpu", quick_linear_args(), None, "not importable (ImportError: test)")
    assert section["measurements"] == [] and section["summary"] == {}
    assert any(s["contender"] == "smoothce" and "ImportError" in s["reason"] for s in section["skipped"])


@pytest.mark.slow
def test_quick_run_with_torch_compile(tmp_path):
    """The documented quick command, torch.compile included (compiling takes tens of seconds on CPU)."""
    stdout, json_path = run_quick(tmp_path)
    data = check_results(json_path)
    measured = {row["contender"] for row in data["measurements"]}
    compile_skips = [s for s in data["skipped"] if s["contender"] == "compile"]
    assert "compile" in measured or compile_skips, "torch.compile neither measured nor skipped with a reason"
    for skip in compile_skips:
        assert skip["reason"] in stdout


def test_traffic_report(capsys):
    """python -m bench.traffic: the emulator's byte counts per logit for each training step."""
    from bench import traffic

    assert traffic.main(["--shapes", "16x3000,2x21x8x8", "--dtypes", "fp32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16x3000")
            or line.startswith("| 2x21x8x8")]
    assert len(rows) == 2
    cells = rows[0].strip("| ").split(" | ")
    assert cells[2] == "rows" and cells[3] == "1.00 / 1.00" and cells[4] == "2.00 / 2.00", rows[0]
    assert rows[1].split(" | ")[2] == "strided (staged)"
