"""Installing the project: the Makefile on a Python that refuses ``pip install`` (PEP 668), and the wheel's one import
name.

1. ``make demo`` in a fresh clone of the working tree, then ``make install`` again and ``make -n test``, where the
   ``python3`` on PATH is "externally managed" (its stdlib holds an ``EXTERNALLY-MANAGED`` marker, as on current
   Debian/Ubuntu): all must make and use the project's own ``.venv``, and torch is installed once. The locked Python
   is a private copy of the interpreter under the running one (its executable, its stdlib by symlinks, the marker
   beside them); the real interpreter is never touched. The clone's installs come from pip's cache and this
   machine's local wheels.
2. A non-editable ``pip install`` of the working tree holds the single import name ``whisper_batch``: ``model``,
   ``pipeline``, ``jobs`` and ``benchmarks`` are not importable from it, and ``whisper-batch run`` works from a folder
   whose ``model.py``/``pipeline.py``/``jobs.py`` would shadow top-level names. The fresh environment borrows the
   dependencies of the running one through a ``.pth`` line (which adds that folder to ``sys.path`` without processing
   the ``.pth`` files inside it, so the running environment's editable install stays inactive there).

Each test copies the working tree (tracked and untracked-but-not-ignored files, as they are on disk), so it checks
what is being worked on, not the last commit. Every subprocess is bounded; the time of each step is printed
(``-s`` shows it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from whisper_batch.jobs.procs import descendants

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL_NAMES = ("model", "pipeline", "jobs", "benchmarks")  # the repository's folders; none may be importable
SHADOW = 'raise ImportError("user module shadowed whisper_batch")\n'
# Variables of the environment that would steer the inner commands elsewhere: another environment, another interpreter
# path, the outer make's command-line variables (MAKEFLAGS carries them to any make below), the outer pytest's options,
# someone else's Ray cluster.
_STRIP = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "MAKEFLAGS", "MFLAGS",
          "MAKELEVEL", "MAKEOVERRIDES", "VENV", "BOOT_PYTHON", "OUT", "PYTEST_ARGS", "PYTEST_FAST_ARGS",
          "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "RAY_ADDRESS", "CONDA_PREFIX", "PIP_REQUIRE_VIRTUALENV")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIP}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` (stdout and stderr together); returns (exit code, output, seconds). Past ``timeout`` the process
    and everything below it are killed and the test fails with the output so far."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout:.0f} s; its output's end:\n{out[-6000:]}")
    return proc.returncode, out, time.monotonic() - start


def _working_tree_files() -> list[str]:
    """Paths (relative to REPO) of the working tree: tracked files and untracked ones git does not ignore; tracked
    files deleted on disk are left out. Skips where this is not a git checkout."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the working tree")
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: {proc.stderr.strip()}")
    return sorted({p for p in proc.stdout.split("\0") if p and os.path.lexists(REPO / p)})


def _copy_working_tree(dest: Path) -> None:
    """Lay the working tree's files into ``dest`` (which may hold a clone's .git, kept as it is)."""
    for rel in _working_tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target, follow_symlinks=False)


def _fresh_clone(dest: Path) -> None:
    """A fresh clone of REPO whose files are exactly the working tree's (a clone holds only what is committed)."""
    proc = subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=False, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"cannot clone {REPO}: {proc.stderr.strip()}")
    for entry in dest.iterdir():
        if entry.name != ".git":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    _copy_working_tree(dest)


