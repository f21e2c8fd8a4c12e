# %% [markdown]
# # Experiment runner
#
# > `moebook run`: papermill with parameters checked before anything executes, and every run recorded.

# %% [markdown]
# Every notebook has one cell tagged `parameters` whose assignments are its typed defaults
# (`steps: int = 200`, or a plain `lr = 3e-4` whose type is read off the value). This module reads that
# cell, checks the parameters a user asks for against it, expands sweeps, executes the notebook with
# papermill and records the run in `runs/<notebook>/<timestamp>-<hash>/`:
#
# - the executed notebook (outputs, plots),
# - `metrics.json`: whatever the notebook passed to `moebook.core.record_metrics`, plus the parameters,
#   seed, git commit, package versions, wall time and status.
#
# The command line is `moebook run NOTEBOOK [-p NAME VALUE ...]`, `moebook runs` and `moebook params`.

# %%
#| default_exp runner

# %%
#| export
from __future__ import annotations
import argparse, ast, datetime as dt, difflib, hashlib, itertools, json, os, platform, subprocess, sys, time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from moebook.core import METRICS_ENV, atomic_write_text, to_jsonable

# %%
import tempfile, shutil
import nbformat
from fastcore.test import test_eq, test_fail

# %% tags=["parameters"]
demo: bool = True  # run the small demonstrations in this notebook


# %% [markdown]
# ## Reading a notebook's parameters

# %%
#| export
class ParameterError(ValueError):
    "A parameter request that does not fit the notebook's `parameters` cell (CLI exit code 2)."

SUPPORTED_TYPES = {"int": int, "float": float, "str": str, "bool": bool}

@dataclass(frozen=True)
class Param:
    "One entry of a notebook's `parameters` cell."
    name: str
    type: type
    default: Any
    help: str = ""

def _param_type(node: ast.AST, value: Any, name: str) -> type:
    if node is not None:  # an annotation wins over the value's type
        key = ast.unparse(node)
        if key not in SUPPORTED_TYPES:
            raise ParameterError(f"parameter {name!r}: annotation {key!r} is not one of {sorted(SUPPORTED_TYPES)}")
        return SUPPORTED_TYPES[key]
    if type(value) not in SUPPORTED_TYPES.values():
        raise ParameterError(f"parameter {name!r}: default {value!r} is not an int, float, str or bool")
    return type(value)

def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src

def parameters_cell(nb: dict, path: str | Path = "notebook") -> dict:
    "The single code cell tagged `parameters` in the notebook `nb` (its JSON as a dict)."
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{path} must have exactly one code cell tagged 'parameters', found {len(cells)}")
    return cells[0]

