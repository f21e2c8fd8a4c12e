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
#    symbols, hidden cells dropped) into `_proc/`, beside a copy of `_quarto.yml` and `nbs/styles.css`;
# 3. `quarto render _proc` when `quarto` is on `PATH`. Otherwise the same processed notebooks are converted
#    with `nbconvert`: one page per notebook, figures embedded, the sidebar of `_quarto.yml`, and a banner on
#    every page saying that it is the fallback preview.
#
# We drive nbdev's processors from Python instead of calling `nbdev_proc_nbs`, because that command also
# tries to install Quarto with `sudo` and re-installs the project.

# %%
#| default_exp site

# %%
#| export
from __future__ import annotations
import contextlib, html, json, os, re, shutil, subprocess
from pathlib import Path

import nbformat
import yaml

# %%
import tempfile
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

def latest_runs(runs_dir: str | Path) -> dict[str, Path]:
    "Notebook file name -> executed notebook of its most recent successful run under `runs_dir`."
    best = {}
    for f in sorted(Path(runs_dir).glob("*/*/metrics.json")):
        m = json.loads(f.read_text())
        nb = f.parent / m["notebook"]
        if m.get("status") == "ok" and nb.exists(): best[m["notebook"]] = (m["started_at"], nb)
    return {k: v[1] for k, v in best.items()}


# %%
if demo:
    root = project_root()
    entries = sidebar_entries(root / "_quarto.yml")
    test_eq(entries[0], {"href": "index.ipynb", "text": "Home", "section": None})
    assert all((root / "nbs" / e["href"]).exists() for e in entries), "every sidebar entry is a notebook in nbs/"


# %% [markdown]
# ## Processing notebooks with nbdev

# %%
#| export
def process_notebooks(sources: list[Path], # notebooks to process
                      dest: Path, # folder that receives the processed notebooks
                      root: Path, # project root (nbdev reads `settings.ini` there)
                     ) -> list[Path]:
    "Apply nbdev's documentation processors (what `nbdev_proc_nbs` does) to `sources`, writing into `dest`."
    from execnb.nbio import read_nb, write_nb
    from nbdev.processors import FilterDefaults
    dest.mkdir(parents=True, exist_ok=True)
    out, old = [], os.environ.get("IN_TEST")
    os.environ["IN_TEST"] = "1"  # as nbdev does while processing: notebooks may check it
    try:
        with contextlib.chdir(root / "nbs"):  # show_doc cells run where the notebook lives
            for src in sources:
                nb = read_nb(src)
                FilterDefaults()(nb)
                write_nb(nb, dest / src.name)
                out.append(dest / src.name)
    finally:
        if old is None: os.environ.pop("IN_TEST", None)
        else: os.environ["IN_TEST"] = old
    return out


# %% [markdown]
# ## The fallback preview

# %%
#| export
FALLBACK_BANNER = ("Static preview built with nbconvert because Quarto is not installed here. "
                   "Run <code>make site</code> where <code>quarto</code> is on PATH for the real website.")

_CSS = """
body { margin: 0; }
.mb-side { position: fixed; top: 0; left: 0; bottom: 0; width: 240px; overflow-y: auto; padding: 1em;
           background: #f6f7f9; border-right: 1px solid #ddd; font: 14px/1.5 system-ui, sans-serif; }
.mb-side h1 { font-size: 1.3em; margin: 0 0 .6em; } .mb-side h1 a { color: inherit; text-decoration: none; }
.mb-side .sec { margin-top: 1em; font-weight: 600; color: #555; }
.mb-side a { display: block; padding: 2px 0; color: #1a5fb4; text-decoration: none; }
.mb-side a.active { font-weight: 700; }
.mb-main { margin-left: 270px; padding: 0 1em; }
.mb-banner { margin: 1em 0; padding: .6em 1em; background: #fff4d6; border: 1px solid #e0b84c;
             border-radius: 4px; font: 14px/1.4 system-ui, sans-serif; }
"""

def _title(nb: nbformat.NotebookNode, fallback: str) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown" and (m := re.search(r"^#\s+(.+)$", c.source, re.M)): return m.group(1).strip()
    return nb.metadata.get("title", fallback)

def _page_name(href: str) -> str:
    return re.sub(r"\.(ipynb|qmd|md)$", ".html", href)

