# %% [markdown]
# # Website builder
#
# > `make site`: nbdev-processed notebooks rendered by Quarto, or a plainly labelled nbconvert preview where Quarto is missing.

# %% [markdown]
# The site is configured by the top-level `_quarto.yml`. Building it takes three steps:
#
# 1. choose the notebook versions to render: the ones in `nbs/` (committed with their outputs), or with
#    `--from-runs`, each notebook's latest successful `moebook run`;
# 2. process them the way `nbdev_proc_nbs` does (directives applied, `show_doc` cells added for exported
#    symbols, hidden cells dropped) into `_proc/` beside the output folder (so two builds with different
#    outputs never share it), with a copy of `_quarto.yml` and `nbs/styles.css`;
#    pages rendered from a run get a line saying which run, with which parameters and how long it took;
# 3. `quarto render _proc` when `quarto` is on `PATH`. Otherwise the same processed notebooks are converted
#    with `nbconvert`: one page per notebook, figures embedded, math typeset by a local copy of MathJax,
#    the sidebar of `_quarto.yml`, and a banner on every page saying that it is the fallback preview.
#    The preview honours what Quarto would: the front matter becomes the page's title and description,
#    and the cell options `echo`, `output` (including `asis`) and `include` are applied.
#
# We drive nbdev's processors from Python instead of calling `nbdev_proc_nbs`, because that command also
# tries to install Quarto with `sudo` and re-installs the project.

# %%
#| default_exp site

# %%
#| export
from __future__ import annotations
import ast, concurrent.futures as cf, contextlib, copy, gc, html, importlib, json, multiprocessing, os, posixpath, re, shutil, subprocess
from pathlib import Path
from typing import Iterable

import nbformat
import yaml

# %%
import io, tempfile
from fastcore.test import test_eq, test_fail

# %% tags=["parameters"]
demo: bool = True  # run the small demonstrations in this notebook


# %% [markdown]
# ## Finding the project and its pages

# %%
#| export
def project_root(start: str | Path | None = None) -> Path:
    "The nearest folder at or above `start` (default: cwd) holding both `_quarto.yml` and `settings.ini`."
    p = Path(start or Path.cwd()).resolve()
    for d in (p, *p.parents):
        if (d / "_quarto.yml").exists() and (d / "settings.ini").exists(): return d
    raise FileNotFoundError(f"no moebook project (_quarto.yml + settings.ini) at or above {p}")

def sidebar_entries(quarto_yml: str | Path) -> list[dict]:
    "Flatten `website.sidebar.contents` of `_quarto.yml` into `{'href', 'text', 'section'}` entries, in order."
    cfg = yaml.safe_load(Path(quarto_yml).read_text())
    side = cfg.get("website", {}).get("sidebar", {})
    if isinstance(side, list): side = side[0]
    out = []
    def walk(items, section):
        for it in items or []:
            if isinstance(it, str): out.append({"href": it, "text": None, "section": section})
            elif "section" in it: walk(it.get("contents"), it["section"])
            elif "href" in it: out.append({"href": it["href"], "text": it.get("text"), "section": section})
    walk(side.get("contents"), None)
    return out

def default_runs(runs_dir: str | Path, # where `moebook run` recorded its runs
                 notebooks: Iterable[Path], # the source notebooks, whose parameters cells give the defaults
                ) -> dict[str, Path]: # notebook file name -> executed notebook of its latest default run
    "The executed notebook of each notebook's latest `ok` run at its default parameters (never a smoke run)."
    from moebook.runner import default_run
    out = {}
    for nb in notebooks:
        run = default_run(runs_dir, nb)
        if run is not None and (run / nb.name).exists(): out[nb.name] = run / nb.name
    return out


# %%
if demo:
    root = project_root()
    entries = sidebar_entries(root / "_quarto.yml")
    test_eq(entries[0], {"href": "index.ipynb", "text": "Home", "section": None})
    assert all((root / "nbs" / e["href"]).exists() for e in entries), "every sidebar entry is a notebook in nbs/"

# %% [markdown]
# ## Processing notebooks with nbdev

# %% [markdown]
# nbdev turns a notebook's `# Title` and `> summary` into front matter, but keeps only the first line of a
# summary that spans several `>` lines (and drops the rest): `summary` reads all of it, and the processed
# notebook's description is set to that.

# %%
#| export
FRONT_MATTER = re.compile(r"\s*---[ \t]*\n(.*?)\n---\s*$", re.S)  # a raw cell holding YAML front matter

