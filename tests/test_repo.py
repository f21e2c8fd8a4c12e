"The notebooks are the source of truth: export, cleaning and jupytext pairing must all be in sync."
import subprocess

import jupytext
import nbformat
import pytest

from conftest import BIN, NBS, ROOT, notebooks
from moebook.runner import read_parameters


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_nbdev_export_reproduces_package(project_copy):
    before = _files(project_copy / "moebook")
    subprocess.run([BIN / "nbdev_export"], cwd=project_copy, check=True, capture_output=True)
    after = _files(project_copy / "moebook")
    assert after.keys() == before.keys(), "nbdev_export adds or removes modules: run `make export` and commit"
    changed = [str(k) for k in after if after[k] != before[k]]
    assert not changed, f"moebook/ differs from what nbdev_export writes: {changed}"


@pytest.mark.slow
def test_nbdev_clean_leaves_no_diff(project_copy):
    before = _files(project_copy / "nbs")
    subprocess.run([BIN / "nbdev_clean"], cwd=project_copy, check=True, capture_output=True)
    after = _files(project_copy / "nbs")
    changed = [str(k) for k in after if after[k] != before.get(k)]
    assert not changed, f"notebooks are not clean, run `make clean-nbs`: {changed}"


@pytest.mark.slow
def test_parameters_tag_survives_cleaning(project_copy):
    subprocess.run([BIN / "nbdev_clean"], cwd=project_copy, check=True, capture_output=True)
    for nb in sorted((project_copy / "nbs").glob("*.ipynb")):
        assert read_parameters(nb), f"{nb.name}: no parameters after nbdev_clean"


@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_jupytext_pair_in_sync(nb):
    py = nb.with_suffix(".py")
    assert py.exists(), f"{nb.name} has no paired {py.name}: run `make sync`"
    text = jupytext.writes(jupytext.read(nb), fmt="py:percent")
    assert text == py.read_text(), f"{py.name} differs from {nb.name}: run `make sync`"


@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_every_notebook_has_typed_parameters(nb):
    params = read_parameters(nb)
    assert params, f"{nb.name}: the parameters cell sets nothing"


@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(nb):
    "`papermill --help-notebook` lists each parameter with its type and comment (an `=` in a comment breaks its parser)."
    from papermill.translators import PythonTranslator
    cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    seen = [p.name for p in PythonTranslator.inspect(cell)]
    assert seen == list(read_parameters(nb)), f"{nb.name}: papermill parses {seen}, the notebook sets {list(read_parameters(nb))}"


def test_paper_notebooks_end_with_claim_check():
    for nb in notebooks():
        if not nb.stem[:2].isdigit() or not 1 <= int(nb.stem[:2]) <= 6: continue
        md = [c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "markdown"]
        heads = [line for s in md for line in s.splitlines() if line.startswith("## ")]
        assert heads and "claim check" in heads[-1].lower(), f"{nb.name}: last section must be the claim check"


def test_readme_leads_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci, ".ci/run must call the README's test command"


def test_readme_is_generated_from_index():
    from moebook.site import readme_text
    assert (ROOT / "README.md").read_text() == readme_text(ROOT), "README.md is stale: run `make readme`"


@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_imports_live_in_their_own_cells(nb):
    "nbdev runs every cell that imports something while building the docs, so such cells may not use experiment state."
    import ast
    bad = []
    for i, c in enumerate(nbformat.read(nb, as_version=4).cells):
        if c.cell_type != "code" or "#| export" in c.source or "#| exporti" in c.source or "#| eval: false" in c.source: continue
        try: body = ast.parse("\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))).body
        except SyntaxError: continue
        has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.Module(body=body, type_ignores=[])))
        if has_import and any(not isinstance(n, (ast.Import, ast.ImportFrom)) for n in body): bad.append(i)
    assert not bad, f"{nb.name}: cells {bad} mix imports with other code; move the imports into a cell of their own"
