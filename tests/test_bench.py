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
    json_files = list(out.glob("*.json"))
    assert [p.name for p in json_files] == ["cpu-fp32-bf16-quick.json"], stdout
    return stdout, json_files[0]


def md_measurement_rows(md):
    """The rows of the 'All measurements' table, as lists of cells."""
    table = md.split("## All measurements", 1)[1]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # skip header


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

    png = json_path.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_SIGNATURE), "not a PNG file"
    assert len(png) > 1024, f"PNG of {len(png)} bytes is too small to hold the plot"
    return data


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m bench --quick --no-compile` once for the fast tests: (stdout, json path)."""
    return run_quick(tmp_path_factory.mktemp("bench"), "--no-compile")


def test_quick_run_writes_consistent_results(quick_run):
    stdout, json_path = quick_run
    data = check_results(json_path)
    assert any(s["contender"] == "compile" and s["reason"] == "--no-compile" for s in data["skipped"])
    # Progress: a header line per measurement group, as it goes, and the summary at the end.
    groups = len({(r["shape_str"], r["dtype"], r["mode"]) for r in data["measurements"]})
    assert stdout.count(f"/{groups}] cpu ") == groups
    assert "summary (fwd+bwd" in stdout


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
    assert "--no-compile" in run_python("bench/bench.py", "--help")


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