def summary(nb) -> str | None:
    "The `> summary` under a notebook's `# Title`, all its lines joined, or None."
    for c in nb.cells:
        if c.cell_type == "markdown" and re.search(r"^#\s+\S", c.source, re.M):  # nbdev's title cell
            m = re.search(r"^>.*(?:\n>.*)*", c.source, re.M)
            return " ".join(l[1:].strip() for l in m[0].splitlines()) if m else None
    return None

def _set_description(nb, description: str):
    "Put `description` into the front matter cell nbdev's processing left at the top of `nb`."
    c = nb.cells[0] if nb.cells else None
    if c is None or c.cell_type != "raw" or not (m := FRONT_MATTER.match(c.source)): return
    fm = yaml.safe_load(m[1]) or {}
    if "description" in fm: c.source = "---\n" + yaml.dump({**fm, "description": description}) + "\n---\n\n"


# %%
if demo:
    title_cell = nbformat.v4.new_markdown_cell("# Title\n\n> A summary that\n> goes on.\n\n> Another quote.")
    test_eq(summary(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("> not under a title"), title_cell])),
            "A summary that goes on.")
    test_eq(summary(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Only a title")])), None)


# %%
#| export
def process_notebooks(sources: list[Path], # notebooks to process
                      dest: Path, # folder that receives the processed notebooks
                      root: Path, # project root (nbdev reads `settings.ini` there)
                     ) -> list[Path]:
    """Apply nbdev's documentation processors (what `nbdev_proc_nbs` does) to `sources`, writing into `dest`.

    nbdev runs each notebook's export and `show_doc` cells to do it. They run in a spawned child process, so what
    they define or register (a `transformers` Auto class, torch settings, seeds) never reaches the caller's process."""
    dest.mkdir(parents=True, exist_ok=True)
    # by name, from the package: a function defined in a notebook cannot be imported by the spawned process
    work = importlib.import_module("moebook.site")._process_notebooks_here
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(work, sources, dest, root).result()

def _process_notebooks_here(sources: list[Path], dest: Path, root: Path) -> list[Path]:
    "`process_notebooks`' work, in the process it runs in (the child: it sets the environment and cwd for good)."
    from execnb.nbio import read_nb, write_nb
    from nbdev.processors import FilterDefaults
    os.environ["IN_TEST"] = "1"  # as nbdev does while processing: notebooks may check it
    os.chdir(root / "nbs")  # show_doc cells run where the notebook lives
    out = []
    for src in sources:
        nb = read_nb(src)
        description = summary(nb)
        FilterDefaults()(nb)
        if description: _set_description(nb, description)
        for c in nb.cells: c.pop("has_sd", None)  # nbdev's private mark, not nbformat: readers would log an error
        write_nb(nb, dest / src.name)
        out.append(dest / src.name)
    # At exit each of nbdev's IPython shells (one per notebook) runs a full garbage collection over everything the
    # cells imported (torch, transformers): about 0.5 s each. Frozen objects are skipped by those collections.
    gc.freeze()
    return out


# %%
if demo:
    with tempfile.TemporaryDirectory() as d:
        (p,) = process_notebooks([project_root() / "nbs" / "index.ipynb"], Path(d), project_root())
        processed = nbformat.read(p, as_version=4)
        nbformat.validate(processed)  # valid nbformat: Quarto and nbconvert read it without complaint
        front = yaml.safe_load(FRONT_MATTER.match(processed.cells[0].source)[1])
        test_eq(front["title"], "moebook")
        test_eq(front["description"], summary(nbformat.read(project_root() / "nbs" / "index.ipynb", as_version=4)))
        assert front["description"].endswith("one website.")


# %% [markdown]
# ## What the runs produced
#
# `moebook run` leaves a `metrics.json` beside each executed notebook (status, parameters, wall time,
# commit). When the site is built from runs, each page says which run it shows and how long that run
# took, and the home page gets a table of every notebook's run: what `make run` produced, step by step.
# The lines are markdown cells added to the processed notebooks, so Quarto and the preview both show them.

# %%
#| export
def run_record(executed: str | Path) -> dict | None:
    "The `metrics.json` that `moebook run` wrote beside the executed notebook `executed`, if there is one."
    executed = Path(executed)
    f = executed.parent / "metrics.json"
    if not f.exists(): return None
    rec = json.loads(f.read_text())
    return rec if rec.get("notebook") == executed.name else None

def duration(seconds: float) -> str:
    "`seconds` as a short human duration: '42 s', '3.5 min', '1.2 h'."
    if seconds < 90: return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

def _overrides(rec: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted((rec.get("overrides") or {}).items())) or "defaults"

def run_note(rec: dict) -> str:
    "One markdown line for a page rendered from a run: which run, its parameters, status and wall time."
    commit = rec.get("git_commit")
    where = f", commit `{commit[:7]}`" + (" with local changes" if rec.get("git_dirty") else "") if commit else ""
    return (f"*Outputs of `moebook run` {rec['run_id']} (parameters: {_overrides(rec)}): {rec['status']} in "
            f"{duration(rec['wall_time_s'])}, started {rec['started_at'].replace('T', ' ')}{where}.*")

def runs_table(records: dict[str, dict]) -> str:
    "Markdown table of the run shown on each page (notebook file name -> record), with the total wall time."
    rows = ["| notebook | run | parameters | status | wall time |", "|---|---|---|---|---|"]
    for name, r in records.items():
        rows.append(f"| [{Path(name).stem}]({name}) | {r['run_id']} | {_overrides(r)} | {r['status']} | {duration(r['wall_time_s'])} |")
    total = sum(r["wall_time_s"] for r in records.values())
    return "\n".join(rows) + f"\n\n{len(records)} runs, {duration(total)} of notebook execution in all."


# %%
if demo:
    test_eq([duration(s) for s in (4.2, 89, 210, 7200)], ["4 s", "89 s", "3.5 min", "2.0 h"])
    rec = {"notebook": "a.ipynb", "run_id": "20260101-120000-abc", "status": "ok", "wall_time_s": 210.0,
           "started_at": "2026-01-01T12:00:00", "overrides": {"steps": 20}, "git_commit": "0123456789", "git_dirty": False}
    test_eq(run_note(rec), "*Outputs of `moebook run` 20260101-120000-abc (parameters: `steps=20`): ok in 3.5 min, "
                           "started 2026-01-01 12:00:00, commit `0123456`.*")
    table = runs_table({"a.ipynb": rec, "b.ipynb": {**rec, "overrides": {}, "wall_time_s": 30.0}})
    assert "| [b](b.ipynb) | 20260101-120000-abc | defaults | ok | 30 s |" in table and table.endswith("4.0 min of notebook execution in all.")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "metrics.json").write_text(json.dumps(rec))
        test_eq(run_record(Path(d) / "a.ipynb"), rec)
        test_eq(run_record(Path(d) / "other.ipynb"), None)  # a record of another notebook is not this one's


# %%
#| export
def add_run_notes(processed: list[Path], # processed notebooks, rewritten in place
                  records: dict[str, dict], # notebook file name -> run record of the version processed
                 ):
    "Add `run_note` under each page's front matter, and the `runs_table` at the end of `index.ipynb`."
    for p in processed:
        rec = records.get(p.name)
        if rec is None and not (p.name == "index.ipynb" and records): continue
        nb = nbformat.read(p, as_version=4)
        if rec is not None:
            at = 1 if nb.cells and nb.cells[0].cell_type == "raw" and nb.cells[0].source.startswith("---") else 0
            nb.cells.insert(at, nbformat.v4.new_markdown_cell(run_note(rec)))
        if p.name == "index.ipynb":
            nb.cells.append(nbformat.v4.new_markdown_cell("## What `make run` produced\n\n" + runs_table(records)))
        nbformat.write(nb, p)


# %% [markdown]
# ## Reading a page as Quarto would
#
# Code cells carry their options in leading `#|` lines: Quarto's YAML form (`#| echo: false`) and nbdev's
# flags (`#| hide`). nbdev's processing already applied its own and left Quarto's, such as the
# `echo: false` + `output: asis` pair of every `show_doc` cell. The preview applies the ones that decide
# what a reader sees:
#
# | option | effect |
# |---|---|
# | `include: false`, `hide` | the cell is left out |
# | `echo: false` | the source is hidden, the outputs shown |
# | `output: false` | the outputs are hidden |
# | `output: asis` | printed text and markdown outputs are rendered as markdown |
#
# and, like a site built for readers, it leaves out stderr (progress bars, library warnings, which also
# carry machine paths) and the value returned by a trailing `record_metrics(...)` (it is for the run's
# `metrics.json`, not for readers).

# %%
#| export
def cell_options(source: str) -> tuple[dict, str]:
    "The `#|` options at the top of a code cell (`#| echo: false`, `#| hide`) and the source without them."
    lines = source.splitlines()
    n = next((i for i, l in enumerate(lines) if not l.lstrip().startswith("#|")), len(lines))
    opts = {}
    for line in lines[:n]:
        text = line.lstrip()[2:].strip()
        with contextlib.suppress(yaml.YAMLError):
            if isinstance(parsed := yaml.safe_load(text), dict): opts.update(parsed); continue
        if text: opts[text.split()[0]] = " ".join(text.split()[1:]) or True  # nbdev's `#| name [args]`
    return opts, "\n".join(lines[n:])


# %%
if demo:
    test_eq(cell_options("#| echo: false\n#| output: asis\nshow_doc(f)"), ({"echo": False, "output": "asis"}, "show_doc(f)"))
    test_eq(cell_options("#| hide\n#| export\nx = 1\n#| not an option here"), ({"hide": True, "export": True}, "x = 1\n#| not an option here"))
    test_eq(cell_options("#| default_exp site"), ({"default_exp": "site"}, ""))
    test_eq(cell_options("x = 1"), ({}, "x = 1"))

# %%
#| export
SILENT_CALLS = ("record_metrics",)  # called for their effect on the run record; their return value is not for readers

def ends_with_silent_call(code: str) -> bool:
    "Whether the last statement of `code` is a bare call of a function named in `SILENT_CALLS`."
    try: body = ast.parse(code).body
    except SyntaxError: return False  # IPython magics and shell escapes are not Python
    if not body or not isinstance(body[-1], ast.Expr) or not isinstance(call := body[-1].value, ast.Call): return False
    return getattr(call.func, "id", getattr(call.func, "attr", None)) in SILENT_CALLS


# %%
if demo:
    assert ends_with_silent_call("x = 1\nrecord_metrics(loss=x,\n   acc=2)")
    assert ends_with_silent_call("core.record_metrics(a=1)")
    assert not ends_with_silent_call("m = record_metrics(a=1)\nm")  # the user asked to see it
    assert not ends_with_silent_call("record_metrics(a=1)\nprint(2)")
    assert not ends_with_silent_call("%time record_metrics(a=1)")


# %%
#| export
def _merged_streams(outputs: list) -> list:
    "Consecutive outputs of the same stream joined (kernels split printed text at arbitrary points)."
    out = []
    for o in outputs:
        if o.output_type == "stream" and out and out[-1].output_type == "stream" and out[-1].name == o.name:
            out[-1] = nbformat.v4.new_output("stream", name=o.name, text=out[-1].text + o.text)
        else: out.append(o)
    return out

def _asis(o):
    "An output of an `output: asis` cell: printed text and text outputs become markdown; figures stay."
    if o.output_type == "stream": text = o.text
    elif o.output_type in ("execute_result", "display_data") and set(o.data) <= {"text/markdown", "text/plain"}:
        text = o.data.get("text/markdown", o.data.get("text/plain", ""))
    else: return o
    return nbformat.v4.new_output("display_data", data={"text/markdown": text})

def quarto_view(nb: nbformat.NotebookNode) -> tuple[dict, nbformat.NotebookNode]:
    "The front matter of `nb` (a leading `---` raw cell) and a copy of `nb` with the cells as Quarto shows them."
    nb, front = copy.deepcopy(nb), {}
    if nb.cells and nb.cells[0].cell_type == "raw" and (m := FRONT_MATTER.match(nb.cells[0].source)):
        front, nb.cells = yaml.safe_load(m[1]) or {}, nb.cells[1:]
    cells = []
    for c in nb.cells:
        if c.cell_type != "code": cells.append(c); continue
        opts, c.source = cell_options(c.source)
        if opts.get("include") is False or opts.get("hide"): continue
        if opts.get("echo") is False: c.metadata.setdefault("transient", {})["remove_source"] = True
        outs = _merged_streams([o for o in c.outputs if not (o.output_type == "stream" and o.name == "stderr")])
        if ends_with_silent_call(c.source): outs = [o for o in outs if o.output_type != "execute_result"]
        if opts.get("output") is False: outs = []
        elif opts.get("output") == "asis": outs = [_asis(o) for o in outs]
        c.outputs = outs
        cells.append(c)
    nb.cells = cells
    return front, nb


# %%
if demo:
    def code(src, *outs):
        c = nbformat.v4.new_code_cell(src); c.outputs = list(outs); return c
    out, md = nbformat.v4.new_output, lambda t: nbformat.v4.new_output("display_data", data={"text/markdown": t})
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_raw_cell("---\ndescription: A `small` page\ntitle: Demo\n\n---\n\n"),
        code("#| echo: false\n#| output: asis\nshow_doc(f)", out("execute_result", data={"text/markdown": "### f", "text/plain": "<f>"})),
        code("#| include: false\nsecret = 1"),
        code("#| hide\nsetup()"),
        code("print('| a |\\n|---|')\nprint('| 1 |')", out("stream", name="stdout", text="| a |\n|---|\n"),
             out("stream", name="stderr", text="100%|####| 10/10\n"), out("stream", name="stdout", text="| 1 |\n")),
        code("#| output: asis\nprint('| a |\\n|---|')", out("stream", name="stdout", text="| a |\n"), out("stream", name="stdout", text="|---|\n")),
        code("#| output: false\nx", out("execute_result", data={"text/plain": "1"})),
        code("record_metrics(loss=0.5)", out("stream", name="stdout", text="saved\n"), out("execute_result", data={"text/plain": "{'loss': 0.5}"})),
        code("y = 2\ny", out("execute_result", data={"text/plain": "2"})),
    ])
    front, view = quarto_view(nb)
    test_eq(front, {"description": "A `small` page", "title": "Demo"})
    test_eq(len(nb.cells), 9)  # the input is not modified
    test_eq([c.source for c in view.cells], ["show_doc(f)", "print('| a |\\n|---|')\nprint('| 1 |')", "print('| a |\\n|---|')", "x",
                                             "record_metrics(loss=0.5)", "y = 2\ny"])
    test_eq(view.cells[0].metadata["transient"]["remove_source"], True)
    test_eq([o.data for o in view.cells[0].outputs], [{"text/markdown": "### f"}])
    test_eq([(o.name, o.text) for o in view.cells[1].outputs], [("stdout", "| a |\n|---|\n| 1 |\n")])  # stderr dropped
    test_eq([o.data for o in view.cells[2].outputs], [{"text/markdown": "| a |\n|---|\n"}])
    test_eq(view.cells[3].outputs, [])
    test_eq([o.output_type for o in view.cells[4].outputs], ["stream"])
    test_eq([o.output_type for o in view.cells[5].outputs], ["execute_result"])
    test_eq(quarto_view(nbformat.v4.new_notebook(cells=[nbformat.v4.new_raw_cell("just text")]))[0], {})

