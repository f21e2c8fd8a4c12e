"Tests of moebook.evidence: interval coverage, the verdict rule, record reading, and the committed ledger."
import dataclasses, json, math
from pathlib import Path

import nbformat
import numpy as np
import pytest
from scipy import stats

from moebook import evidence as ev

ROOT = Path(__file__).resolve().parent.parent
BAND = (0.93, 0.97)


# --- coverage: every test at the n the notebooks use (3, 4, 10 seeds; 100-1000 items; rates over 50-200 trials)
@pytest.mark.parametrize("n", [3, 4, 10])
def test_paired_t_coverage(n):
    c = ev.coverage("paired t", n, sims=2000, seed=n)
    assert BAND[0] <= c <= BAND[1], f"paired t coverage {c:.3f} at n={n}"


@pytest.mark.slow
@pytest.mark.parametrize("n", [100, 200])
def test_bootstrap_coverage(n):
    c = ev.coverage("paired bootstrap", n, sims=2000, seed=n)
    assert BAND[0] <= c <= BAND[1], f"bootstrap coverage {c:.3f} at n={n}"


def test_bootstrap_below_min_n_undercovers_and_is_refused():
    c = ev.coverage("paired bootstrap", 10, sims=1000, seed=1)
    assert c < BAND[0], f"BCa at n=10 covered {c:.3f}: MIN_N would be too strict"
    assert ev.MIN_N["paired bootstrap"] > 10
    rng = np.random.default_rng(0); x = rng.normal(size=10)
    claim = _claim().with_estimate(ev.paired_bootstrap(x + 1 + rng.normal(0, 0.1, 10), x))
    with pytest.raises(ev.EvidenceError, match="not trusted at n=10"): ev.judge(claim)


@pytest.mark.parametrize("n", [100, 200, 400])
def test_wilson_coverage_exact(n):
    for p in np.linspace(0.05, 0.95, 19):
        c = ev.coverage("wilson", n, p=p)
        assert BAND[0] <= c <= BAND[1], f"Wilson coverage {c:.4f} at n={n}, p={p:.2f}"


def test_wilson_below_min_n_leaves_the_band():
    assert ev.MIN_N["wilson"] > 50 and ev.coverage("wilson", 50, p=0.1) > BAND[1]


def test_wilson_coverage_by_brute_force():
    "The exact coverage sum agrees with a simulation (an independent route to the same number)."
    rng = np.random.default_rng(0); n, p = 60, 0.2
    ks = rng.binomial(n, p, 4000)
    hits = np.mean([(lambda e: e.ci[0] <= p <= e.ci[1])(ev.wilson_rate(int(k), n)) for k in ks])
    assert abs(hits - ev.coverage("wilson", n, p=p)) < 0.015


