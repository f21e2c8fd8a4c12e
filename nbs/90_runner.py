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
#   seed, git commit, package versions, wall time and status (`ok`, `failed`, `interrupted`).
#
# The command line is `moebook run NOTEBOOK [-p NAME VALUE ...] [--sweep NAME=V1,V2 ...]`, `moebook runs`,
# `moebook params` and `moebook claims`. For example (from the repository root):
#
# ```sh
# moebook run nbs/02_global_lbl.ipynb -p steps 400 -p seed 1                # one run
# moebook run nbs/02_global_lbl.ipynb --sweep lr=1e-3,3e-3 --sweep seed=0,1  # a sweep: 4 runs
# moebook runs                                                              # table of recorded runs
# ```
#
# Every committed notebook names its kernel and language, so plain papermill runs it too:
# `papermill nbs/01b_schedules.ipynb out.ipynb -p plot_steps 200`.

# %%
#| default_exp runner

# %%
#| export
from __future__ import annotations
import argparse, ast, datetime as dt, difflib, hashlib, itertools, json, os, platform, signal, sys, threading, time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from moebook.core import METRICS_ENV, atomic_write_text, provenance, to_jsonable

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
# `-p NAME VALUE` sets one parameter to one value, as written: a comma is just a character
# (`-p variants dense,switch_aux` passes that string). A sweep is asked for explicitly:
# `--sweep NAME=V1,V2,...` (repeatable; write `\,` for a comma inside a value). Several sweeps make their
# cartesian product, executed one after another: `--sweep lr=1e-3,3e-3 --sweep seed=0,1` is four runs.
# Every value is checked before anything runs. `--shard i/n` keeps every `n`-th combination starting at
# `i`, which is how one sweep is spread over `n` machines.

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

def parse_sweep(text: str) -> tuple[str, list[str]]:
    "`NAME=V1,V2,...` -> `(NAME, [V1, V2, ...])`."
    name, eq, values = text.partition("=")
    if not eq or not name.strip(): raise ParameterError(f"--sweep expects NAME=V1,V2,..., got {text!r}")
    return name.strip(), split_values(values)

def expand_sweep(spec: dict[str, Param], # the notebook's parameters
                 fixed: Sequence[tuple[str, str]] = (), # `-p NAME VALUE` pairs: one value each, taken as is
                 sweeps: Sequence[str] = (), # `--sweep NAME=V1,V2` texts
                ) -> list[dict[str, Any]]: # every combination, each value checked against `spec`
    "The runs a command line asks for: the fixed values times the cartesian product of the sweeps."
    grid: dict[str, list[Any]] = {}
    def add(name, values):
        if name in grid: raise ParameterError(f"parameter {name!r} given twice")
        grid[name] = values
    for name, text in fixed:
        try: add(name, [check_parameters(spec, {name: text})[name]])
        except ParameterError as e:
            if "," in text and name in spec and name not in grid:  # probably the old comma-sweep syntax
                raise ParameterError(f"{e}; a sweep is written --sweep {name}={text}") from None
            raise
    for text in sweeps:
        name, texts = parse_sweep(text)
        values = [check_parameters(spec, {name: v})[name] for v in texts]
        if len({json.dumps(v) for v in values}) < len(values):
            raise ParameterError(f"--sweep {name}: a value is listed twice in {text!r}")
        add(name, values)
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
    test_eq(expand_sweep(spec, [("name", "dense,switch_aux"), ("steps", "2")]), [{"name": "dense,switch_aux", "steps": 2}])
    combos = expand_sweep(spec, sweeps=["lr=1e-3,3e-3", "steps=1,2"])
    test_eq(combos, [{"lr": 1e-3, "steps": 1}, {"lr": 1e-3, "steps": 2}, {"lr": 3e-3, "steps": 1}, {"lr": 3e-3, "steps": 2}])
    test_eq(expand_sweep(spec, [("quick", "yes")], [r"name=a\,b,c"]), [{"quick": True, "name": "a,b"}, {"quick": True, "name": "c"}])
    test_eq(combos[1::2], [combos[1], combos[3]])  # what --shard 1/2 keeps
    test_fail(lambda: expand_sweep(spec, sweeps=["steps=1,two"]), contains="'steps' expects int")
    test_fail(lambda: expand_sweep(spec, [("steps", "1,2")]), contains="a sweep is written --sweep steps=1,2")
    test_fail(lambda: expand_sweep(spec, [("steps", "1")], ["steps=2,3"]), contains="'steps' given twice")
    test_fail(lambda: expand_sweep(spec, sweeps=["steps"]), contains="--sweep expects NAME=V1,V2")
    test_fail(lambda: expand_sweep(spec, sweeps=["lr=0.1,1e-1"]), contains="listed twice")
    test_fail(lambda: parse_shard("2/2"), contains="need 0 <= i < n")

