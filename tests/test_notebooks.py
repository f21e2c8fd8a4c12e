"""Every notebook runs end to end through papermill with its smallest parameters (tests/smoke/<notebook>.json).

This is the only place `make test` executes notebooks: each runs once, all its cells (the unit-test cells included).
The smallest parameters are meant to finish in about 90 s per notebook on an idle 2-core machine."""
import json

import pytest

from conftest import NBS, ROOT, moebook_cli, notebooks

SMOKE = ROOT / "tests" / "smoke"


@pytest.mark.notebook
@pytest.mark.timeout(660)
@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_with_smallest_parameters(nb, tmp_path):
    spec = SMOKE / f"{nb.stem}.json"
    assert spec.exists(), f"{nb.name} needs its smallest parameters in {spec.relative_to(ROOT)}"
    params = json.loads(spec.read_text())
    args = [a for k, v in params.items() for a in ("-p", k, json.dumps(v) if not isinstance(v, str) else v)]
    r = moebook_cli("run", nb, *args, "--runs-dir", tmp_path, "--no-progress", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (metrics,) = (tmp_path / nb.stem).glob("*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "ok"
