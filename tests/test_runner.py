"`moebook run` / `moebook runs`: parameter checking, recording, sweeps, determinism."
import json, os, signal, subprocess, time
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow  # every test here starts the CLI, papermill or a kernel

from conftest import BIN, NBS, moebook_cli

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


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def test_sweep_resumes_at_the_same_commit_and_force_reruns(tmp_path, monkeypatch):
    from moebook.runner import default_run, list_runs
    monkeypatch.delenv("MOEBOOK_RUNS_DIR", raising=False)
    repo = tmp_path / "repo"
    nb = write_toy(repo / "nbs" / "toy.ipynb")
    git(repo, "init", "-q"); git(repo, "add", "nbs"); git(repo, "commit", "-qm", "toy")
    seeds = lambda: sorted(r["parameters"]["seed"] for r in list_runs(repo / "runs"))
    run = lambda *a: moebook_cli("run", "nbs/toy.ipynb", "--no-progress", *a, cwd=repo)
    assert run("--sweep", "seed=0,1").returncode == 0 and seeds() == [0, 1]
    r = run("--sweep", "seed=0,1,2")  # a sweep stopped after two combinations, run again with one more
    assert r.returncode == 0 and seeds() == [0, 1, 2], r.stdout
    assert r.stdout.count("skipped, recorded ok at this commit") == 2
    assert run("-p", "seed", "1", "--force").returncode == 0 and seeds() == [0, 1, 1, 2]
    git(repo, "commit", "-qm", "next", "--allow-empty")  # another commit: nothing recorded for it yet
    assert run("-p", "seed", "2").returncode == 0 and seeds() == [0, 1, 1, 2, 2]
    nb.write_text(nb.read_text().replace("steps: int = 5", "steps: int = 6"))  # uncommitted change: never skipped
    assert run("-p", "steps", "5", "-p", "seed", "2").returncode == 0 and seeds() == [0, 1, 1, 2, 2, 2]
    # the run made with the notebook's defaults (seed 0, steps 6 now): none yet; at steps 5 it was the first
    assert default_run(repo / "runs", nb) is None
    git(repo, "checkout", "nbs/toy.ipynb")
    assert default_run(repo / "runs", nb) == Path(list_runs(repo / "runs")[0]["path"])


def alive(pid):
    "Running (not a zombie)."
    try: state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError): return False
    return state not in ("Z", "X")