# %% [markdown]
# ## Executing and recording a run
#
# papermill runs the notebook in a worker thread while the main thread waits for it and for signals:
# Ctrl-C (SIGINT) or SIGTERM end the kernel and every process it started (it runs in its own process
# group), and the run is recorded as `interrupted` with the metrics recorded so far. A run that raises is
# recorded as `failed`. A `running` record is written when the run starts, so a runner killed without a
# chance to clean up (SIGKILL, power loss) still leaves a visible record.
#
# Records are for reading later, so by default the kernel runs with progress bars off (`MOEBOOK_QUIET`,
# tqdm's and Hugging Face's switches): an executed notebook does not carry thousands of progress lines.
# All paths handed to the kernel are absolute: it runs in the notebook's folder, not the caller's.

# %%
#| export
VERSIONED = ("moebook", "torch", "transformers", "diffusers", "numpy", "papermill")
QUIET_ENV = {"MOEBOOK_QUIET": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# A kernel inherits MPLBACKEND; `Agg` from the caller's shell makes every plt.show() a silent no-op, so a
# record would lose its figures. The kernel always gets Jupyter's inline backend.
INLINE_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline"}

def environment_info(repo: Path) -> dict[str, Any]:
    "Git commit (and whether the tree had uncommitted changes), Python and package versions."
    git = provenance(repo)
    versions = {}
    for pkg in VERSIONED:
        try: versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError: versions[pkg] = None
    return {"git_commit": git["commit"], "git_dirty": bool(git["dirty"]),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}

def run_id(params: dict[str, Any], when: dt.datetime) -> str:
    "`<timestamp>-<hash of the parameters>`: sortable by time, and equal parameters share the hash."
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:7]
    return f"{when:%Y%m%d-%H%M%S}-{h}"

def effective_parameters(spec: dict[str, Param], overrides: dict[str, Any]) -> dict[str, Any]:
    "The values a run uses: the defaults with `overrides` (already checked) applied."
    return {**{k: p.default for k, p in spec.items()}, **overrides}


# %%
#| export
class RunInterrupted(KeyboardInterrupt):
    "A run stopped by SIGINT or SIGTERM; it was recorded as `interrupted` in `run_dir`."
    def __init__(self, run_dir: Path, signame: str):
        super().__init__(f"{signame}: run recorded as interrupted in {run_dir}")
        self.run_dir, self.signame = run_dir, signame

class _SigTerm(KeyboardInterrupt): pass

def _raise_sigterm(signum, frame): raise _SigTerm()

def end_process_group(pgid: int | None, # a process group id (the kernel's: it leads its own session)
                      grace: float = 5.0, # seconds between SIGTERM and SIGKILL
                     ) -> None:
    "End every process left in group `pgid`: SIGTERM, then SIGKILL after `grace` seconds."
    if not pgid or not hasattr(os, "killpg"): return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try: os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError): return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try: os.waitpid(pgid, os.WNOHANG)  # the kernel is our child: reap it, or it lingers as a zombie
            except ChildProcessError: pass
            try: os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError): return
            time.sleep(0.05)

def _kernel_manager_class(env: dict[str, str], pgids: list[int]):
    "jupyter_client's kernel manager, starting the kernel with `env` added and reporting its process group."
    from jupyter_client.manager import AsyncKernelManager
    class RunKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw["env"] = {**(kw.get("env") or os.environ), **env}
            if self.kernel_name == "python3":  # ipykernel: no TCP-encryption warning per run
                kw["extra_arguments"] = [*(kw.get("extra_arguments") or []), "--IPKernelApp.log_level=ERROR"]
            await super().start_kernel(**kw)
            if getattr(self.provisioner, "pgid", None): pgids.append(self.provisioner.pgid)
    return RunKernelManager


# %%
#| export
def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "metrics.json", json.dumps(to_jsonable(record), indent=2, sort_keys=True))
    for f in run_dir.iterdir():  # readable records (mkstemp makes 0600), whatever the umask
        if f.is_file() and not f.name.startswith("."): f.chmod(0o644)

