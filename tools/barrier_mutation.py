"""Barrier mutation check: is every barrier of the CUDA kernels needed, as far as the tests can tell?

Deletes each barrier statement of csrc/cuda (`__syncthreads();`, `__syncwarp(...);`, `cluster_sync();`
in csrc/cuda/*.cuh and *.cu) in turn, in a copy of the repository, and runs the emulated tests on the
copy (tests/test_cuda_emulated.py, and tests/test_sanitizer.py when present) under several emulator
schedules (SMOOTHCE_EMU_SCHEDULE: the order in which released emulated threads resume). A deletion is
"caught" when a run fails under any schedule; a deletion no schedule catches is a barrier the tests
cannot tell from no barrier (a missing test, a missing detector, or a barrier that is not needed).

The copy is one snapshot of the tree (taken at the start, in a temp folder), with its own emulator
build folder (SMOOTHCE_EMU_BUILD_DIR): the first run builds the whole emulator (~5 min on 2 busy cores),
then each mutation restores the previous one's file and changes its own, so ninja recompiles only
tests/emu/ops.cpp (~30 s) before the test runs (~12 s per schedule). Before the mutations, the
unmutated copy must pass under every schedule (the baseline) and a deliberate compile error in the
copy's csrc must fail the build (the canary: the runs really build the copy's sources, incrementally);
--no-baseline skips both. --fresh: a new copy and a full build per mutation (slow, for a cross-check).

    .venv/bin/python tools/barrier_mutation.py --list
    .venv/bin/python tools/barrier_mutation.py                    # every barrier (~15-20 min on 2 cores)
    .venv/bin/python tools/barrier_mutation.py --only 3,7 --json report.json
    make barrier-mutation MUTATION_ARGS="--only 3"

Exit status: 0 when every deletion was caught, 1 when one was not (or is undecided: a run timed out),
2 when the baseline or the canary went wrong (nothing can be concluded) or on a usage error.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = Path("csrc") / "cuda"
TEST_FILES = ("tests/test_cuda_emulated.py", "tests/test_sanitizer.py")  # the second when present
SCHEDULES = ("fifo", "lifo", "random:1", "random:2")
# Not copied: version control, the venv, build outputs, caches, the compiled library (the copy's
# tests import the installed smoothce package; the emulator is built from the copy's sources).
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
                                 "*.egg-info", "*.so", "*.o", "results")

# A barrier statement: the call and its semicolon (not a declaration, not a comment).
BARRIER = re.compile(r"(?<![\w.>])(?:(?:[A-Za-z_]\w*)?::)*(?:__syncthreads\s*\(\s*\)|__syncwarp\s*\([^;()]*(?:\([^;()]*\)[^;()]*)*\)"
                     r"|cluster_sync\s*\(\s*\))\s*;")
CANARY = "#error barrier_mutation canary: this copy's csrc/cuda is what the emulator builds\n"
REPLACEMENT = ";  /* barrier_mutation: deleted */"
CONTROL = re.compile(r"^(?:if|for|while|switch|else|do|try|catch|namespace|struct|class|union|enum|extern)\b")
NOT_A_NAME = {"__launch_bounds__", "__attribute__", "alignas", "decltype", "sizeof", "noexcept", "static_assert",
              "__declspec", "C10_LAUNCH_BOUNDS_0", "C10_LAUNCH_BOUNDS_1", "__align__"}


@dataclass
class Barrier:
    index: int
    file: str      # relative to the repository root
    line: int      # 1-based
    start: int     # offsets of the statement in the file's text
    end: int
    statement: str
    function: str
    source_line: str


@dataclass
class Run:
    schedule: str
    outcome: str   # "passed", "failed" (a test failed), "build error", "timeout", "error"
    returncode: Optional[int]
    seconds: float
    failed_test: str = ""
    log: str = ""


@dataclass
class Result:
    barrier: Barrier
    verdict: str  # "caught" (a run failed), "not caught" (every run passed), "undecided" (a run timed out)
    runs: list = field(default_factory=list)


def verdict_of(runs) -> str:
    if any(run.outcome in ("failed", "error", "build error") for run in runs):
        return "caught"
    if any(run.outcome == "timeout" for run in runs):
        return "undecided"  # a hang, or a --timeout too short for the build: the log tells
    return "not caught"


def blank_comments_and_strings(text: str) -> str:
    """The text with comments, string and character literals replaced by spaces (offsets and newlines kept)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
        else:
            i += 1
            continue
        for k in range(i, j):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def function_name(header: str) -> Optional[str]:
    """The function a '{' opens, from the text before it (back to the previous ; { or }), or None."""
    lines = [line for line in header.splitlines() if not line.strip().startswith("#")]
    header = " ".join(" ".join(lines).split())
    header = re.sub(r"^template\s*<[^{};]*?>\s*", "", header)
    if not header or CONTROL.match(header) or header.endswith(("=", ",", "(", "return")):
        return None
    if "](" in header.replace(" ", "") or re.search(r"\]\s*(?:\(|mutable|->|$)", header):
        return "<lambda>"
    depth = 0
    for match in re.finditer(r"[A-Za-z_~][\w:]*\s*\(|[()]", header):
        token = match.group()
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        else:
            if depth == 0:
                name = token.rstrip("( ").strip()
                if name.split("::")[-1] not in NOT_A_NAME:
                    return name
            depth += 1
    return None