# --- estimates against independent formulas
def test_paired_t_matches_textbook_formula():
    rng = np.random.default_rng(3); a = rng.normal(size=4); b = a + 0.3 + rng.normal(0, 0.2, 4)
    e = ev.paired_t(b, a); d = b - a
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert e.effect == pytest.approx(d.mean()) and e.ci == pytest.approx((d.mean() - half, d.mean() + half))
    assert e.mde == pytest.approx((stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * d.std(ddof=1) / 2)


def test_mde_has_80_percent_power():
    "A true effect equal to the MDE is detected (CI excludes 0) in about 80 % of paired-t experiments."
    rng = np.random.default_rng(0); n, sd = 10, 1.0
    mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    hits = np.mean([ev.paired_t(rng.normal(mde, sd, n), np.zeros(n)).ci[0] > 0 for _ in range(3000)])
    assert 0.74 <= hits <= 0.86, hits


def test_bootstrap_matches_t_for_many_items():
    rng = np.random.default_rng(1); a = rng.normal(size=400); b = a + 0.1 + rng.normal(0, 1, 400)
    e_b, e_t = ev.paired_bootstrap(b, a), ev.paired_t(b, a)
    assert e_b.ci == pytest.approx(e_t.ci, abs=0.03) and e_b.mde == pytest.approx(e_t.mde, rel=0.1)


# --- the rule
def _claim(**kw):
    base = dict(notebook="t.ipynb", id="1", claim="B beats A", metric="m", direction="increase",
                treatment="B", control="A", target=0.2)
    return ev.Claim(**{**base, **kw})


def _est(effect, lo, hi, mde=0.05, n=10, test="paired t"):
    return ev.Estimate(effect, (lo, hi), n, test, mde)


@pytest.mark.parametrize("kind,margin,ci,direction,expected", [
    ("superiority", None, (0.1, 0.5), "increase", "supported"),
    ("superiority", None, (-0.5, -0.1), "increase", "not supported"),
    ("superiority", None, (-0.1, 0.3), "increase", "inconclusive"),
    ("superiority", None, (-0.5, -0.1), "decrease", "supported"),
    ("non-inferiority", 0.2, (-0.15, 0.3), "increase", "supported"),
    ("non-inferiority", 0.2, (-0.6, -0.3), "increase", "not supported"),
    ("non-inferiority", 0.2, (-0.3, 0.1), "increase", "inconclusive"),
    ("non-inferiority", 0.2, (-0.3, 0.15), "decrease", "supported"),  # "forgets no more": lower is better
    ("equivalence", 0.2, (-0.1, 0.1), "increase", "supported"),
    ("equivalence", 0.2, (0.3, 0.5), "increase", "not supported"),
    ("equivalence", 0.2, (0.1, 0.3), "increase", "inconclusive"),
])
def test_judge_rule(kind, margin, ci, direction, expected):
    c = _claim(kind=kind, margin=margin, target=0.2 if kind == "superiority" else None, direction=direction)
    got = ev.judge(c.with_estimate(_est(sum(ci) / 2, *ci)))
    assert got.verdict == expected, got.reason


def test_judge_precondition_and_power_come_first():
    strong = _claim().with_estimate(_est(1.0, 0.8, 1.2))
    pre = ev.Precondition("trained to a plateau", 0.05, "<", 0.01)
    got = ev.judge(dataclasses.replace(strong, preconditions=[pre]))
    assert got.verdict == "not testable here" and "trained to a plateau" in got.reason
    assert ev.judge(dataclasses.replace(strong, preconditions=[ev.Precondition("ok", 0.001, "<", 0.01)])).verdict == "supported"
    weak = ev.judge(_claim().with_estimate(_est(1.0, 0.8, 1.2, mde=0.5)))  # the run could not detect the target 0.2
    assert weak.verdict == "inconclusive" and "MDE" in weak.reason
    assert not ev.Precondition("nan", float("nan"), ">=", 0).met


@pytest.mark.parametrize("bad,match", [
    (dict(direction="up"), "direction must be"), (dict(kind="better"), "kind must be"),
    (dict(setting="final"), "setting must be"), (dict(target=None), "needs target"),
    (dict(kind="non-inferiority", margin=None), "needs margin"), (dict(test="z"), "test must be"),
])
def test_judge_rejects_malformed_claims(bad, match):
    c = dataclasses.replace(_claim().with_estimate(_est(1.0, 0.8, 1.2)), **bad)
    with pytest.raises(ev.EvidenceError, match=match): ev.judge(c)


# --- paired runs
def _score(variant, seed):
    g = np.random.default_rng(seed)
    return {"score": float(g.normal() + (1.0 if variant == "B" else 0.0))}


@pytest.mark.slow
def test_paired_runs_pairs_resumes_and_parallelises(tmp_path):
    r = ev.paired_runs(_score, ["A", "B"], [0, 1, 2, 3], {"x": 1}, cache_dir=tmp_path, workers=2)
    assert [r[("B", s)]["score"] - r[("A", s)]["score"] for s in range(4)] == pytest.approx([1.0] * 4)
    calls = []
    again = ev.paired_runs(lambda v, s: calls.append((v, s)) or _score(v, s), ["A", "B"], [0, 1, 2, 3, 4], {"x": 1}, cache_dir=tmp_path)
    assert calls == [("A", 4), ("B", 4)] and {k: again[k] for k in r} == r  # only the new seed ran
    other = ev.paired_runs(lambda v, s: calls.append((v, s)) or _score(v, s), ["A"], [0], {"x": 2}, cache_dir=tmp_path)
    assert calls[-1] == ("A", 0) and other[("A", 0)] == r[("A", 0)]  # another config is another cache key


def _threads_used(variant, seed):
    import torch
    a = torch.randn(256, 256)
    for _ in range(5): a = torch.tanh(a @ a)  # parallel regions: a forked child hangs here once its parent has used them
    return {"threads": torch.get_num_threads()}


@pytest.mark.slow
@pytest.mark.timeout(180, method="thread")  # the bug is a hang: end the whole session rather than wait on it
def test_paired_runs_with_two_threads_per_worker_finish():
    "Workers with > 1 torch thread are spawned: forked ones hang in OpenMP after the parent used its thread pool."
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(2); x = torch.randn(512, 512); (x @ x).sum()  # the parent's thread pool is live
    try: res = ev.paired_runs(_threads_used, ["A", "B"], [0], workers=2, threads_per_worker=2)
    finally: torch.set_num_threads(before)
    assert {r["threads"] for r in res.values()} == {2}


# --- records in files
def _record(**kw):
    c = ev.judge(_claim(setting="default", commit="abc", dirty=False).with_estimate(_est(1.0, 0.8, 1.2)))
    return {**json.loads(json.dumps(ev.to_jsonable(dataclasses.asdict(c)))), **kw}


def _notebook(path, outputs):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show_claims(...)"); cell.outputs = outputs
    nb.cells = [cell]; nbformat.write(nb, path); return path


def test_read_claims_from_notebook_and_runs(tmp_path):
    rec = _record()
    nb = _notebook(tmp_path / "x.ipynb", [nbformat.v4.new_output("display_data", data={"text/markdown": "t", ev.MIME: {"claims": [rec]}})])
    assert ev.read_claims(nb) == [rec]
    run = tmp_path / "runs" / "x" / "20260101-000000-abcdef0"; run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "metrics": {"claims": [rec]}}))
    assert ev.read_claims(run) == [rec] and ev.read_claims(tmp_path / "runs") == [rec]


