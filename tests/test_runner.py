"`moebook run` / `moebook runs`: parameter checking, recording, sweeps, determinism."
import json

import nbformat
import pytest

from conftest import NBS, moebook_cli

TOY = """\
import torch
from moebook.core import seed_everything, record_metrics
seed_everything(seed)
x = torch.randn(64, 8)
w = torch.randn(8, 1, requires_grad=True)
for _ in range(steps):
    loss = (x @ w).pow(2).mean(); loss.backward()
    with torch.no_grad(): w -= lr * w.grad; w.grad = None
record_metrics(loss=loss.item(), label=label)
"""


def write_toy(path):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("seed: int = 0\nsteps: int = 5\nlr: float = 0.1\nlabel = 'a'\nfast: bool = True")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(TOY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def toy(tmp_path):
    return write_toy(tmp_path / "toy.ipynb")


def test_readme_style_run_records_metrics_under_relative_runs(tmp_path, monkeypatch):
    "`moebook run nbs/x.ipynb` from the repo root with the default relative `runs/` (the README's command)."
    monkeypatch.delenv("MOEBOOK_RUNS_DIR", raising=False)
    repo = tmp_path / "repo"
    write_toy(repo / "nbs" / "toy.ipynb")
    r = moebook_cli("run", "nbs/toy.ipynb", "-p", "steps", "2", "--no-progress", cwd=repo)
    assert r.returncode == 0, r.stderr + r.stdout
    (run,) = (repo / "runs" / "toy").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["metrics"]) == {"loss", "label"}, m["metrics"]  # the kernel (cwd nbs/) wrote where the runner reads
    assert not (repo / "nbs" / "runs").exists()
    for f in ("metrics.json", "toy.ipynb"):
        assert (run / f).stat().st_mode & 0o777 == 0o644, f
    listing = moebook_cli("runs", cwd=repo)
    assert "loss=" in listing.stdout, listing.stdout


@pytest.mark.parametrize("args, message", [
    (["-p", "stepz", "3"], "unknown parameter 'stepz' (did you mean 'steps'?)"),
    (["-p", "steps", "3.5"], "parameter 'steps' expects int"),
    (["-p", "fast", "maybe"], "parameter 'fast' expects bool"),
    (["-p", "lr", "1e-3,2e-3"], "parameter 'lr' expects float, got '1e-3,2e-3'; a sweep is written --sweep lr=1e-3,2e-3"),
    (["--sweep", "lr=1e-3,fast"], "parameter 'lr' expects float, got 'fast'"),
    (["--sweep", "stepz=1,2"], "unknown parameter 'stepz'"),
    (["--sweep", "steps"], "--sweep expects NAME=V1,V2"),
    (["--sweep", "seed=1,1"], "a value is listed twice"),
    (["-p", "steps", "1", "-p", "steps", "2"], "given twice"),
    (["-p", "steps", "1", "--sweep", "steps=2,3"], "given twice"),
])
def test_bad_parameters_exit_2_and_write_nothing(toy, tmp_path, args, message):
    r = moebook_cli("run", toy, *args, "--runs-dir", tmp_path / "runs")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_notebook_is_a_clear_error(tmp_path):
    r = moebook_cli("run", tmp_path / "nope.ipynb", "--runs-dir", tmp_path / "runs")
    assert r.returncode == 2 and "notebook not found" in r.stderr


def test_real_notebook_bad_parameter_is_refused_before_running(tmp_path):
    r = moebook_cli("run", NBS / "00_core.ipynb", "-p", "seed", "zero", "--runs-dir", tmp_path / "runs")
    assert r.returncode == 2 and "'seed' expects int" in r.stderr and not (tmp_path / "runs").exists()