# %% [markdown]
# ## The fallback preview
#
# Each page is the `quarto_view` of a processed notebook converted by nbconvert's `lab` template, inside a
# page frame: the sidebar of `_quarto.yml`, the banner, and a header with the front matter's title and
# description. Math is typeset in the browser by MathJax 2.7 copied into the site from the
# `jupyter-server-mathjax` package (no CDN: the preview works offline), with the STIX web fonts that
# package ships.

# %%
#| export
FALLBACK_BANNER = ("Static preview built with nbconvert because Quarto is not installed here. "
                   "Run <code>make site</code> where <code>quarto</code> is on PATH for the real website.")

MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
# The package ships only the STIX web fonts: tell MathJax to use them (added to nbconvert's MathJax config).
_MATHJAX_FONTS = ('<script type="text/x-mathjax-config">MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], '
                  'webFont: "STIX-Web", imageFont: null, preferredFont: null}});</script>')

def mathjax_dir() -> Path:
    "The MathJax 2.7 files installed by the `jupyter-server-mathjax` package (copied into the preview)."
    try: import jupyter_server_mathjax
    except ImportError: raise ModuleNotFoundError(
        "the site preview typesets math with a local MathJax from the `jupyter-server-mathjax` package, which is "
        "not installed: `pip install jupyter-server-mathjax` (it is a moebook dependency)") from None
    return Path(jupyter_server_mathjax.__file__).parent / "static"