def _error_text(e: BaseException) -> str:
    if hasattr(e, "ename"): return f"{e.ename}: {e.evalue}"[:500]
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]

def run_notebook(notebook: str | Path, # the .ipynb to execute
                 params: dict[str, Any] | None = None, # parameter overrides, checked against its parameters cell
                 runs_dir: str | Path = "runs", # runs go to `runs_dir/<notebook stem>/<run id>/`
                 progress: bool = True, # show papermill's cell progress bar (in this terminal)
                 kernel_name: str | None = None, # Jupyter kernel; default: the notebook's own, else `python3`
                 quiet: bool = True, # progress bars off inside the notebook (they would fill the record)
                ) -> Path: # the run directory, holding the executed notebook and `metrics.json`
    "Execute `notebook` with papermill and record the run; raises `ParameterError` before executing anything."
    import papermill as pm
    notebook = Path(notebook).resolve()
    spec = read_parameters(notebook)
    kernel_name = kernel_name or json.loads(notebook.read_text()).get("metadata", {}).get("kernelspec", {}).get("name", "python3")
    overrides = check_parameters(spec, params or {})
    effective = effective_parameters(spec, overrides)
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
              "pid": os.getpid(), "host": platform.node(), **environment_info(notebook.parent)}
    _write_record(run_dir, {**record, "status": "running", "error": None, "wall_time_s": None, "metrics": {}})
    pgids, box = [], {}
    kernel_env = {METRICS_ENV: str(nb_metrics), **INLINE_ENV, **(QUIET_ENV if quiet else {})}
    def execute():
        try:
            pm.execute_notebook(notebook, run_dir / notebook.name, parameters=overrides, cwd=str(notebook.parent),
                                progress_bar=progress, kernel_name=kernel_name, language="python",
                                kernel_manager_class=_kernel_manager_class(kernel_env, pgids))
        except BaseException as e: box["error"] = e  # the executed notebook (with the failing cell) is kept
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_sigterm) if main_thread else None
    t0, interrupted = time.perf_counter(), None
    worker = threading.Thread(target=execute, name=f"moebook-run-{run_dir.name}", daemon=True)
    try:
        worker.start()
        while worker.is_alive(): worker.join(0.2)  # short waits, so signals reach this thread at once
    except KeyboardInterrupt as e:
        interrupted = "SIGTERM" if isinstance(e, _SigTerm) else "SIGINT"
    finally:
        if main_thread:  # finish the record before the next signal may act
            signal.signal(signal.SIGTERM, signal.SIG_IGN); old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for pgid in pgids: end_process_group(pgid)  # the kernel (on interrupt) and any worker processes
            worker.join(60)
            for pgid in pgids: end_process_group(pgid)  # one that started while we were stopping
            metrics = json.loads(nb_metrics.read_text()) if nb_metrics.exists() else {}
            nb_metrics.unlink(missing_ok=True)
            error = f"{interrupted} received" if interrupted else _error_text(box["error"]) if "error" in box else None
            status = "interrupted" if interrupted else "failed" if error else "ok"
            _write_record(run_dir, {**record, "status": status, "error": error,
                                    "wall_time_s": round(time.perf_counter() - t0, 3), "metrics": metrics})
        finally:
            if main_thread: signal.signal(signal.SIGTERM, old_term); signal.signal(signal.SIGINT, old_int)
    if interrupted: raise RunInterrupted(run_dir, interrupted)
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
# ## Listing runs, resuming sweeps
#
# `list_runs` reads every `metrics.json`. A record still saying `running` whose runner process is gone
# (on this host) is listed as `interrupted`. A sweep resumes: a combination already recorded `ok` with the
# same effective parameters at the same git commit, with a clean tree then and now, is skipped
# (`--force` runs it again). `default_run` picks the latest `ok` run made with a notebook's default
# parameters, the one a site built from runs shows (never a quick `-p steps 20` run).

# %%
#| export
def _alive(pid: Any) -> bool:
    try: os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError): return False
    except PermissionError: return True
    return True