def read_parameters(path: str | Path) -> dict[str, Param]:
    "Parse the typed defaults of the notebook at `path`."
    path = Path(path)
    if not path.exists(): raise ParameterError(f"notebook not found: {path}")
    if path.suffix != ".ipynb": raise ParameterError(f"not a notebook (.ipynb): {path}")
    try: nb = json.loads(path.read_text())  # plain JSON: nbformat's import alone takes ~2 s
    except json.JSONDecodeError as e: raise ParameterError(f"{path} is not a valid notebook: {e}") from None
    src = _source(parameters_cell(nb, path))
    lines, params = src.splitlines(), {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, ann, val = node.target.id, node.annotation, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, ann, val = node.targets[0].id, None, node.value
        else: raise ParameterError(f"{path}: parameters cell line {node.lineno} is not `name: type = value`")
        try: value = ast.literal_eval(val)
        except ValueError: raise ParameterError(f"{path}: default of {name!r} is not a literal") from None
        typ = _param_type(ann, value, name)
        comment = lines[node.lineno - 1].partition("#")[2].strip()
        params[name] = Param(name, typ, coerce(Param(name, typ, value), value), comment)
    return params


# %% [markdown]
# Values arrive either as Python objects (the Python API) or as command-line text. Both go through one
# check, so `steps=1.5` is refused the same way as `-p steps 1.5`. An `int` is accepted for a `float`
# parameter; a `bool` is never accepted for an `int`.

# %%
#| export
_TRUE, _FALSE = {"true", "1", "yes", "y"}, {"false", "0", "no", "n"}

def coerce(p: Param, value: Any) -> Any:
    "Check `value` (a Python object or command-line text) against `p`; return it as `p.type`."
    bad = ParameterError(f"parameter {p.name!r} expects {p.type.__name__}, got {value!r}")
    if isinstance(value, str) and p.type is not str:
        text = value.strip()
        if p.type is bool:
            if text.lower() in _TRUE: return True
            if text.lower() in _FALSE: return False
            raise bad
        try: return p.type(text)
        except ValueError: raise bad from None
    if p.type is float and type(value) in (int, float): return float(value)
    if type(value) is not p.type: raise bad
    return value

def check_parameters(spec: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    "Validate `values` against `spec`; returns the coerced values. Unknown names are refused with a suggestion."
    out = {}
    for name, value in values.items():
        if name not in spec:
            close = difflib.get_close_matches(name, spec, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(f"unknown parameter {name!r}{hint}; this notebook takes: {', '.join(spec)}")
        out[name] = coerce(spec[name], value)
    return out


# %%
if demo:
    tmp = Path(tempfile.mkdtemp())
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("steps: int = 10  # training steps\nlr = 3e-4\nname = 'x'\nquick: bool = False")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("from moebook.core import record_metrics\nrecord_metrics(result=steps * lr, name=name)")]
    nbformat.write(nb, tmp / "toy.ipynb")
    spec = read_parameters(tmp / "toy.ipynb")
    test_eq([(p.name, p.type, p.default) for p in spec.values()],
            [("steps", int, 10), ("lr", float, 3e-4), ("name", str, "x"), ("quick", bool, False)])
    test_eq(spec["steps"].help, "training steps")
    test_eq(check_parameters(spec, {"steps": "5", "lr": 1, "quick": "true"}), {"steps": 5, "lr": 1.0, "quick": True})
    test_fail(lambda: check_parameters(spec, {"step": 5}), contains="unknown parameter 'step' (did you mean 'steps'?)")
    test_fail(lambda: check_parameters(spec, {"steps": "1.5"}), contains="'steps' expects int")
    test_fail(lambda: check_parameters(spec, {"steps": True}), contains="'steps' expects int")
    test_fail(lambda: check_parameters(spec, {"quick": "maybe"}), contains="'quick' expects bool")


# %% [markdown]
# ## Sweeps
#
# On the command line a comma separates the values of a sweep (`-p lr 1e-3,3e-3 -p seed 0,1` is four
# runs, their cartesian product, executed one after another); write `\,` for a literal comma in a string.
# `--shard i/n` keeps every `n`-th combination starting at `i`, which is how one sweep is spread over `n`
# machines.

# %%
#| export
def split_values(text: str) -> list[str]:
    "Split command-line text on commas not escaped as `\\,`."
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] == ",": cur += ","; i += 2; continue
        if text[i] == ",": parts.append(cur); cur = ""
        else: cur += text[i]
        i += 1
    return parts + [cur]

def expand_sweep(spec: dict[str, Param], cli: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    "Cartesian product of the command-line `(name, text)` pairs, each value checked against `spec`."
    grid: dict[str, list[Any]] = {}
    for name, text in cli:
        if name in grid: raise ParameterError(f"parameter {name!r} given twice")
        grid[name] = [check_parameters(spec, {name: v})[name] for v in split_values(text)]
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]

def parse_shard(text: str) -> tuple[int, int]:
    "Parse `i/n` (0 <= i < n)."
    try: i, n = (int(x) for x in text.split("/"))
    except ValueError: raise ParameterError(f"--shard expects i/n such as 0/4, got {text!r}") from None
    if not 0 <= i < n: raise ParameterError(f"--shard {text}: need 0 <= i < n")
    return i, n


# %%
if demo:
    test_eq(split_values(r"a\,b,c"), ["a,b", "c"])
    combos = expand_sweep(spec, [("lr", "1e-3,3e-3"), ("steps", "1,2")])
    test_eq(combos, [{"lr": 1e-3, "steps": 1}, {"lr": 1e-3, "steps": 2}, {"lr": 3e-3, "steps": 1}, {"lr": 3e-3, "steps": 2}])
    test_eq(combos[1::2], [combos[1], combos[3]])  # what --shard 1/2 keeps
    test_fail(lambda: expand_sweep(spec, [("steps", "1,two")]), contains="'steps' expects int")
    test_fail(lambda: parse_shard("2/2"), contains="need 0 <= i < n")

# %% [markdown]
# ## Executing and recording a run

# %%
#| export
VERSIONED = ("moebook", "torch", "transformers", "diffusers", "numpy", "papermill")

def environment_info(repo: Path) -> dict[str, Any]:
    "Git commit (and whether the tree had uncommitted changes), Python and package versions."
    def git(*args):
        try: return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError): return None
    versions = {}
    for pkg in VERSIONED:
        try: versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError: versions[pkg] = None
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}

def run_id(params: dict[str, Any], when: dt.datetime) -> str:
    "`<timestamp>-<hash of the parameters>`: sortable by time, and equal parameters share the hash."
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:7]
    return f"{when:%Y%m%d-%H%M%S}-{h}"