def _locked_python(root: Path) -> Path:
    """A private copy of the base interpreter under the running one that is not a venv and whose stdlib holds an
    EXTERNALLY-MANAGED marker: ``root/bin/python3`` (its ``bin`` goes first on PATH). The stdlib folder holds symlinks
    to every entry of the real one (so the prefix landmark ``lib/pythonX.Y/os.py`` is found under ``root``) plus the
    marker; libpython is linked beside it for an executable that finds it relative to itself."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(sys.base_prefix)
    exe = base / "bin" / ver
    if not exe.is_file():
        exe = Path(getattr(sys, "_base_executable", "") or sys.executable).resolve()
    stdlib = Path(sysconfig.get_path("stdlib"))  # in a venv this is the base interpreter's
    if not exe.is_file() or not (stdlib / "os.py").is_file() or stdlib.parent.name != "lib":
        pytest.skip(f"cannot copy the base interpreter ({exe}, stdlib {stdlib}): not a lib/{ver} layout")
    (root / "bin").mkdir(parents=True)
    lib = root / "lib" / ver
    lib.mkdir(parents=True)
    shutil.copy2(exe, root / "bin" / ver)
    (root / "bin" / "python3").symlink_to(ver)
    for entry in stdlib.iterdir():
        if entry.name != "EXTERNALLY-MANAGED":
            (lib / entry.name).symlink_to(entry)
    for so in stdlib.parent.glob("libpython*"):
        (root / "lib" / so.name).symlink_to(so)
    (lib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=This Python is locked for a test (PEP 668): use a virtual environment.\n")
    probe = subprocess.run([str(root / "bin" / "python3"), "-c",
                            "import sys, sysconfig; "
                            "print(sys.prefix == sys.base_prefix, sysconfig.get_path('stdlib'))"],
                           check=False, capture_output=True, text=True, timeout=60, env=_clean_env())
    if probe.returncode != 0:
        pytest.skip(f"the copied interpreter does not start: {probe.stderr.strip()[-2000:]}")
    not_venv, its_stdlib = probe.stdout.split()
    assert not_venv == "True" and Path(its_stdlib) == lib, probe.stdout
    return root / "bin" / "python3"


def _transcribed_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((out / "transcripts").glob("*.parquet"))
    assert files, f"no transcripts in {out}"
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_make_demo_and_test_make_and_use_a_venv_where_python_is_externally_managed(tmp_path):
    for tool in ("make", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed")
    clone = tmp_path / "clone"
    _fresh_clone(clone)
    python3 = _locked_python(tmp_path / "locked")
    # as on the machines this project is developed on: no process writes bytecode, so the install must leave it compiled
    env = _clean_env(PATH=f"{python3.parent}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONDONTWRITEBYTECODE="1")
    assert shutil.which("python3", path=env["PATH"]) == str(python3)

    # the premise: the python3 on PATH refuses to install
    code, out, _ = _run(["python3", "-c", "import pip"], cwd=tmp_path, env=env, timeout=60)
    if code != 0:
        pytest.skip(f"the base interpreter has no pip to show the lock with: {out[-500:]}")
    code, out, _ = _run(["python3", "-m", "pip", "install", "six"], cwd=tmp_path, env=env, timeout=120)
    assert code != 0 and "externally-managed-environment" in out, out[-3000:]

    try:
        _make_demo_and_test(clone, env)
    finally:
        shutil.rmtree(clone / ".venv", ignore_errors=True)  # ~2 GB; pytest keeps the last tmp dirs


def _make_demo_and_test(clone: Path, env: dict[str, str]) -> None:
    code, out, demo_s = _run(["make", "demo"], cwd=clone, env=env, timeout=900)
    print(f"\ntiming: make demo (fresh clone, venv made, installs) {demo_s:.1f} s")
    assert code == 0, f"make demo failed ({code}):\n{out[-6000:]}"
    venv_python = clone / ".venv" / "bin" / "python"
    assert venv_python.is_file(), "make demo made no .venv in the clone"
    assert (clone / ".venv" / "pyvenv.cfg").is_file()
    assert "whisper-batch run" in out and ".venv/bin/whisper-batch" in out, out[-3000:]  # the venv's script
    rows = _transcribed_rows(clone / "out" / "demo")
    assert len(rows) == 4 and not [r for r in rows if r.get("error")], rows
    assert all((r.get("text") or "").strip() for r in rows), rows
    code, torch_version, _ = _run([str(venv_python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                                  cwd=clone, env=env, timeout=60)
    assert code == 0 and torch_version.strip().split("+")[0] == "2.13.0", torch_version
    # every Ray worker imports torch and Ray: compiled once at install, not again in each process
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    for module in ("torch/__init__.py", "torch/_meta_registrations.py", "ray/data/dataset.py", "pyarrow/__init__.py"):
        source = site / module
        assert Path(importlib.util.cache_from_source(str(source))).is_file(), f"{module} was installed uncompiled"

    # `make test` on the same clone: its install step again (real: torch must not be installed twice), then what it
    # would run (a dry run: the test extras' installs and the suite itself are what CI's own `make test` runs)
    code, out, install_s = _run(["make", "install"], cwd=clone, env=env, timeout=420)
    print(f"timing: make install again (same clone) {install_s:.1f} s")
    assert code == 0, f"make install failed ({code}):\n{out[-6000:]}"
    assert "pip install -q torch" not in out, "torch was installed again though the venv holds 2.13.0"
    assert ".venv/bin/python -m pip install -q -e ." in out, out[-3000:]
    code, out, _ = _run(["make", "-n", "test"], cwd=clone, env=env, timeout=60)
    assert code == 0, f"make -n test failed ({code}):\n{out[-6000:]}"
    venv_bin = clone / ".venv" / "bin"
    assert f"{venv_bin}:" in out and ".venv/bin/python -m pytest" in out, out
    assert ".venv/bin/python -m ruff check" in out, out


def _site_packages_of_this_environment() -> list[str]:
    """The running environment's site-packages (purelib, platlib), where the project's dependencies are."""
    paths = []
    for name in ("purelib", "platlib"):
        path = sysconfig.get_path(name)
        if path and os.path.isdir(path) and path not in paths:
            paths.append(path)
    return paths


def test_the_wheel_holds_one_import_name_and_runs_beside_shadowing_files(tmp_path):
    import importlib.util

    for needed in ("pip", "setuptools"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"{needed} is needed in the running environment to build and install the wheel")
    src = tmp_path / "src"
    _copy_working_tree(src)
    venv = tmp_path / "venv"
    env = _clean_env()
    code, out, _ = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env, timeout=120)
    assert code == 0, out
    python = venv / "bin" / "python"
    code, site, _ = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         cwd=tmp_path, env=env, timeout=60)
    assert code == 0, site
    site_packages = Path(site.strip())
    borrowed = _site_packages_of_this_environment()
    (site_packages / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in borrowed))

    empty = tmp_path / "empty"  # imports are tried from here: nothing beside them to find
    empty.mkdir()

    def python_c(code_text: str, cwd: Path = empty) -> tuple[int, str]:
        code, out, _ = _run([str(python), "-c", code_text], cwd=cwd, env=env, timeout=120)
        return code, out

    # before the install: the borrowed folders give the dependencies but not the project (the editable install's
    # .pth there is not processed, so its finder is not active)
    code, out = python_c("import sys, torch, ray, pyarrow\n"
                         "try:\n    import whisper_batch\nexcept ModuleNotFoundError:\n    pass\n"
                         "else:\n"
                         "    sys.exit('whisper_batch importable before the install: ' + whisper_batch.__file__)\n"
                         "assert not [m for m in sys.modules if 'editable' in m], sys.modules.keys()")
    assert code == 0, out

    start = time.monotonic()
    code, out, _ = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                         "--ignore-installed", "--no-cache-dir", str(src)], cwd=tmp_path, env=env, timeout=300)
    install_s = time.monotonic() - start
    assert code == 0, f"pip install . failed:\n{out[-4000:]}"

    # what the install laid in the fresh site-packages: the package and its metadata, nothing else
    added = {p.name for p in site_packages.iterdir()} - {"_borrowed_dependencies.pth", "__pycache__"}
    dist_infos = [n for n in added if n.endswith(".dist-info")]
    assert len(dist_infos) == 1 and dist_infos[0].startswith("whisper_batch-"), added
    assert added == {"whisper_batch", dist_infos[0]}, added
    dist_info = site_packages / dist_infos[0]
    assert (dist_info / "top_level.txt").read_text().split() == ["whisper_batch"]
    record_tops = {line.split(",")[0].split("/")[0] for line in (dist_info / "RECORD").read_text().splitlines() if line}
    assert record_tops - {".."} == {"whisper_batch", dist_infos[0]}, record_tops  # ".." only for the script
    assert (venv / "bin" / "whisper-batch").is_file()

    code, out = python_c(
        "import importlib, json, whisper_batch, whisper_batch.jobs.cli, "
        "whisper_batch.model.dims, whisper_batch.pipeline\n"
        "failed = {}\n"
        f"for name in {TOP_LEVEL_NAMES!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n        failed[name] = e.name\n"
        "print(json.dumps({'file': whisper_batch.__file__, 'cli': whisper_batch.jobs.cli.__file__, 'failed': failed}))")
    assert code == 0, out
    found = json.loads(out.strip().splitlines()[-1])
    assert Path(found["file"]).parent == site_packages / "whisper_batch", found
    assert Path(found["cli"]).is_relative_to(site_packages / "whisper_batch"), found
    assert found["failed"] == {n: n for n in TOP_LEVEL_NAMES}, f"importable beside whisper_batch: {found}"

    # the CLI from a folder whose files would shadow top-level model/pipeline/jobs
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("model", "pipeline", "jobs"):
        (shadow / f"{name}.py").write_text(SHADOW)
    out_dir = tmp_path / "OUT"
    code, out, run_s = _run([str(venv / "bin" / "whisper-batch"), "run", str(src / "examples" / "manifest.jsonl"),
                             "-o", str(out_dir)], cwd=shadow, env=env, timeout=420)
    assert code == 0, f"whisper-batch run failed ({code}):\n{out[-6000:]}"
    assert "shadowed" not in out, out[-3000:]
    code, out, _ = _run([str(venv / "bin" / "whisper-batch"), "status", str(out_dir), "--json"], cwd=shadow, env=env,
                        timeout=120)
    assert code == 0, out
    status = json.loads(out[out.index("{"):])
    assert status["rows_done"] == 4 and status["rows_failed"] == 0 and status["complete"], status
    rows = _transcribed_rows(out_dir)
    assert len(rows) == 4 and not [r for r in rows if r.get("error")], rows
    print(f"\ntiming: non-editable pip install {install_s:.1f} s, whisper-batch run {run_s:.1f} s")
