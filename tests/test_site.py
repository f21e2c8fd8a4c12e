"The website: the fallback preview is tested here; the Quarto render where quarto exists."
import html
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

from conftest import NBS, ROOT, notebooks
from moebook.runner import read_parameters
from moebook.site import build_site, readme_text, render_fallback, sidebar_entries


@pytest.mark.slow
def test_every_notebook_has_a_page(fallback_site):
    pages = {p.stem for p in fallback_site.glob("*.html")}
    assert pages == {nb.stem for nb in notebooks()}


def test_every_notebook_is_in_the_sidebar_and_every_entry_exists():
    hrefs = {e["href"] for e in sidebar_entries(ROOT / "_quarto.yml")}
    assert hrefs == {nb.name for nb in notebooks()}


@pytest.mark.slow
def test_local_links_resolve(fallback_site):
    for page in fallback_site.glob("*.html"):
        for href in re.findall(r'href="([^"]+)"', page.read_text()):
            u = urlparse(href)
            if u.scheme or u.netloc or href.startswith("#"): continue
            assert (fallback_site / u.path).exists(), f"{page.name}: broken link {href}"


@pytest.mark.slow
def test_pages_say_they_are_the_fallback_and_have_a_home(fallback_site):
    home = (fallback_site / "index.html").read_text()
    assert "Static preview built with nbconvert" in home and "moebook" in home


@pytest.mark.slow
def test_figures_are_embedded(fallback_site):
    for nb in notebooks():
        n_png = sum("image/png" in o.get("data", {}) for c in nbformat.read(nb, as_version=4).cells
                    if c.cell_type == "code" for o in c.outputs)
        page = (fallback_site / f"{nb.stem}.html").read_text()
        assert page.count('src="data:image/png;base64') >= n_png, f"{nb.name}: figures missing from its page"


@pytest.mark.slow
def test_processing_leaves_the_callers_process_alone(tmp_path):
    "nbdev runs 01_moe's export cells to process it: their Auto-class registration must not replace moebook's here."
    from transformers import AutoConfig
    from moebook.moe import MoeLMConfig
    from moebook.site import process_notebooks
    cwd, env = os.getcwd(), dict(os.environ)
    (page,) = process_notebooks([NBS / "01_moe.ipynb"], tmp_path, ROOT)
    assert page == tmp_path / "01_moe.ipynb" and nbformat.read(page, as_version=4).cells
    assert type(AutoConfig.for_model(MoeLMConfig.model_type)) is MoeLMConfig  # not a copy defined in `__main__`
    assert os.getcwd() == cwd and dict(os.environ) == env