def enclosing_functions(clean: str) -> list:
    """For each offset of `clean` (comments blanked): the innermost enclosing function (or '')."""
    names = [""] * (len(clean) + 1)
    stack: list = []  # per open brace: the enclosing function's name
    last = 0          # end of the previous ; { or }
    current = ""
    for i, c in enumerate(clean):
        names[i] = current
        if c == "{":
            opened = function_name(clean[last:i])
            if opened == "<lambda>":
                opened = f"<lambda in {current}>" if current else "<lambda>"
            stack.append(opened or current)
            current = stack[-1]
            last = i + 1
        elif c == "}":
            if stack:
                stack.pop()
            current = stack[-1] if stack else ""
            last = i + 1
        elif c == ";":
            last = i + 1
    names[len(clean)] = current
    return names


def find_barriers(root: Path = ROOT) -> list:
    barriers = []
    files = sorted((root / CUDA_DIR).glob("*.cuh")) + sorted((root / CUDA_DIR).glob("*.cu"))
    for path in files:
        text = path.read_text()
        clean = blank_comments_and_strings(text)
        functions = enclosing_functions(clean)
        line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        for match in BARRIER.finditer(clean):
            line = text.count("\n", 0, match.start()) + 1
            source_line = text[line_starts[line - 1]:].split("\n", 1)[0].strip()
            barriers.append(Barrier(index=len(barriers) + 1, file=str(path.relative_to(root)), line=line,
                                    start=match.start(), end=match.end(), statement=text[match.start():match.end()],
                                    function=functions[match.start()] or "(file scope)", source_line=source_line))
    return barriers


class Slot:
    """A copy of the repository and its emulator build folder, reused mutation after mutation: each
    mutation first restores the files the previous one changed, so the emulator's ninja build
    recompiles only what includes them (tests/emu/ops.cpp for csrc/cuda), not the whole emulator.
    (--fresh: a new slot per mutation.)"""

    def __init__(self, name: str, source: Path = ROOT):
        self.dir = Path(tempfile.mkdtemp(prefix=f"barrier-mutation-{name}-"))
        self.repo = self.dir / "repo"
        shutil.copytree(source, self.repo, ignore=IGNORED, symlinks=True)
        self.originals: dict = {}  # relative path -> text before this slot's current mutation

    @property
    def build_dir(self) -> Path:
        return self.dir / "build-emu"

    def restore(self) -> None:
        for relative, text in self.originals.items():
            (self.repo / relative).write_text(text)
        self.originals = {}

    def modify(self, relative: str, text: str) -> None:
        path = self.repo / relative
        self.originals.setdefault(relative, path.read_text())
        path.write_text(text)

    def reset_build(self) -> None:
        """After a killed run (a half-written object file must not pass for a built one)."""
        shutil.rmtree(self.build_dir, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class SourceChanged(RuntimeError):
    pass


def apply_deletion(slot: Slot, barrier: Barrier) -> None:
    text = (slot.repo / barrier.file).read_text()
    if text[barrier.start:barrier.end] != barrier.statement:
        raise SourceChanged(f"{barrier.file}:{barrier.line}: the copy does not hold {barrier.statement!r} where "
                           "the scan found it (was the source edited meanwhile?)")
    slot.modify(barrier.file, text[:barrier.start] + REPLACEMENT + text[barrier.end:])


def apply_canary(slot: Slot) -> None:
    relative = str(CUDA_DIR / "kernels.cuh")
    slot.modify(relative, CANARY + (slot.repo / relative).read_text())


def failed_test_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][:200]
    return ""