# %%
if demo: assert (mathjax_dir() / "MathJax.js").exists() and (mathjax_dir() / "config" / "Safe.js").exists()

# %%
#| export
_CSS = """
body { margin: 0; background: #fff; }
.mb-side { position: fixed; top: 0; left: 0; bottom: 0; width: 250px; box-sizing: border-box; overflow-y: auto;
           padding: 1.2em 1em; background: #f6f7f9; border-right: 1px solid #e1e4e8; font: 14px/1.5 system-ui, sans-serif; }
.mb-side .mb-site { font-size: 1.35em; font-weight: 700; margin: 0 0 .8em; }
.mb-side .mb-site a { color: #222; padding: 0; }
.mb-side .sec { margin: 1.1em 0 .2em; font-size: .8em; font-weight: 600; color: #6a737d; text-transform: uppercase; letter-spacing: .04em; }
.mb-side a { display: block; padding: 3px 6px; border-radius: 4px; color: #1a5fb4; text-decoration: none; }
.mb-side a:hover { background: #e8ecf1; }
.mb-side a.active { font-weight: 600; color: #111; background: #e1e7ef; }
.mb-main { margin-left: 250px; padding: 0 2.5em 4em; max-width: 1000px; }
.mb-banner { margin: 1.2em 0 0; padding: .5em .9em; background: #fff8e1; border: 1px solid #f0d48a;
             border-radius: 4px; color: #5c4a12; font: 13px/1.4 system-ui, sans-serif; }
.mb-header { margin: 1.6em 0 1em; padding-bottom: .8em; border-bottom: 1px solid #e1e4e8; }
.mb-header h1 { margin: 0 0 .3em; font: 700 2.1em/1.2 system-ui, sans-serif; color: #111; }
.mb-header .mb-description { margin: 0; font: 1.1em/1.5 system-ui, sans-serif; color: #555; }
.mb-main .jp-Cell { padding-left: 0; padding-right: 0; }
.mb-main .jp-RenderedHTMLCommon table { margin: .6em 0 1em; }
.mb-main .jp-RenderedHTMLCommon pre { margin: .4em 0 1em; padding: .6em .8em; background: #f6f8fa; border-radius: 4px; overflow-x: auto;
                                      font: 13px/1.45 SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.mb-main .jp-RenderedHTMLCommon pre code { background: none; padding: 0; font: inherit; }
.mb-main .jp-OutputArea-output pre { font: 13px/1.45 SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
"""