def render_fallback(processed: list[Path], # processed notebooks
                    quarto_yml: Path, # site configuration (for title and sidebar)
                    out: Path, # output folder
                   ) -> list[Path]:
    "Render `processed` notebooks to `out/*.html` with nbconvert, with the sidebar and a fallback banner."
    from nbconvert import HTMLExporter
    cfg = yaml.safe_load(quarto_yml.read_text())
    site_title = cfg.get("website", {}).get("title", "site")
    nbs = {p.name: nbformat.read(p, as_version=4) for p in processed}
    entries = [e for e in sidebar_entries(quarto_yml) if e["href"] in nbs]
    entries += [{"href": n, "text": None, "section": "Other"} for n in sorted(nbs) if n not in {e["href"] for e in entries}]
    exporter = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True)
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for name, nb in nbs.items():
        body, _ = exporter.from_notebook_node(nb)
        body = re.sub(r'href="([^"#:]+?)\.(ipynb|qmd)(#[^"]*)?"', lambda m: f'href="{m[1]}.html{m[3] or ""}"', body)
        nav, sec = [f'<h1><a href="index.html">{html.escape(site_title)}</a></h1>'], None
        for e in entries:
            if e["section"] != sec and e["section"]: nav.append(f'<div class="sec">{html.escape(e["section"])}</div>')
            sec = e["section"]
            text = e["text"] or _title(nbs[e["href"]], e["href"])
            cls = ' class="active"' if e["href"] == name else ""
            nav.append(f'<a href="{_page_name(e["href"])}"{cls}>{html.escape(text)}</a>')
        head = f"<style>{_CSS}</style><title>{html.escape(_title(nb, name))} – {html.escape(site_title)}</title>"
        body = re.sub(r"<title>.*?</title>", "", body, count=1, flags=re.S).replace("</head>", head + "</head>", 1)
        body = re.sub(r"(<body[^>]*>)", lambda m: m[1] + '<nav class="mb-side">' + "\n".join(nav) + '</nav><div class="mb-main">'
                      + f'<div class="mb-banner">{FALLBACK_BANNER}</div>', body, count=1)
        body = body.replace("</body>", "</div></body>", 1)
        page = out / _page_name(name)
        page.write_text(body)
        pages.append(page)
    return pages


# %% [markdown]
# ## The README
#
# `README.md` is generated from `nbs/index.ipynb` (nbdev's `nbdev_readme` needs Quarto, so we render the
# markdown with nbconvert): hidden cells and the parameters cell are left out. A test checks that the
# committed README is what this function writes.

# %%
#| export
README_HEADER = "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->\n\n"

def readme_text(root: str | Path | None = None) -> str:
    "The README markdown rendered from `nbs/index.ipynb`."
    from nbconvert import MarkdownExporter
    nb = nbformat.read(project_root(root) / "nbs" / "index.ipynb", as_version=4)
    def shown(c):
        if c.cell_type != "code": return True
        return "parameters" not in c.metadata.get("tags", []) and not re.match(r"\s*#\|\s*hide\b", c.source)
    nb.cells = [c for c in nb.cells if shown(c)]
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    return README_HEADER + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"

def write_readme(root: str | Path | None = None) -> Path:
    "Write `README.md` at the project root from `nbs/index.ipynb`."
    path = project_root(root) / "README.md"
    path.write_text(readme_text(root))
    return path


# %%
if demo:
    text = readme_text()
    assert text.startswith(README_HEADER) and "make run" in text and "show_runs" not in text


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
    sources = {p.name: p for p in sorted((root / "nbs").glob("*.ipynb"))}
    if notebooks is not None:
        missing = sorted(set(notebooks) - set(sources))
        if missing: raise FileNotFoundError(f"not in nbs/: {', '.join(missing)}")
        sources = {k: sources[k] for k in notebooks}
    if runs_dir is not None:
        runs = latest_runs(root / runs_dir)
        sources.update({k: v for k, v in runs.items() if k in sources})
    proc = root / "_proc"
    shutil.rmtree(proc, ignore_errors=True)
    processed = process_notebooks(list(sources.values()), proc, root)
    shutil.copy2(root / "_quarto.yml", proc / "_quarto.yml")
    for extra in ("styles.css",):
        if (root / "nbs" / extra).exists(): shutil.copy2(root / "nbs" / extra, proc / extra)
    shutil.rmtree(out, ignore_errors=True)
    if use_quarto and (quarto := shutil.which("quarto")):
        subprocess.run([quarto, "render", str(proc), "--output-dir", str(out)], check=True)
        print(f"Website rendered by Quarto: {out / 'index.html'}")
    else:
        render_fallback(processed, proc / "_quarto.yml", out)
        print(f"Quarto is not installed: built the nbconvert fallback preview instead: {out / 'index.html'}")
    return out


# %%
if demo:
    with tempfile.TemporaryDirectory() as d:
        site = build_site(out=Path(d) / "site", use_quarto=False, notebooks=["index.ipynb", "00_core.ipynb"])
        test_eq(sorted(p.name for p in site.glob("*.html")), ["00_core.html", "index.html"])
        page = (site / "index.html").read_text()
        assert "Static preview built with nbconvert" in page and 'href="00_core.html"' in page