def run_notebook(notebook: str | Path, # the .ipynb to execute
                 params: dict[str, Any] | None = None, # parameter overrides, checked against its parameters cell
                 runs_dir: str | Path = "runs", # runs go to `runs_dir/<notebook stem>/<run id>/`
                 progress: bool = True, # show papermill's cell progress bar
                 kernel_name: str | None = None, # Jupyter kernel; default: the notebook's own, else `python3`
                ) -> Path: # the run directory, holding the executed notebook and `metrics.json`
    "Execute `notebook` with papermill and record the run; raises `ParameterError` before executing anything."
    import papermill as pm
    notebook = Path(notebook).resolve()
    spec = read_parameters(notebook)
    kernel_name = kernel_name or json.loads(notebook.read_text()).get("metadata", {}).get("kernelspec", {}).get("name", "python3")
    overrides = check_parameters(spec, params or {})
    effective = {**{k: p.default for k, p in spec.items()}, **overrides}
    started = dt.datetime.now()
    base = Path(runs_dir).resolve() / notebook.stem  # absolute: the kernel runs in the notebook's folder
    run_dir = base / run_id(effective, started)
    for k in itertools.count(2):
        if not run_dir.exists(): break
        run_dir = base / f"{run_id(effective, started)}-{k}"
    run_dir.mkdir(parents=True)
    nb_metrics = run_dir / ".notebook_metrics.json"
    record = {"notebook": notebook.name, "run_id": run_dir.name, "started_at": started.isoformat(timespec="seconds"),
              "parameters": effective, "overrides": overrides, "seed": effective.get("seed"),
              **environment_info(notebook.parent)}
    old_env, t0, error = os.environ.get(METRICS_ENV), time.perf_counter(), None
    os.environ[METRICS_ENV] = str(nb_metrics)  # the kernel inherits it; record_metrics writes there
    try:
        pm.execute_notebook(notebook, run_dir / notebook.name, parameters=overrides, cwd=str(notebook.parent),
                            progress_bar=progress, kernel_name=kernel_name, language="python")
    except Exception as e:  # the executed notebook (with the failing cell) is kept for inspection
        error = f"{type(e).__name__}: {e}".splitlines()[0][:500] if not hasattr(e, "ename") else f"{e.ename}: {e.evalue}"[:500]
    finally:
        if old_env is None: os.environ.pop(METRICS_ENV, None)
        else: os.environ[METRICS_ENV] = old_env
    metrics = json.loads(nb_metrics.read_text()) if nb_metrics.exists() else {}
    nb_metrics.unlink(missing_ok=True)
    record.update(status="failed" if error else "ok", error=error, wall_time_s=round(time.perf_counter() - t0, 3), metrics=metrics)
    atomic_write_text(run_dir / "metrics.json", json.dumps(to_jsonable(record), indent=2, sort_keys=True))
    for f in (run_dir / "metrics.json", run_dir / notebook.name):  # readable records (mkstemp makes 0600)
        if f.exists(): f.chmod(0o644)
    return run_dir


# %%
if demo:
    d = run_notebook(tmp / "toy.ipynb", {"steps": 3}, runs_dir=tmp / "runs", progress=False)
    m = json.loads((d / "metrics.json").read_text())
    test_eq((m["status"], m["metrics"], m["overrides"], m["parameters"]["lr"]), ("ok", {"name": "x", "result": 3 * 3e-4}, {"steps": 3}, 3e-4))
    assert (d / "toy.ipynb").exists() and d.parent == tmp / "runs" / "toy"
    test_fail(lambda: run_notebook(tmp / "toy.ipynb", {"stepz": 3}, runs_dir=tmp / "bad"), contains="unknown parameter")
    assert not (tmp / "bad").exists()  # nothing executed, nothing written


# %% [markdown]
# ## Listing runs

# %%
#| export
def list_runs(runs_dir: str | Path = "runs", notebook: str | None = None) -> list[dict[str, Any]]:
    "Every recorded run under `runs_dir` (optionally of one notebook), oldest first."
    rows = []
    for f in sorted(Path(runs_dir).glob("*/*/metrics.json")):
        if notebook and f.parent.parent.name != Path(notebook).stem: continue
        try: rows.append({**json.loads(f.read_text()), "path": str(f.parent)})
        except json.JSONDecodeError: continue  # a run still being written
    return sorted(rows, key=lambda r: (r.get("started_at", ""), r["path"]))

def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