_WRAP_CSS = ".jp-InputArea-editor pre { white-space: pre-wrap; overflow-wrap: anywhere; }"  # `code-overflow: wrap`

def _title(nb: nbformat.NotebookNode, fallback: str) -> str:
    "A notebook's title: its front matter's, else its first `# heading`, else `fallback`."
    front, _ = quarto_view(nbformat.v4.new_notebook(cells=nb.cells[:1]))
    if front.get("title"): return str(front["title"])
    for c in nb.cells:
        if c.cell_type == "markdown" and (m := re.search(r"^#\s+(.+)$", c.source, re.M)): return m.group(1).strip()
    return fallback

def _page_name(href: str) -> str:
    return re.sub(r"\.(ipynb|qmd|md)$", ".html", href)

def _header(front: dict) -> str:
    "The page header Quarto makes from the front matter: the title as `h1`, the description (markdown) below it."
    if not front.get("title"): return ""  # the page's own `# heading` is its title
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    desc = front.get("description")
    desc = f'<p class="mb-description">{re.sub(r"^<p>|</p>$", "", markdown2html_mistune(str(desc)).strip())}</p>' if desc else ""
    return f'<header class="mb-header"><h1 class="title">{html.escape(str(front["title"]))}</h1>{desc}</header>'


# %%
#| export
def render_fallback(processed: list[Path], # processed notebooks
                    quarto_yml: Path, # site configuration (for title, sidebar and css)
                    out: Path, # output folder
                   ) -> list[Path]:
    "Render `processed` notebooks to `out/*.html` with nbconvert, as Quarto would show them, with the sidebar and a banner."
    from nbconvert import HTMLExporter
    mathjax = mathjax_dir()
    cfg = yaml.safe_load(quarto_yml.read_text())
    site_title = cfg.get("website", {}).get("title", "site")
    fmt = cfg.get("format", {}).get("html", {}) or {}
    css = [fmt["css"]] if isinstance(fmt.get("css"), str) else fmt.get("css") or []
    css = [f for f in css if (quarto_yml.parent / f).exists()]  # as Quarto: relative to the config
    wrap = fmt.get("code-overflow") == "wrap"
    nbs = {p.name: nbformat.read(p, as_version=4) for p in processed}
    entries = [e for e in sidebar_entries(quarto_yml) if e["href"] in nbs]
    entries += [{"href": n, "text": None, "section": "Other"} for n in sorted(nbs) if n not in {e["href"] for e in entries}]
    exporter = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True, mathjax_url=MATHJAX_URL)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(mathjax, out / "mathjax", dirs_exist_ok=True)
    for f in css: shutil.copy2(quarto_yml.parent / f, out / f)
    pages = []
    for name, nb in nbs.items():
        front, view = quarto_view(nb)
        body, _ = exporter.from_notebook_node(view)
        body = re.sub(r'href="([^"#:]+?)\.(ipynb|qmd)(#[^"]*)?"', lambda m: f'href="{m[1]}.html{m[3] or ""}"', body)
        nav, sec = [f'<div class="mb-site"><a href="index.html">{html.escape(site_title)}</a></div>'], None
        for e in entries:
            if e["section"] != sec and e["section"]: nav.append(f'<div class="sec">{html.escape(e["section"])}</div>')
            sec = e["section"]
            text = e["text"] or _title(nbs[e["href"]], e["href"])
            cls = ' class="active"' if e["href"] == name else ""
            nav.append(f'<a href="{_page_name(e["href"])}"{cls}>{html.escape(text)}</a>')
        head = (f"<style>{_CSS}{_WRAP_CSS if wrap else ''}</style>" + "".join(f'<link rel="stylesheet" href="{html.escape(f)}">' for f in css)
                + _MATHJAX_FONTS + f"<title>{html.escape(_title(nb, name))} – {html.escape(site_title)}</title>")
        body = re.sub(r"<title>.*?</title>", "", body, count=1, flags=re.S).replace("</head>", head + "</head>", 1)
        body = re.sub(r"(<body[^>]*>)", lambda m: m[1] + '<nav class="mb-side">' + "\n".join(nav) + '</nav><div class="mb-main">'
                      + f'<div class="mb-banner">{FALLBACK_BANNER}</div>' + _header(front), body, count=1)
        body = body.replace("</body>", "</div></body>", 1)
        page = out / _page_name(name)
        page.write_text(body)
        pages.append(page)
    return pages


