import multiprocessing.process, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
BIN = Path(sys.executable).parent
os.environ.setdefault("MOEBOOK_QUIET", "1")


def notebooks():
    return sorted(NBS.glob("*.ipynb"))


def moebook_cli(*args, cwd=ROOT, timeout=600):
    "Run the installed `moebook` console script."
    return subprocess.run([str(BIN / "moebook"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def copy_project(dst: Path) -> Path:
    "A copy of what nbdev needs (settings, notebooks, package) to run its commands without touching the repo."
    for f in ("settings.ini", "pyproject.toml", "_quarto.yml"):
        shutil.copy2(ROOT / f, dst / f)
    shutil.copytree(NBS, dst / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    shutil.copytree(ROOT / "moebook", dst / "moebook", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture
def project_copy(tmp_path):
    return copy_project(tmp_path)


@pytest.fixture(autouse=True)
def no_process_in_fast_tests(request, monkeypatch):
    "`make test-fast` (MOEBOOK_NO_SPAWN=1) starts no process: a test that starts one must be marked slow or distributed."
    if os.environ.get("MOEBOOK_NO_SPAWN", "") in ("", "0"): return
    if any(request.node.get_closest_marker(m) for m in ("slow", "distributed", "notebook")): return
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow (or distributed)")
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