def classify(returncode: int, output: str) -> str:
    if returncode == 0:
        return "passed"
    if "Error building extension" in output or "ninja: build stopped" in output:
        return "build error"
    if returncode == 1 or "FAILED " in output:
        return "failed"
    return "error"  # e.g. a crash of the emulated process, or pytest's usage/collection errors


RUNNING: set = set()  # the pytest processes running now (killed, with their process group, on ^C)
STOP = threading.Event()  # set on ^C: no further run starts


def kill_group(proc: subprocess.Popen) -> None:
    """Kills the run's whole session: pytest, ninja, and the compilers (which ninja starts in process
    groups of their own, so killing pytest's group would leave them compiling into the build folder)."""
    session = proc.pid  # started with start_new_session: its session id is its pid
    for _ in range(3):  # again, for what was being forked meanwhile
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session:  # state ppid pgrp session ...
                members.append(int(entry))
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not members:
            break
        time.sleep(0.2)


def run_tests(slot: Slot, schedule: str, timeout: float, log_path: Path) -> Run:
    repo = slot.repo
    tests = [str(repo / name) for name in TEST_FILES if (repo / name).exists()]
    env = dict(os.environ)
    env.update(SMOOTHCE_EMU_BUILD_DIR=str(slot.build_dir), SMOOTHCE_EMU_SCHEDULE=schedule,
               OMP_WAIT_POLICY="passive", MAX_JOBS=env.get("MAX_JOBS", str(os.cpu_count() or 2)),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("SMOOTHCE_TEST_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-rfE", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    # cwd: the slot's folder, so `import smoothce` is the installed package (the copy has no _C library);
    # a session of its own, so a timeout kills the emulator's build (ninja, the compiler) too.
    proc = subprocess.Popen(cmd, cwd=slot.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    RUNNING.add(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
        outcome = classify(returncode, output)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        output, _ = proc.communicate()
        returncode, outcome = None, "timeout"
        slot.reset_build()
    finally:
        RUNNING.discard(proc)
    seconds = time.perf_counter() - started
    log_path.write_text(f"$ {' '.join(cmd)}\n# SMOOTHCE_EMU_SCHEDULE={schedule} cwd={slot.dir}\n{output}")
    return Run(schedule=schedule, outcome=outcome, returncode=returncode, seconds=round(seconds, 1),
               failed_test=failed_test_of(output), log=str(log_path))


def run_mutation(slot: Slot, label: str, mutate, schedules, timeout: float, log_dir: Path,
                 all_schedules: bool) -> list:
    """Restores the slot's copy, applies `mutate(slot)` and runs the tests under each schedule (stopping
    at the first failing one unless all_schedules)."""
    slot.restore()
    if mutate is not None:
        mutate(slot)
    runs = []
    for schedule in schedules:
        if STOP.is_set():
            break
        run = run_tests(slot, schedule, timeout, log_dir / f"{label}-{schedule.replace(':', '')}.log")
        runs.append(run)
        if run.outcome == "build error":
            break  # no schedule can run an emulator that does not build
        if run.outcome != "passed" and not all_schedules:
            break
    return runs


def describe(runs) -> str:
    return ", ".join(f"{run.schedule} {run.outcome}{' (' + run.failed_test + ')' if run.failed_test else ''} "
                     f"{run.seconds:.0f} s" for run in runs)


def parse_indices(text: str) -> list:
    indices = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            indices += list(range(int(low), int(high) + 1))
        else:
            indices.append(int(part))
    return indices


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tools/barrier_mutation.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--list", action="store_true", help="list the barrier statements and exit")
    parser.add_argument("--only", type=parse_indices, metavar="INDEX",
                        help="the barriers to delete, by --list index: e.g. 3 or 1,4 or 2-5")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once (default 1; each builds "
                                                            "the emulator with MAX_JOBS threads)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per test run, the emulator's build included (default 900)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help=f"comma-separated SMOOTHCE_EMU_SCHEDULE values (default {','.join(SCHEDULES)})")
    parser.add_argument("--all-schedules", action="store_true",
                        help="run every schedule even after one caught the deletion (default: stop there)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run and the canary (a deliberate compile error that must fail)")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    parser.add_argument("--log-dir", type=Path,
                        help="folder for each run's output (default build/barrier-mutation/<time>/)")
    parser.add_argument("--keep", action="store_true", help="keep the copies (temp folders) at the end")
    parser.add_argument("--fresh", action="store_true",
                        help="a fresh copy and a full emulator build per mutation (default: one copy per job, "
                             "rebuilt incrementally: only what includes the mutated file)")
    args = parser.parse_args(argv)
    args.schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if not args.schedules:
        parser.error("--schedules: expected at least one schedule")
    if args.jobs < 1:
        parser.error("--jobs: expected at least 1")
    return args, parser


def main(argv=None) -> int:
    args, parser = parse_args(sys.argv[1:] if argv is None else argv)
    barriers = find_barriers()
    if args.list:
        for b in barriers:
            print(f"{b.index:3d}  {b.file}:{b.line}  in {b.function}: {b.source_line}")
        print(f"{len(barriers)} barrier statements in {CUDA_DIR}")
        return 0
    if args.only:
        unknown = [i for i in args.only if not 1 <= i <= len(barriers)]
        if unknown:
            parser.error(f"--only: no barrier {', '.join(map(str, unknown))} (1..{len(barriers)}; see --list)")
        chosen = [barriers[i - 1] for i in sorted(set(args.only))]
    else:
        chosen = barriers
    if not chosen:
        print("barrier_mutation: no barrier statements found", file=sys.stderr)
        return 2

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = args.log_dir or ROOT / "build" / "barrier-mutation" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    tests = [name for name in TEST_FILES if (ROOT / name).exists()]
    print(f"barrier_mutation: {len(chosen)} of {len(barriers)} barriers; tests {' '.join(tests)}; schedules "
          f"{', '.join(args.schedules)}; logs in {log_dir}", flush=True)
    emu_sources = " ".join(p.read_text(errors="replace") for p in (ROOT / "tests").glob("emu*.py"))
    if "SMOOTHCE_EMU_SCHEDULE" not in emu_sources:
        print("barrier_mutation: note: tests/emulator.py does not read SMOOTHCE_EMU_SCHEDULE: every schedule "
              "runs the emulator's one order", flush=True)

    report = {"date": stamp, "root": str(ROOT), "tests": tests, "schedules": args.schedules,
              "barriers": [asdict(b) for b in barriers], "baseline": None, "canary": None, "results": []}

    def write_report():
        text = json.dumps(report, indent=1) + "\n"
        (log_dir / "report.json").write_text(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)

    started = time.perf_counter()
    # One snapshot of the tree for every slot: edits made to the repository meanwhile do not mix in.
    slots = []
    if not args.fresh:
        slots.append(Slot("1"))
        slots += [Slot(str(i + 1), source=slots[0].repo) for i in range(1, args.jobs)]
        snapshot = find_barriers(slots[0].repo)  # the same statements, unless the tree changed meanwhile
        if [(b.file, b.statement, b.function) for b in snapshot] != [(b.file, b.statement, b.function) for b in barriers]:
            print("barrier_mutation: csrc/cuda changed while the copy was taken: run again", file=sys.stderr)
            for slot in slots:
                slot.remove()
            return 2
        by_index = {b.index: b for b in snapshot}
        chosen = [by_index[b.index] for b in chosen]
    free_slots: queue.Queue = queue.Queue()
    for slot in slots:
        free_slots.put(slot)
    print(f"   the copy: {(slots[0].repo if slots else '(a fresh one per mutation)')}", flush=True)

    def with_slot(label, mutate, schedules, all_schedules):
        slot = Slot(label) if args.fresh else free_slots.get()
        try:
            return run_mutation(slot, label, mutate, schedules, args.timeout, log_dir, all_schedules)
        finally:
            if not args.fresh:
                free_slots.put(slot)
            elif args.keep:
                print(f"   kept: {slot.dir}", flush=True)
            else:
                slot.remove()

    results = []
    try:
        if not args.no_baseline:
            print("-- baseline: the unmutated copy, every schedule", flush=True)
            runs = with_slot("baseline", None, args.schedules, all_schedules=False)
            report["baseline"] = [asdict(run) for run in runs]
            print(f"   {describe(runs)}", flush=True)
            if any(run.outcome != "passed" for run in runs):
                write_report()
                print("barrier_mutation: the unmutated copy fails its tests: no deletion can be judged (see the "
                      f"logs in {log_dir})", file=sys.stderr)
                return 2
            print("-- canary: a compile error in the copy's csrc/cuda/kernels.cuh must fail the run", flush=True)
            runs = with_slot("canary", apply_canary, args.schedules[:1], all_schedules=False)
            report["canary"] = [asdict(run) for run in runs]
            canary_seen = "barrier_mutation canary" in Path(runs[0].log).read_text(errors="replace")
            print(f"   {describe(runs)}; the canary's message {'is' if canary_seen else 'is NOT'} in the output",
                  flush=True)
            if runs[0].outcome != "build error" or not canary_seen:
                write_report()
                print("barrier_mutation: the canary did not break the build: the runs do not build the copy's "
                      "sources, so deletions would not be tested", file=sys.stderr)
                return 2

        def one(barrier: Barrier) -> Result:
            try:
                runs = with_slot(f"{barrier.index:02d}", lambda slot: apply_deletion(slot, barrier), args.schedules,
                                 args.all_schedules)
            except SourceChanged as error:  # (--fresh: the tree changed since the scan)
                print(f"barrier_mutation: #{barrier.index}: {error}", file=sys.stderr, flush=True)
                return Result(barrier=barrier, verdict="undecided", runs=[])
            return Result(barrier=barrier, verdict=verdict_of(runs), runs=runs)

        def show(result: Result):
            b = result.barrier
            print(f"{result.verdict.upper():10s} #{b.index} {b.file}:{b.line} in {b.function}: "
                  f"{b.statement.strip()}  [{describe(result.runs)}]", flush=True)
            build_errors = [run for run in result.runs if run.outcome == "build error"]
            if build_errors:
                print(f"           (the deletion does not compile: see {build_errors[0].log})", flush=True)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
        try:
            futures = [pool.submit(one, barrier) for barrier in chosen]
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                results.append(result)
                show(result)
                results.sort(key=lambda r: r.barrier.index)
                report["results"] = [asdict(r) for r in results]
                write_report()
        except BaseException:  # ^C (or a bug): stop the runs before waiting for the workers
            STOP.set()
            for proc in list(RUNNING):
                kill_group(proc)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        STOP.set()
        for proc in list(RUNNING):
            kill_group(proc)
        print("barrier_mutation: interrupted; the report holds the deletions finished so far", file=sys.stderr)
        write_report()
        return 130
    finally:
        if not args.keep:
            for slot in slots:
                slot.remove()
        elif slots:
            print(f"   kept: {', '.join(str(slot.dir) for slot in slots)}", flush=True)

    caught = sum(result.verdict == "caught" for result in results)
    undecided = sum(result.verdict == "undecided" for result in results)
    report["caught"], report["undecided"], report["total"] = caught, undecided, len(results)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report()
    print(f"\n{caught} of {len(results)} barrier deletions caught"
          + (f" ({undecided} undecided: a run timed out, or the source changed)" if undecided else "")
          + f" ({report['seconds']:.0f} s; report {args.json or log_dir / 'report.json'})")
    for r in results:
        if r.verdict != "caught":
            b = r.barrier
            print(f"   {r.verdict}: #{b.index} {b.file}:{b.line} in {b.function}: {b.source_line}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