# %%
if demo:
    with tempfile.TemporaryDirectory() as d:
        nbformat.write(nb, Path(d) / "demo.ipynb")
        (page,) = render_fallback([Path(d) / "demo.ipynb"], project_root() / "_quarto.yml", Path(d) / "out")
        text = page.read_text()
        assert '<h1 class="title">Demo</h1><p class="mb-description">A <code>small</code> page</p>' in text
        assert "<title>Demo – moebook</title>" in text and "title: Demo" not in text and "#|" not in text
        assert "10/10" not in text and "{'loss': 0.5}" not in text and "secret" not in text
        assert text.count("<table>") == 1 and f'src="{MATHJAX_URL}"' in text and (Path(d) / "out" / "mathjax" / "MathJax.js").exists()

# %% [markdown]
# ## The README
#
# `README.md` is generated from `nbs/index.ipynb` (nbdev's `nbdev_readme` needs Quarto, so we render the
# markdown with nbconvert): hidden cells and the parameters cell are left out. The index's relative links
# point at notebooks beside it in `nbs/` (right for the site); the README sits at the repository root, so
# they are resolved against `nbs/` there. A test checks that the committed README is what this function writes.

# %%
#| export
README_HEADER = "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->\n\n"

def _index_markdown(root: Path) -> str:
    "`nbs/index.ipynb` as markdown, without hidden cells and the parameters cell."
    from nbconvert import MarkdownExporter
    nb = nbformat.read(root / "nbs" / "index.ipynb", as_version=4)
    def shown(c):
        if c.cell_type != "code": return True
        return "parameters" not in c.metadata.get("tags", []) and not re.match(r"\s*#\|\s*hide\b", c.source)
    nb.cells = [c for c in nb.cells if shown(c)]
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    return re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"