def list_runs(runs_dir: str | Path = "runs", notebook: str | None = None) -> list[dict[str, Any]]:
    "Every recorded run under `runs_dir` (optionally of one notebook), oldest first."
    rows = []
    for f in sorted(Path(runs_dir).glob("*/*/metrics.json")):
        if notebook and f.parent.parent.name != Path(notebook).stem: continue
        try: r = {**json.loads(f.read_text()), "path": str(f.parent)}
        except json.JSONDecodeError: continue  # a run still being written
        if r.get("status") == "running" and r.get("host") == platform.node() and not _alive(r.get("pid")):
            r.update(status="interrupted", error="the runner ended without recording a result")
        rows.append(r)
    return sorted(rows, key=lambda r: (r.get("started_at", ""), r["path"]))

def _same(a: Any, b: Any) -> bool:
    return json.dumps(to_jsonable(a), sort_keys=True) == json.dumps(to_jsonable(b), sort_keys=True)

def completed_run(runs_dir: str | Path, # where runs are recorded
                  notebook: str | Path, # the notebook (its file name picks the runs)
                  parameters: dict[str, Any], # effective parameters of the planned run
                  env: dict[str, Any], # `environment_info` now
                 ) -> Path | None: # the latest matching run directory, or None
    "A run recorded `ok` with these `parameters` at the clean git commit of `env` (None when the tree is dirty)."
    if not env.get("git_commit") or env.get("git_dirty"): return None  # nothing identifies the code
    for r in reversed(list_runs(runs_dir, Path(notebook).stem)):
        if (r.get("status") == "ok" and r.get("git_commit") == env["git_commit"] and not r.get("git_dirty")
                and _same(r.get("parameters"), parameters)):
            return Path(r["path"])
    return None

def default_run(runs_dir: str | Path, # where runs are recorded
                notebook: str | Path, # the .ipynb whose parameters cell gives the defaults
               ) -> Path | None: # the run directory (executed notebook + metrics.json), or None
    "The latest `ok` run of `notebook` whose parameters equal the notebook's current defaults."
    defaults = effective_parameters(read_parameters(notebook), {})
    for r in reversed(list_runs(runs_dir, Path(notebook).stem)):
        if r.get("status") == "ok" and _same(r.get("parameters"), defaults): return Path(r["path"])
    return None

def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

def _verdicts(metrics: dict[str, Any]) -> list[str]:
    "'claims: 2 supported, 1 inconclusive' for a run that recorded claim records, else nothing."
    claims = metrics.get("claims")
    if not isinstance(claims, list) or not claims: return []
    counts = {}
    for c in claims: counts[c.get("verdict", "?")] = counts.get(c.get("verdict", "?"), 0) + 1
    return ["claims: " + ", ".join(f"{n} {v}" for v, n in counts.items())]

