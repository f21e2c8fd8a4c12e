"The website: the fallback preview is tested here; the Quarto render where quarto exists."
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

from conftest import NBS, ROOT, notebooks
from moebook.site import build_site, render_fallback, sidebar_entries


@pytest.fixture(scope="module")
def fallback_site(tmp_path_factory):
    return build_site(out=tmp_path_factory.mktemp("site") / "site", use_quarto=False)


def test_every_notebook_has_a_page(fallback_site):
    pages = {p.stem for p in fallback_site.glob("*.html")}
    assert pages == {nb.stem for nb in notebooks()}


def test_every_notebook_is_in_the_sidebar_and_every_entry_exists():
    hrefs = {e["href"] for e in sidebar_entries(ROOT / "_quarto.yml")}
    assert hrefs == {nb.name for nb in notebooks()}


def test_local_links_resolve(fallback_site):
    for page in fallback_site.glob("*.html"):
        for href in re.findall(r'href="([^"]+)"', page.read_text()):
            u = urlparse(href)
            if u.scheme or u.netloc or href.startswith("#"): continue
            assert (fallback_site / u.path).exists(), f"{page.name}: broken link {href}"


def test_pages_say_they_are_the_fallback_and_have_a_home(fallback_site):
    home = (fallback_site / "index.html").read_text()
    assert "Static preview built with nbconvert" in home and "moebook" in home


def test_figures_are_embedded(fallback_site):
    for nb in notebooks():
        n_png = sum("image/png" in o.get("data", {}) for c in nbformat.read(nb, as_version=4).cells
                    if c.cell_type == "code" for o in c.outputs)
        page = (fallback_site / f"{nb.stem}.html").read_text()
        assert page.count('src="data:image/png;base64') >= n_png, f"{nb.name}: figures missing from its page"


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


@pytest.mark.skipif(shutil.which("quarto") is None, reason="quarto is not installed on this machine")
def test_quarto_render(tmp_path):
    site = build_site(out=tmp_path / "site", use_quarto=True)
    assert {p.stem for p in site.glob("*.html")} >= {nb.stem for nb in notebooks()}