@pytest.mark.parametrize("case,match", [
    ("never executed", "never executed"), ("no claims", "holds no claim records"),
    ("bad verdict", "not one of"), ("run without claims", "holds no claims"), ("missing", "no such file"),
    ("missing field", "lacks fields"),
])
def test_read_claims_bad_input_names_the_file(tmp_path, case, match):
    if case == "never executed": p = _notebook(tmp_path / "n.ipynb", [])
    elif case == "no claims": p = _notebook(tmp_path / "n.ipynb", [nbformat.v4.new_output("stream", text="hi")])
    elif case in ("bad verdict", "missing field"):
        rec = _record(verdict="probably") if case == "bad verdict" else {k: v for k, v in _record().items() if k != "mde"}
        p = _notebook(tmp_path / "n.ipynb", [nbformat.v4.new_output("display_data", data={ev.MIME: {"claims": [rec]}})])
    elif case == "run without claims":
        p = tmp_path / "run"; p.mkdir(); (p / "metrics.json").write_text(json.dumps({"status": "ok", "metrics": {}}))
    else: p = tmp_path / "nothing.ipynb"
    with pytest.raises(ev.EvidenceError, match=match) as e: ev.read_claims(p)
    assert str(p) in str(e.value)


def test_claims_command_prints_json_records(tmp_path, capsys):
    rec = _record()
    nb = _notebook(tmp_path / "x.ipynb", [nbformat.v4.new_output("display_data", data={ev.MIME: {"claims": [rec]}})])
    assert ev.claims_command([str(nb)], as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == [rec]
    assert ev.claims_command([str(nb)]) == 0 and "**supported**" in capsys.readouterr().out


# --- the committed ledger
def test_committed_paper_notebooks_have_complete_clean_records():
    for nb in ev.PAPER_NOTEBOOKS:
        for r in ev.read_claims(ROOT / "nbs" / nb):
            if r.get("status") == "pending": assert nb in ev.PENDING; continue
            assert set(ev.REQUIRED) <= set(r), f"{nb}: {set(ev.REQUIRED) - set(r)}"
            assert r["setting"] in ("default", "evidence") and r["dirty"] is False and r["commit"], (nb, r["id"])
            idle = ev.idle_wall_estimate(r)
            assert idle <= 600, f"{nb}: the default run needs {idle:.0f} s on an idle 2-core machine (> 10 minutes; load {r['load']})"
            assert r["baselines"], f"{nb}#{r['id']}: no baselines"
            # the stored verdict is what the rule says for the stored numbers
            fields = {f.name for f in dataclasses.fields(ev.Claim)}
            c = ev.Claim(**{k: v for k, v in r.items() if k in fields and k != "preconditions"},
                         preconditions=[ev.Precondition(p["name"], p["value"], p["op"], p["required"]) for p in r["preconditions"]])
            c = dataclasses.replace(c, ci=tuple(c.ci))
            assert ev.judge(c).verdict == r["verdict"], f"{nb}#{r['id']}"


def test_committed_paper_notebooks_embed_figures():
    for nb in ev.PAPER_NOTEBOOKS:
        cells = nbformat.read(ROOT / "nbs" / nb, as_version=4).cells
        n = sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code" for o in c.outputs)
        assert n >= 2, f"{nb} embeds {n} figures (executed with MPLBACKEND=Agg? that silently drops them)"


def test_readme_claim_table_is_generated_from_the_ledger():
    from moebook.site import links_from_root  # the README sits at the root: its links point into nbs/
    readme = (ROOT / "README.md").read_text()
    assert links_from_root(ev.readme_ledger(ROOT)) in readme, "README.md's claim table differs from the committed notebooks' records: run `moebook readme`"


def test_sealed_runs_are_checked_and_reused_read_only(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "provenance", lambda root=None: {"commit": "c0ffee", "dirty": False})  # no git process in the fast tests
    runs = tmp_path / "runs"
    calls = []
    def fn(v, s):
        calls.append((v, s)); return {"score": s + (v == "B")}
    first = ev.paired_runs(fn, ["A", "B"], [0, 1, 2], {"k": 1}, cache_dir=runs)
    m = ev.seal_runs(runs, "python make_runs.py")
    assert m["command"] == "python make_runs.py" and len(m["files"]) == 6 and "commit" in m
    assert ev.sealed_runs(runs)["files"] == m["files"]
    assert ev.seal_runs(runs, "python make_runs.py", made_at={"commit": "abc", "dirty": False})["commit"] == "abc"
    with pytest.raises(ev.EvidenceError, match="made_at"): ev.seal_runs(runs, "x", made_at={"commit": "abc"})
    calls.clear()
    assert ev.paired_runs(fn, ["A", "B"], [0, 1, 2], {"k": 1}, reuse=[runs]) == first and calls == []  # all from the sealed folder
    ev.paired_runs(fn, ["A", "B"], [0, 1, 2], {"k": 2}, reuse=[runs])  # another config: nothing matches, every run is made
    assert len(calls) == 6 and len(list(runs.glob("*.json"))) == 7  # and nothing was written into the sealed folder
    victim = runs / sorted(m["files"])[0]
    victim.write_text('{"score": 99}')
    with pytest.raises(ev.EvidenceError, match="SHA-256 differs"): ev.sealed_runs(runs)
    victim.unlink()
    with pytest.raises(ev.EvidenceError, match="missing"): ev.sealed_runs(runs)
    (runs / "extra.json").write_text("{}")
    with pytest.raises(ev.EvidenceError, match="not in the manifest"): ev.sealed_runs(runs)
    (runs / "manifest.json").unlink()
    with pytest.raises(ev.EvidenceError, match="no manifest"): ev.sealed_runs(runs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvidenceError, match="no run results"): ev.seal_runs(tmp_path / "empty", "x")