def links_from_root(markdown: str, folder: str = "nbs") -> str:
    "Relative markdown links and images of a page in `folder`, rewritten to work from the repository root."
    def fix(m):
        target = m[2]
        if re.match(r"[a-zA-Z][\w+.-]*:|/|#", target): return m[0]  # URLs, absolute paths, anchors
        return f"{m[1]}({posixpath.normpath(posixpath.join(folder, target))}{m[3] or ''})"
    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)(\s+\"[^\"]*\")?\)", fix, markdown)

LEDGER_MARKER = "<!-- claim-ledger -->"

def fill_ledger(markdown: str, root: Path) -> str:
    "Replace the claim-ledger marker with the ledger of the committed paper notebooks (`moebook.evidence`)."
    if LEDGER_MARKER not in markdown: return markdown
    from moebook.evidence import readme_ledger
    return markdown.replace(LEDGER_MARKER, readme_ledger(root))

def readme_text(root: str | Path | None = None) -> str:
    "The README markdown rendered from `nbs/index.ipynb`, with the claim ledger filled in."
    root = project_root(root)
    body = links_from_root(fill_ledger(_index_markdown(root), root))
    return README_HEADER + body

def write_readme(root: str | Path | None = None) -> Path:
    "Write `README.md` at the project root from `nbs/index.ipynb`."
    path = project_root(root) / "README.md"
    path.write_text(readme_text(root))
    return path