def test_run_records_metrics_and_environment(toy, tmp_path):
    r = moebook_cli("run", toy, "-p", "steps", "3", "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    (run,) = (tmp_path / "runs" / "toy").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["overrides"] == {"steps": 3} and m["seed"] == 0
    assert set(m["metrics"]) == {"loss", "label"} and m["parameters"]["lr"] == 0.1
    assert m["versions"]["torch"] and m["wall_time_s"] > 0 and "git_commit" in m
    assert (run / "toy.ipynb").exists()
    listing = moebook_cli("runs", "--runs-dir", tmp_path / "runs")
    assert "toy" in listing.stdout and "steps=3" in listing.stdout


def test_same_parameters_give_identical_metrics(toy, tmp_path):
    for _ in range(2):
        assert moebook_cli("run", toy, "-p", "seed", "3", "--runs-dir", tmp_path / "runs", "--no-progress").returncode == 0
    a, b = [json.loads(p.read_text())["metrics"] for p in sorted((tmp_path / "runs" / "toy").glob("*/metrics.json"))]
    assert a == b
    moebook_cli("run", toy, "-p", "seed", "4", "--runs-dir", tmp_path / "runs2", "--no-progress")
    (c,) = [json.loads(p.read_text())["metrics"] for p in (tmp_path / "runs2" / "toy").glob("*/metrics.json")]
    assert c["loss"] != a["loss"], "the seed must matter"


def test_sweep_is_a_cartesian_product_and_shards_split_it(toy, tmp_path):
    r = moebook_cli("run", toy, "--sweep", "lr=0.1,0.2", "--sweep", r"label=x\,y,z", "--runs-dir", tmp_path / "runs",
                    "--shard", "1/2", "--no-progress")
    assert r.returncode == 0, r.stderr
    got = sorted((json.loads(p.read_text())["overrides"]["lr"], json.loads(p.read_text())["overrides"]["label"])
                 for p in (tmp_path / "runs" / "toy").glob("*/metrics.json"))
    assert got == [(0.1, "z"), (0.2, "z")]  # combos 1 and 3 of [(0.1,'x,y'), (0.1,'z'), (0.2,'x,y'), (0.2,'z')]


def test_p_passes_a_comma_as_a_character(toy, tmp_path):
    r = moebook_cli("run", toy, "-p", "label", "dense,switch_aux", "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.returncode == 0, r.stderr
    (m,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "toy").glob("*/metrics.json")]
    assert m["overrides"] == {"label": "dense,switch_aux"} and m["metrics"]["label"] == "dense,switch_aux"


def test_failing_notebook_is_recorded_as_failed(toy, tmp_path):
    r = moebook_cli("run", toy, "-p", "steps", "-1", "-p", "lr", "0.1", "--runs-dir", tmp_path / "runs", "--no-progress")
    # steps=-1 runs no step, so `loss` is undefined: the notebook fails, the run says so, exit code 1
    assert r.returncode == 1
    (m,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "toy").glob("*/metrics.json")]
    assert m["status"] == "failed" and "NameError" in m["error"]


def test_params_command_lists_typed_defaults():
    r = moebook_cli("params", NBS / "00_core.ipynb")
    assert r.returncode == 0 and "seed: int = 0" in r.stdout


def test_claims_command_dispatch(monkeypatch, capsys):
    "`moebook claims` hands its paths and --json to `moebook.evidence.claims_command`; its errors exit 2."
    import sys, types
    from moebook.runner import main
    calls = []
    fake = types.ModuleType("moebook.evidence")  # stands in for the module only to check the wiring

    class EvidenceError(ValueError): pass

    def claims_command(paths, as_json):
        calls.append((paths, as_json))
        if paths == ["bad"]: raise EvidenceError("bad: never executed")
        return 0

    fake.EvidenceError, fake.claims_command = EvidenceError, claims_command
    monkeypatch.setitem(sys.modules, "moebook.evidence", fake)
    assert main(["claims", "a.ipynb", "runs", "--json"]) == 0 and main(["claims", "x.ipynb"]) == 0
    assert calls == [(["a.ipynb", "runs"], True), (["x.ipynb"], False)]
    assert main(["claims", "bad"]) == 2
    assert "moebook: error: bad: never executed" in capsys.readouterr().err