def sleeper_notebook(path):
    "A notebook whose kernel leaves a worker process (`sleep`), records one metric, then waits `wait` seconds."
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("wait: float = 0.0\npidfile: str = ''")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(
        "import os, subprocess, time\nfrom pathlib import Path\nfrom moebook.core import record_metrics\n"
        # an orphaned worker (its parent shell exits): ipykernel's own shutdown does not see it
        "worker = subprocess.run(['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'], capture_output=True, text=True)\n"
        "record_metrics(started=1)\nPath(pidfile).write_text(f'{os.getpid()} {worker.stdout.strip()}')\ntime.sleep(wait)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("sig", [None, signal.SIGTERM, signal.SIGINT], ids=["finished", "SIGTERM", "SIGINT"])
def test_kernel_and_workers_end_with_the_run_and_interrupts_are_recorded(tmp_path, sig):
    nb, pidfile = sleeper_notebook(tmp_path / "sleeper.ipynb"), tmp_path / "pids"
    cmd = [BIN / "moebook", "run", nb, "-p", "wait", "0" if sig is None else "300", "-p", "pidfile", pidfile,
           "--runs-dir", tmp_path / "runs", "--no-progress"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    pids = []
    try:
        deadline = time.monotonic() + 300
        while not (pidfile.exists() and pidfile.read_text()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(x) for x in pidfile.read_text().split()]  # the kernel and its worker
        if sig is not None:
            time.sleep(0.5); proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == (0 if sig is None else 128 + sig), err
        (m,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "sleeper").glob("*/metrics.json")]
        assert m["status"] == ("ok" if sig is None else "interrupted"), m
        assert m["metrics"] == {"started": 1}  # what was recorded before the interrupt is kept
        if sig is not None:
            assert m["error"] == f"{signal.Signals(sig).name} received"
            assert "interrupted" in moebook_cli("runs", "--runs-dir", tmp_path / "runs").stdout
        assert not [pid for pid in pids if alive(pid)], "the kernel and its worker must end with the run"
    finally:
        if proc.poll() is None: proc.kill()
        for pid in pids:
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass


def test_every_notebook_names_its_kernel_and_language():
    "Plain papermill needs both (`ValueError: No language found in notebook` otherwise)."
    for f in sorted(NBS.glob("*.ipynb")):
        md = json.loads(f.read_text())["metadata"]
        assert md.get("kernelspec", {}).get("name") == "python3", f.name
        assert md.get("language_info", {}).get("name") == "python", f.name


def test_nbdev_clean_keeps_kernel_and_language(project_copy):
    f = project_copy / "nbs" / "00_core.ipynb"
    r = subprocess.run([str(BIN / "nbdev_clean"), "--fname", str(f)], cwd=project_copy, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = json.loads(f.read_text())["metadata"]
    assert md["kernelspec"]["name"] == "python3" and md["language_info"]["name"] == "python"


def test_plain_papermill_runs_a_committed_notebook(tmp_path):
    "`papermill nbs/X.ipynb out.ipynb -p NAME VALUE`, no -k / --language, as a papermill user types it."
    out = tmp_path / "out.ipynb"
    r = subprocess.run([str(BIN / "papermill"), "nbs/00_core.ipynb", str(out), "-p", "seed", "1"],
                       cwd=NBS.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    nb = json.loads(out.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "seed = 1" in "".join(injected[0]["source"])


@pytest.mark.parametrize("flag", [[], ["--notebook-progress"]], ids=["default", "notebook-progress"])
def test_progress_bars_stay_out_of_recorded_notebooks(tmp_path, monkeypatch, flag):
    monkeypatch.delenv("MOEBOOK_QUIET", raising=False)  # the test suite sets it; a user usually does not
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("n: int = 50")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("from moebook.core import progress\nfor _ in progress(range(n)): pass"),
                nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(n)): pass")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "bars.ipynb")
    r = moebook_cli("run", tmp_path / "bars.ipynb", "--runs-dir", tmp_path / "runs", "--no-progress", *flag)
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "runs" / "bars").iterdir()
    cells = json.loads((run / "bars.ipynb").read_text())["cells"][1:]
    bars = [any(o.get("name") == "stderr" and "50/50" in "".join(o["text"]) for o in c["outputs"]) for c in cells]
    assert bars == ([True, True] if flag else [False, False])


def test_figures_are_recorded_even_with_an_agg_backend_in_the_shell(tmp_path, monkeypatch):
    "MPLBACKEND=Agg in the caller's environment made plt.show() a silent no-op: 01, 03 and 04 lost their figures."
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("seed: int = 0"); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "fig.ipynb")
    r = moebook_cli("run", tmp_path / "fig.ipynb", "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "runs" / "fig").iterdir()
    outs = json.loads((run / "fig.ipynb").read_text())["cells"][-1]["outputs"]
    assert any("image/png" in o.get("data", {}) for o in outs), outs


@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
def test_global_lbl_ddp_removes_its_temporary_folder(tmp_path, monkeypatch, fail):
    "`run_ddp` without `out_dir` leaves no `glbl-ddp-*` folder behind (torchrun replaced by a stand-in writer)."
    import tempfile
    import moebook.global_lbl as g
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def fake_torchrun(argv, nproc, env, timeout):
        out = Path(argv[argv.index("--out") + 1])
        assert out.name.startswith("glbl-ddp-") and out.parent == tmp_path
        if fail: raise RuntimeError("torchrun failed")
        for s in argv[argv.index("--seeds") + 1].split(","):
            g.save_checkpoint({"seed": int(s)}, out / f"global_dp-seed{s}.pt")

    monkeypatch.setattr(g, "run_torchrun", fake_torchrun)
    cfg = g.ExperimentConfig(n_micro=2)
    if fail:
        with pytest.raises(RuntimeError, match="torchrun failed"): g.run_ddp(cfg, [0, 1], variants=("global_dp",))
    else:
        assert g.run_ddp(cfg, [0, 1], variants=("global_dp",)) == {("global_dp", 0): {"seed": 0}, ("global_dp", 1): {"seed": 1}}
    assert not list(tmp_path.glob("glbl-ddp-*"))


CLAIM_CELL = """\
import dataclasses
from moebook.core import record_metrics
from moebook.evidence import Claim, judge, paired_t
ctrl = [0.0, 1.0, 2.0, 3.0]
claim = Claim(notebook="toy.ipynb", id="1", claim="B beats A", metric="score", direction="increase",
              treatment="B", control="A", target=0.2)
claim = judge(claim.with_estimate(paired_t([x + 1 + 0.01 * i for i, x in enumerate(ctrl)], ctrl)))
record_metrics(claims=[dataclasses.asdict(claim)])
"""


def test_claims_command_reads_the_claims_a_run_recorded(tmp_path, monkeypatch):
    "`moebook run` (README style) then `moebook claims runs --json`: the records the notebook made reach the ledger."
    monkeypatch.delenv("MOEBOOK_RUNS_DIR", raising=False)
    repo = tmp_path / "repo"
    nb = write_toy(repo / "nbs" / "toy.ipynb")
    book = nbformat.read(nb, as_version=4)
    book.cells.append(nbformat.v4.new_code_cell(CLAIM_CELL))
    nbformat.write(book, nb)
    assert moebook_cli("run", "nbs/toy.ipynb", "--no-progress", cwd=repo).returncode == 0
    r = moebook_cli("claims", "runs", "--json", cwd=repo)
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    assert (rec["notebook"], rec["id"], rec["verdict"]) == ("toy.ipynb", "1", "supported")
    assert abs(rec["effect"] - 1.015) < 1e-9  # mean paired difference of the cell's numbers
    table = moebook_cli("claims", "runs", cwd=repo)
    assert table.returncode == 0 and "B beats A" in table.stdout
    (run,) = (repo / "runs" / "toy").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    m["metrics"].pop("claims")
    (run / "metrics.json").write_text(json.dumps(m))
    bad = moebook_cli("claims", run, cwd=repo)
    assert bad.returncode == 2 and bad.stderr.startswith("moebook: error: ") and str(run) in bad.stderr