# %%
if demo:
    test_eq(links_from_root("[MoE core](01_moe.ipynb), ![fig](img/a.png \"A\"), [up](../CONTRIBUTING.md#tests)"),
            "[MoE core](nbs/01_moe.ipynb), ![fig](nbs/img/a.png \"A\"), [up](CONTRIBUTING.md#tests)")
    test_eq(links_from_root("[a](https://x.org/b.ipynb) [b](#quick-start) [c](/abs) [d](mailto:a@b.c)"),
            "[a](https://x.org/b.ipynb) [b](#quick-start) [c](/abs) [d](mailto:a@b.c)")
    text = readme_text()
    assert text.startswith(README_HEADER) and "make run" in text and "show_runs" not in text
    assert "](nbs/01_moe.ipynb)" in text and "](01_moe.ipynb)" not in text


# %% [markdown]
# ## Building the site

# %%
#| export
def build_site(out: str | Path = "_site", # output folder, relative to the project root
               runs_dir: str | Path | None = None, # render each notebook's latest successful run from here
               use_quarto: bool = True, # use `quarto render` when quarto is installed
               root: str | Path | None = None, # project root (default: found from cwd)
               notebooks: list[str] | None = None, # only these notebook file names (default: all in nbs/)
              ) -> Path: # the output folder
    "Process the notebooks and render the website (Quarto, or the nbconvert fallback)."
    root = project_root(root)
    out = (root / out).resolve()
    quarto = shutil.which("quarto") if use_quarto else None
    if not quarto: mathjax_dir()  # the preview needs it: say so before the slow processing
    sources = {p.name: p for p in sorted((root / "nbs").glob("*.ipynb"))}
    if notebooks is not None:
        missing = sorted(set(notebooks) - set(sources))
        if missing: raise FileNotFoundError(f"not in nbs/: {', '.join(missing)}")
        sources = {k: sources[k] for k in notebooks}
    if runs_dir is not None:
        sources.update(default_runs(root / runs_dir, list(sources.values())))
    records = {k: rec for k, p in sources.items() if (rec := run_record(p))}
    proc = out.parent / "_proc"  # `make site`: the project's _proc/, as nbdev has it
    shutil.rmtree(proc, ignore_errors=True)
    processed = process_notebooks(list(sources.values()), proc, root)
    add_run_notes(processed, records)
    for p in processed:
        if p.name != "index.ipynb": continue
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type == "markdown": c.source = fill_ledger(c.source, root)
        nbformat.write(nb, p)
    shutil.copy2(root / "_quarto.yml", proc / "_quarto.yml")
    for extra in ("styles.css",):
        if (root / "nbs" / extra).exists(): shutil.copy2(root / "nbs" / extra, proc / extra)
    shutil.rmtree(out, ignore_errors=True)
    if quarto:
        subprocess.run([quarto, "render", str(proc), "--output-dir", str(out)], check=True)
        print(f"Website rendered by Quarto: {out / 'index.html'}")
    else:
        render_fallback(processed, proc / "_quarto.yml", out)
        print(f"Quarto is not installed: built the nbconvert fallback preview instead: {out / 'index.html'}")
    return out


# %%
if demo:
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()) as said:
        site = build_site(out=Path(d) / "site", use_quarto=False, notebooks=["index.ipynb", "00_core.ipynb"])
        assert said.getvalue().startswith("Quarto is not installed: built the nbconvert fallback preview instead")
        test_eq(sorted(p.name for p in site.glob("*.html")), ["00_core.html", "index.html"])
        test_eq(sorted(p.name for p in (Path(d) / "_proc").glob("*.ipynb")), ["00_core.ipynb", "index.ipynb"])
        page = (site / "index.html").read_text()
        assert "Static preview built with nbconvert" in page and 'href="00_core.html"' in page
        assert '<h1 class="title">moebook</h1>' in page and "What `make run` produced" not in page  # no runs, no run table
