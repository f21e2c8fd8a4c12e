import multiprocessing.process, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
BIN = Path(sys.executable).parent
os.environ.setdefault("MOEBOOK_QUIET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each xdist process (and the kernels and workers it starts) gets its share of the cores: two processes whose
    # torch thread pools both span every core wait on each other's threads (a smoke run took 2.6x as long).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


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


# ------------------------------------------------------------------ how `make test` splits the work (pytest-xdist)
# `make test` runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`: xdist hands out work units in the order
# below, one at a time to whichever process is free. A test file whose tests share module fixtures is one unit
# (its fixtures are built once); the two website files share one site build; notebook smoke runs and `moebook run`
# tests start their own processes and share nothing, so each is its own unit and they spread over both processes.
# The long units go first, so that neither process is left with a long one at the end while the other idles.
INDEPENDENT_TESTS = {"test_notebooks.py", "test_runner.py"}
SHARED_GROUPS = {"test_site.py": "website", "test_site_browser.py": "website"}
FIRST = ["website", "test_moe.py", "test_notebooks.py", "test_runner.py"]  # then every other file, in name order


def xdist_group(item) -> str | None:
    "The unit `item` is scheduled with: its file (or a group of files), or None when it can run on its own."
    name = item.path.name
    return None if name in INDEPENDENT_TESTS else SHARED_GROUPS.get(name, name)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if (group := xdist_group(item)) is not None: item.add_marker(pytest.mark.xdist_group(group))
    rank = lambda item: FIRST.index(k) if (k := xdist_group(item) or item.path.name) in FIRST else len(FIRST)
    items.sort(key=rank)  # stable: the order within a file is kept


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist it is never called
def pytest_xdist_node_collection_finished(node, ids):
    "With `--dist loadgroup`, stop at once if a worker's test ids lack their group (the groups would be scattered)."
    if node.config.getoption("dist") != "loadgroup": return
    lost = [i for i in ids if "@" not in i and Path(i.split("::")[0]).name not in INDEPENDENT_TESTS]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist did not tag {lost[0]} (and {len(lost) - 1} more) with its xdist_group, so `--dist loadgroup` "
            f"would scatter the groups: pytest {pytest.__version__} is not one that pytest-xdist supports (see pyproject.toml)")


@pytest.fixture(scope="session")
def fallback_site(tmp_path_factory):
    "The site's nbconvert preview, built once per test process (tests/test_site.py and test_site_browser.py read it)."
    from moebook.site import build_site
    return build_site(out=tmp_path_factory.mktemp("site") / "_site", use_quarto=False)