@pytest.mark.slow
def test_fallback_embeds_a_figure(tmp_path):
    import matplotlib; matplotlib.use("Agg")
    import base64, io
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(); ax.plot([0, 1]); buf = io.BytesIO(); fig.savefig(buf, format="png")
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("plot()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buf.getvalue()).decode()})]
    nb.cells = [nbformat.v4.new_markdown_cell("# Plot page\n\n[home](index.ipynb)"), cell]
    nbformat.write(nb, tmp_path / "plot.ipynb")
    (page,) = render_fallback([tmp_path / "plot.ipynb"], ROOT / "_quarto.yml", tmp_path / "out")
    text = page.read_text()
    assert 'src="data:image/png;base64' in text and 'href="index.html"' in text and "<title>Plot page" in text


def _text(page: Path) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.mark.slow
def test_pages_show_front_matter_as_title_not_text(fallback_site):
    for nb in notebooks():
        title = next(m[1].strip() for c in nbformat.read(nb, as_version=4).cells
                     if c.cell_type == "markdown" and (m := re.search(r"^#\s+(.+)$", c.source, re.M)))
        page = (fallback_site / f"{nb.stem}.html").read_text()
        assert f'<h1 class="title">{html.escape(title)}</h1>' in page, f"{nb.name}: its title is not the page heading"
        assert "output-file:" not in page, f"{nb.name}: front matter printed"


def test_readme_links_work_from_the_repository_root():
    links = re.findall(r"\]\(([^)\s]+)\)", readme_text(ROOT))
    local = [l for l in links if not re.match(r"[a-z]+:|#", l)]
    assert local, "the README links to the notebooks"
    missing = [l for l in local if not (ROOT / l.split("#")[0]).exists()]
    assert not missing, f"README links that do not resolve from the repository root: {missing}"


@pytest.mark.slow
def test_pages_built_from_runs_say_which_run_and_how_long(tmp_path):
    runs = tmp_path / "runs"
    # --from-runs shows each notebook's latest run at its default parameters (a 00_core run with seed=1 is not one)
    for name, seconds, overrides in (("index.ipynb", 12.0, {}), ("00_core.ipynb", 210.0, {"seed": 0})):
        run = runs / Path(name).stem / "20260101-000000-abc1234"
        run.mkdir(parents=True)
        shutil.copy2(NBS / name, run / name)
        (run / "metrics.json").write_text(json.dumps({
            "notebook": name, "run_id": run.name, "status": "ok", "started_at": "2026-01-01T00:00:00", "wall_time_s": seconds,
            "overrides": overrides, "parameters": {**{k: p.default for k, p in read_parameters(NBS / name).items()}, **overrides}, "metrics": {}, "git_commit": "0123456789abcdef", "git_dirty": False}))
    site = build_site(out=tmp_path / "site", runs_dir=runs, use_quarto=False, notebooks=["index.ipynb", "00_core.ipynb"])
    core, home = _text(site / "00_core.html"), _text(site / "index.html")
    assert ("Outputs of moebook run 20260101-000000-abc1234 (parameters: seed=0): ok in 3.5 min, "
            "started 2026-01-01 00:00:00, commit 0123456.") in core
    assert "What make run produced" in home
    assert "00_core 20260101-000000-abc1234 seed=0 ok 3.5 min" in home and "index 20260101-000000-abc1234 defaults ok 12 s" in home
    assert "2 runs, 3.7 min of notebook execution in all." in home
    assert "What make run produced" not in _text(build_site(out=tmp_path / "plain", use_quarto=False, notebooks=["index.ipynb"]) / "index.html")


@pytest.mark.skipif(shutil.which("quarto") is None, reason="quarto is not installed on this machine")
def test_quarto_render(tmp_path):
    site = build_site(out=tmp_path / "site", use_quarto=True)
    assert {p.stem for p in site.glob("*.html")} >= {nb.stem for nb in notebooks()}


def test_from_runs_picks_the_default_run_never_a_later_smoke_run(tmp_path):
    from moebook.site import default_runs
    nb = ROOT / "nbs" / "00_core.ipynb"
    for stamp, params in (("20260101-000000-aaaaaaa", {"seed": 0}), ("20260102-000000-bbbbbbb", {"seed": 5})):
        run = tmp_path / "00_core" / stamp; run.mkdir(parents=True)
        (run / "00_core.ipynb").write_text(nb.read_text())
        (run / "metrics.json").write_text(json.dumps({"notebook": "00_core.ipynb", "run_id": stamp, "status": "ok",
                                                      "started_at": stamp, "parameters": params, "overrides": {}}))
    assert default_runs(tmp_path, [nb]) == {"00_core.ipynb": tmp_path / "00_core" / "20260101-000000-aaaaaaa" / "00_core.ipynb"}


def test_site_index_and_readme_carry_the_claim_ledger():
    from moebook.evidence import readme_ledger
    from moebook.site import fill_ledger, LEDGER_MARKER
    assert LEDGER_MARKER in (ROOT / "nbs" / "index.ipynb").read_text()
    filled = fill_ledger(f"before\n\n{LEDGER_MARKER}\n\nafter", ROOT)
    assert readme_ledger(ROOT) in filled and LEDGER_MARKER not in filled