def format_runs(rows: list[dict[str, Any]], max_metrics: int = 3) -> str:
    "A plain-text table of runs: notebook, run id, status, wall time, overrides and the first scalar metrics."
    if not rows: return "no runs recorded"
    table = [("notebook", "run", "status", "wall s", "overrides", "metrics")]
    for r in rows:
        scalars = [(k, v) for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        table.append((Path(r["notebook"]).stem, r["run_id"], r["status"], f"{r.get('wall_time_s', 0):.1f}",
                      " ".join(f"{k}={_short(v)}" for k, v in r.get("overrides", {}).items()) or "-",
                      " ".join(f"{k}={_short(v)}" for k, v in scalars[:max_metrics]) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


# %%
if demo:
    out = format_runs(list_runs(tmp / "runs"))
    print(out)
    assert "toy" in out and "steps=3" in out and "result=0.0009" in out
    test_eq(format_runs([]), "no runs recorded")


# %% [markdown]
# ## The command line

# %%
#| export
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moebook", description="Run moebook notebooks as recorded experiments.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks with papermill and record each run")
    r.add_argument("notebooks", nargs="+", help="one or more .ipynb files")
    r.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter; commas make a sweep (\\, is a literal comma)")
    r.add_argument("--runs-dir", default=os.environ.get("MOEBOOK_RUNS_DIR", "runs"), help="where runs are recorded (default: runs)")
    r.add_argument("--shard", default="0/1", help="run only combination i, i+n, ... of a sweep (i/n)")
    r.add_argument("--no-progress", action="store_true", help="hide papermill's progress bar")
    l = sub.add_parser("runs", help="list recorded runs")
    l.add_argument("notebook", nargs="?", help="only runs of this notebook")
    l.add_argument("--runs-dir", default=os.environ.get("MOEBOOK_RUNS_DIR", "runs"))
    s = sub.add_parser("params", help="show a notebook's parameters")
    s.add_argument("notebook")
    w = sub.add_parser("site", help="build the website (Quarto when installed, else the static preview)")
    w.add_argument("--out", default="_site", help="output folder (default: _site)")
    w.add_argument("--from-runs", default=None, metavar="RUNS_DIR", help="render the latest successful run of each notebook")
    w.add_argument("--no-quarto", action="store_true", help="build the static preview even if quarto is installed")
    sub.add_parser("readme", help="write README.md from nbs/index.ipynb")
    c = sub.add_parser("claims", help="print the claim ledger of executed notebooks or recorded runs")
    c.add_argument("paths", nargs="+", metavar="PATH", help="an executed .ipynb, a run folder, or a runs/ folder")
    c.add_argument("--json", action="store_true", help="print the claim records as JSON instead of a markdown table")
    return p

def _cmd_run(a) -> int:
    shard = parse_shard(a.shard)
    plans = []  # validate every notebook and combination before executing any
    for nb in a.notebooks:
        spec = read_parameters(nb)
        plans += [(nb, combo) for combo in expand_sweep(spec, a.param)]
    plans = plans[shard[0]::shard[1]]
    failed = 0
    for i, (nb, combo) in enumerate(plans, 1):
        desc = " ".join(f"{k}={v}" for k, v in combo.items()) or "defaults"
        print(f"[{i}/{len(plans)}] {nb} ({desc})", flush=True)
        d = run_notebook(nb, combo, runs_dir=a.runs_dir, progress=not a.no_progress)
        m = json.loads((d / "metrics.json").read_text())
        print(f"  -> {m['status']} in {m['wall_time_s']:.1f}s: {d}" + (f"\n  error: {m['error']}" if m["error"] else ""), flush=True)
        failed += m["status"] != "ok"
    return 1 if failed else 0

def main(argv: Sequence[str] | None = None) -> int:
    "Entry point of the `moebook` console script."
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "run": return _cmd_run(a)
        if a.cmd == "runs": print(format_runs(list_runs(a.runs_dir, a.notebook))); return 0
        if a.cmd == "params":
            for p in read_parameters(a.notebook).values():
                print(f"{p.name}: {p.type.__name__} = {p.default!r}" + (f"  # {p.help}" if p.help else ""))
            return 0
        if a.cmd == "site":
            from moebook.site import build_site
            build_site(out=a.out, runs_dir=a.from_runs, use_quarto=not a.no_quarto); return 0
        if a.cmd == "readme":
            from moebook.site import write_readme
            print(f"wrote {write_readme()}"); return 0
        if a.cmd == "claims":
            from moebook.evidence import EvidenceError, claims_command  # imported here: only this command needs it
            try: return claims_command(a.paths, a.json)
            except EvidenceError as e: raise ParameterError(str(e)) from None  # same exit path: message, code 2
    except ParameterError as e:
        print(f"moebook: error: {e}", file=sys.stderr); return 2
    return 2


# %%
if demo:
    test_eq(main(["run", str(tmp / "toy.ipynb"), "-p", "steps", "x", "--runs-dir", str(tmp / "cli")]), 2)
    assert not (tmp / "cli").exists()
    test_eq(main(["run", str(tmp / "toy.ipynb"), "-p", "steps", "1,2", "--shard", "1/2", "--no-progress", "--runs-dir", str(tmp / "cli")]), 0)
    test_eq([r["overrides"] for r in list_runs(tmp / "cli")], [{"steps": 2}])
    shutil.rmtree(tmp)