def format_runs(rows: list[dict[str, Any]], max_metrics: int = 3) -> str:
    "A plain-text table of runs: notebook, run id, status, wall time, overrides, the claims' verdicts and the first scalar metrics."
    if not rows: return "no runs recorded"
    table = [("notebook", "run", "status", "wall s", "overrides", "metrics")]
    for r in rows:
        metrics = r.get("metrics", {})
        scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        table.append((Path(r["notebook"]).stem, r["run_id"], r["status"], f"{r.get('wall_time_s') or 0:.1f}",
                      " ".join(f"{k}={_short(v)}" for k, v in r.get("overrides", {}).items()) or "-",
                      " ".join(_verdicts(metrics) + [f"{k}={_short(v)}" for k, v in scalars[:max_metrics]]) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


# %%
if demo:
    out = format_runs(list_runs(tmp / "runs"))
    print(out)
    assert "toy" in out and "steps=3" in out and "result=0.0009" in out
    test_eq(format_runs([]), "no runs recorded")
    row = {"notebook": "p.ipynb", "run_id": "r", "status": "ok", "wall_time_s": 1.0, "overrides": {},
           "metrics": {"claims": [{"verdict": "supported"}, {"verdict": "inconclusive"}, {"verdict": "supported"}], "x": 0.5}}
    assert "claims: 2 supported, 1 inconclusive x=0.5" in format_runs([row])
    test_eq(default_run(tmp / "runs", tmp / "toy.ipynb"), None)  # only a steps=3 run so far
    d0 = run_notebook(tmp / "toy.ipynb", {"steps": 10}, runs_dir=tmp / "runs", progress=False)  # = the defaults
    test_eq(default_run(tmp / "runs", tmp / "toy.ipynb"), d0)
    def fake(i, status, commit, dirty=False, steps=3):  # hand-made records: which one may a sweep skip?
        f = tmp / "fake" / "toy" / f"2026010{i}-000000-x" / "metrics.json"; f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"notebook": "toy.ipynb", "run_id": f.parent.name, "started_at": f"2026-01-0{i}",
                                 "status": status, "git_commit": commit, "git_dirty": dirty, "host": platform.node(), "pid": None,
                                 "parameters": {"steps": steps, "lr": 3e-4, "name": "x", "quick": False}}))
        return f.parent
    fake(1, "ok", "abc"); want = fake(2, "ok", "abc"); fake(3, "failed", "abc"); fake(4, "ok", "abc", dirty=True)
    fake(5, "ok", "def"); fake(6, "ok", "abc", steps=4); fake(7, "running", "abc")
    planned = effective_parameters(spec, {"steps": 3})
    test_eq(completed_run(tmp / "fake", "toy.ipynb", planned, {"git_commit": "abc", "git_dirty": False}), want)
    test_eq(completed_run(tmp / "fake", "toy.ipynb", planned, {"git_commit": "abc", "git_dirty": True}), None)
    test_eq(completed_run(tmp / "fake", "toy.ipynb", {**planned, "lr": 1e-3}, {"git_commit": "abc", "git_dirty": False}), None)
    test_eq(list_runs(tmp / "fake")[-1]["status"], "interrupted")  # `running`, but no runner process (pid missing)


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
                   help="set a parameter to VALUE, as written (a comma is just a character)")
    r.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="run once per value (\\, is a literal comma); several sweeps run their cartesian product")
    r.add_argument("--runs-dir", default=os.environ.get("MOEBOOK_RUNS_DIR", "runs"), help="where runs are recorded (default: runs)")
    r.add_argument("--shard", default="0/1", help="run only combination i, i+n, ... of a sweep (i/n)")
    r.add_argument("--force", action="store_true", help="run combinations already recorded ok at this commit again")
    r.add_argument("--no-progress", action="store_true", help="hide papermill's progress bar")
    r.add_argument("--notebook-progress", action="store_true",
                   help="keep the notebook's own progress bars (off by default: they would fill the executed notebook)")
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
        plans += [(nb, spec, combo) for combo in expand_sweep(spec, a.param, a.sweep)]
    plans = plans[shard[0]::shard[1]]
    failed = 0
    for i, (nb, spec, combo) in enumerate(plans, 1):
        desc = " ".join(f"{k}={v}" for k, v in combo.items()) or "defaults"
        env = environment_info(Path(nb).resolve().parent)
        if not a.force and (done := completed_run(a.runs_dir, nb, effective_parameters(spec, combo), env)):
            print(f"[{i}/{len(plans)}] {nb} ({desc}): skipped, recorded ok at this commit in {done} (--force runs it again)", flush=True)
            continue
        print(f"[{i}/{len(plans)}] {nb} ({desc})", flush=True)
        try: d = run_notebook(nb, combo, runs_dir=a.runs_dir, progress=not a.no_progress, quiet=not a.notebook_progress)
        except RunInterrupted as e:
            print(f"  -> interrupted ({e.signame}); recorded in {e.run_dir}", file=sys.stderr, flush=True)
            return 128 + (signal.SIGTERM if e.signame == "SIGTERM" else signal.SIGINT)
        m = json.loads((d / "metrics.json").read_text())
        print(f"  -> {m['status']} in {m['wall_time_s']:.1f}s: {d}" + (f"\n  error: {m['error']}" if m["error"] else ""), flush=True)
        failed += m["status"] != "ok"
    return 1 if failed else 0

def main(argv: Sequence[str] | None = None) -> int:
    "Entry point of the `moebook` console script."
    # nbformat's validator imports jsonschema, which imports its optional IRI checker `rfc3987_syntax` when it is
    # installed (jupyter-events installs it): it compiles ~40 grammars, 2.5 s of every command that reads a notebook.
    # Notebook schemas have no IRI formats, so this process goes without it (a None entry makes the import fail).
    sys.modules.setdefault("rfc3987_syntax", None)
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
    test_eq(main(["run", str(tmp / "toy.ipynb"), "--sweep", "steps=1,x", "--runs-dir", str(tmp / "cli")]), 2)
    assert not (tmp / "cli").exists()
    test_eq(main(["run", str(tmp / "toy.ipynb"), "--sweep", "steps=1,2", "--shard", "1/2", "--no-progress", "--runs-dir", str(tmp / "cli")]), 0)
    test_eq([r["overrides"] for r in list_runs(tmp / "cli")], [{"steps": 2}])
    shutil.rmtree(tmp)
