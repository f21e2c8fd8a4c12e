# %% [markdown]
# # Evidence: the claim ledger
#
# > One record and one rule behind every verdict in moebook: paired estimates with 95 % confidence intervals, the smallest detectable effect, baselines, measured preconditions, and `supported` / `not supported` / `inconclusive` / `not testable here`.

# %% [markdown]
# Every paper notebook ends with a *claim check*: the paper's headline claims, what our run measured and a
# verdict. A verdict is only worth something if the same standard stands behind all of them, so this module
# fixes that standard in code:
#
# 1. **A claim is defined before the experiment.** A `Claim` names the metric, the direction the paper
#    predicts, the kind of comparison (superiority, non-inferiority or equivalence) and its margin or
#    target effect, and the preconditions the paper's effect needs (a model trained to a plateau, a real
#    distribution shift, a planner that a perfect simulator makes succeed). The notebook writes these in a
#    cell *before* its experiment cells.
# 2. **The estimate is paired.** Variant A and variant B of seed *s* share data and initialisation, so the
#    effect is the mean of per-seed (or per-item) differences, with a 95 % CI from `scipy.stats`: a paired
#    *t* interval over a few seeds, a BCa bootstrap over many test items, a Wilson interval for a rate.
# 3. **The run says what it could have detected.** The minimum detectable effect (MDE, 80 % power at
#    α = 0.05) is $(t_{0.975,n-1} + t_{0.8,n-1})\,s_d/\sqrt{n}$ for paired seeds and
#    $(z_{0.975}+z_{0.8})\,\mathrm{se}$ for the bootstrap and for rates.
# 4. **One rule turns it into a verdict** (`judge`): an unmet precondition → `not testable here` (naming
#    it); an MDE larger than the effect the claim is about → `inconclusive`; otherwise the CI decides.
#
# The records are shown as a table in each notebook and embedded in its output as machine-readable JSON;
# `moebook claims` reads them back from committed notebooks and run folders, and the README's claim table
# is generated from them.

# %%
#| default_exp evidence

# %%
#| export
from __future__ import annotations
import concurrent.futures as cf
import dataclasses, functools, hashlib, json, math, multiprocessing, os, sys, time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import stats

from moebook.core import _repo_root, atomic_write_text, provenance, record_metrics, to_jsonable

# %%
import tempfile, time
import torch
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from fastcore.test import test_eq, test_fail, test_close

# %% tags=["parameters"]
seed: int = 0  # seed of the examples and of the coverage simulations
coverage_sims: int = 400  # simulations per coverage check in this notebook (the test suite uses 2,000)


# %% [markdown]
# ## Estimates
#
# An `Estimate` is what a statistical test returns: the effect (treatment − control, in the metric's own
# units), its 95 % CI, the number of independent units `n` (paired seeds or test items), the test's name and
# the MDE at that `n`.

# %%
#| export
class EvidenceError(ValueError):
    "A claim record, or a file that should hold claim records, is malformed; the message names it."

Z_975, Z_80 = float(stats.norm.ppf(0.975)), float(stats.norm.ppf(0.8))

@dataclass(frozen=True)
class Estimate:
    effect: float  # treatment - control (or the rate itself for `wilson_rate`)
    ci: tuple[float, float]  # 95 % confidence interval of `effect`
    n: int  # independent units: paired seeds, or test items
    test: str  # "paired t", "paired bootstrap" or "wilson"
    mde: float  # smallest |effect| this n detects with 80 % power at alpha 0.05 (two-sided)

def _paired(treatment, control) -> np.ndarray:
    t, c = np.asarray(treatment, dtype=float), np.asarray(control, dtype=float)
    if t.shape != c.shape or t.ndim != 1:
        raise EvidenceError(f"paired samples need two 1-d arrays of the same length, got shapes {t.shape} and {c.shape}")
    if not (np.isfinite(t).all() and np.isfinite(c).all()): raise EvidenceError("paired samples contain NaN or inf")
    return t - c

def paired_t(treatment: Sequence[float], # per-seed metric of the variant the claim is about
             control: Sequence[float], # per-seed metric of its comparison, same seeds in the same order
            ) -> Estimate:
    "Mean paired difference with the paired-t 95 % CI (`scipy.stats.ttest_rel`): for a few seeds."
    d = _paired(treatment, control)
    if len(d) < 2: raise EvidenceError(f"paired t needs at least 2 pairs, got {len(d)}")
    sd = float(d.std(ddof=1))
    if sd == 0: ci = (float(d.mean()), float(d.mean()))  # identical differences: the CI collapses
    else:
        r = stats.ttest_rel(np.asarray(treatment, float), np.asarray(control, float))
        ci = tuple(float(x) for x in r.confidence_interval(0.95))
    df = len(d) - 1
    mde = (stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * sd / math.sqrt(len(d))
    return Estimate(float(d.mean()), ci, len(d), "paired t", float(mde))

def paired_bootstrap(treatment: Sequence[float], # per-item (or per-seed) metric of the variant
                     control: Sequence[float], # the comparison's metric on the same items
                     n_resamples: int = 2000, # bootstrap resamples
                     seed: int = 0, # resampling seed (the CI is reproducible)
                    ) -> Estimate:
    "Mean paired difference with a BCa bootstrap 95 % CI (`scipy.stats.bootstrap`): for many test items."
    d = _paired(treatment, control)
    if len(d) < 2: raise EvidenceError(f"the bootstrap needs at least 2 pairs, got {len(d)}")
    if np.all(d == d[0]): return Estimate(float(d[0]), (float(d[0]), float(d[0])), len(d), "paired bootstrap", 0.0)
    r = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, method="BCa", random_state=np.random.default_rng(seed))
    ci = (float(r.confidence_interval.low), float(r.confidence_interval.high))
    return Estimate(float(d.mean()), ci, len(d), "paired bootstrap", float((Z_975 + Z_80) * r.standard_error))

def wilson_rate(successes: int, # number of successes
                n: int, # number of trials
               ) -> Estimate:
    "A success rate with its Wilson 95 % CI (`scipy.stats.binomtest`); the MDE is that of a one-sample test."
    if not (isinstance(successes, (int, np.integer)) and isinstance(n, (int, np.integer)) and 0 <= successes <= n and n > 0):
        raise EvidenceError(f"wilson_rate needs integers 0 <= successes <= n, n > 0; got {successes!r} of {n!r}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(0.95, method="wilson")
    p = (successes + 2) / (n + 4)  # Agresti-Coull centre keeps the MDE positive at 0 or n successes
    return Estimate(successes / n, (float(ci.low), float(ci.high)), int(n), "wilson", float((Z_975 + Z_80) * math.sqrt(p * (1 - p) / n)))


# %% [markdown]
# The paired-t interval agrees with the textbook formula $\bar d \pm t_{0.975,n-1}\,s_d/\sqrt n$ computed
# by hand here (an independent check of how we call scipy), and pairing matters: the same numbers treated
# as unpaired samples give a much wider interval when seeds differ a lot from each other.

# %%
a, b = np.array([4.34, 4.15, 4.14]), np.array([4.30, 4.10, 4.11])  # three seeds, a shared seed effect
e = paired_t(a, b)
d = a - b; half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
test_close(e.effect, d.mean()); test_close(e.ci, (d.mean() - half, d.mean() + half))
test_close(e.mde, (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * d.std(ddof=1) / math.sqrt(3))
unpaired = stats.ttest_ind(a, b).confidence_interval(0.95)
assert e.ci[1] - e.ci[0] < (unpaired.high - unpaired.low) / 3, "pairing should remove the seed effect"
test_fail(lambda: paired_t([1, 2], [1, 2, 3]), contains="same length")
test_fail(lambda: paired_t([1, float("nan")], [1, 2]), contains="NaN")
e = wilson_rate(5, 100); test_close(e.ci, (0.0215, 0.1118), eps=1e-3); test_eq(e.test, "wilson")
test_fail(lambda: wilson_rate(5, 3), contains="0 <= successes <= n")
e = paired_bootstrap(np.arange(50) % 7 + 1.0, np.arange(50) % 7 * 1.0)
test_eq(e.ci, (1.0, 1.0)); test_eq(e.effect, 1.0)

# %% [markdown]
# ### Coverage: where each interval can be trusted
#
# A 95 % interval must contain the true effect in 95 % of repeated experiments. We check it by simulation at
# the sample sizes the notebooks use: the paired *t* interval is exact for normal differences at any `n`,
# the BCa bootstrap under-covers with few units (0.90 at `n = 10`, 0.93 at `n = 30` and `50`, 0.95 from `n = 100`, 2,000 simulations), and the Wilson interval is checked
# exactly (summing binomial probabilities, no simulation): its coverage oscillates with the true rate and
# stays inside the band for every rate from 0.05 to 0.95 only from `n = 100` (at `n = 50` it reaches 0.9703). `MIN_N` records the smallest `n` at which each
# test held its coverage in `[0.93, 0.97]` (`tests/test_evidence.py` re-checks it with 2,000 simulations);
# `judge` refuses a record whose test is used below that `n`.

# %%
#| export
MIN_N = {"paired t": 3, "paired bootstrap": 100, "wilson": 100}  # measured coverage in [0.93, 0.97] from here on

def coverage(test: str, # "paired t", "paired bootstrap" or "wilson"
             n: int, # units per simulated experiment
             sims: int = 2000, # simulated experiments (ignored for "wilson", which is exact)
             seed: int = 0, # simulation seed
             p: float = 0.3, # true rate for "wilson"
            ) -> float: # fraction of experiments whose 95 % CI holds the true effect
    "Coverage of a test's 95 % CI: simulated for paired tests (skewed differences), exact for Wilson."
    if test == "wilson":
        k = np.arange(n + 1)
        hit = [(lambda ci: ci.low <= p <= ci.high)(stats.binomtest(int(j), n).proportion_ci(0.95, method="wilson")) for j in k]
        return float(np.sum(stats.binom.pmf(k, n, p) * np.array(hit)))
    rng = np.random.default_rng(seed)
    fn = {"paired t": paired_t, "paired bootstrap": lambda t, c: paired_bootstrap(t, c, n_resamples=1000, seed=int(rng.integers(1 << 31)))}[test]
    true = 0.5
    hits = 0
    for _ in range(sims):
        control = rng.normal(0, 1, n)  # seed-level variation, shared by both variants (pairing removes it)
        treatment = control + true + rng.normal(0, 0.5, n)
        lo, hi = fn(treatment, control).ci
        hits += lo <= true <= hi
    return hits / sims


# %%
t0 = time.time()
cov = {("paired t", n): coverage("paired t", n, coverage_sims, seed) for n in (3, 4, 10)}
cov |= {("paired bootstrap", n): coverage("paired bootstrap", n, coverage_sims, seed) for n in (10, 100)}
cov |= {("wilson", n): coverage("wilson", n) for n in (50, 100, 200)}  # at p = 0.3; tests/ scan p from 0.05 to 0.95
for (t, n), c in cov.items(): print(f"{t:17s} n={n:4d}  coverage {c:.3f}")
print(f"({coverage_sims} simulations each; {time.time() - t0:.0f} s)")
assert all(0.9 <= c <= 0.985 for (t, n), c in cov.items() if n >= MIN_N[t]), cov  # loose here; tight in tests/

# %% [markdown]
# ## Claims
#
# A `Claim` is one row of the ledger. Its definition (what is compared, in which direction, with which
# margin, under which preconditions) is fixed before the experiment; its estimate, baselines and measured
# preconditions are filled in by the run; `judge` adds the verdict and the reason.
#
# Sign convention: `effect` is *treatment − control* in the metric's units; `direction` is the sign the
# paper predicts (`"increase"`: the claim says treatment is higher). For `non-inferiority` the claim is
# "treatment is not worse than control by more than `margin`"; for `equivalence` "they differ by less than
# `margin`"; for `superiority` `target` is the smallest effect that would count as the paper's effect in our
# units (the paper's own number when the scales match, else a stated smallest effect of interest).

# %%
#| export
VERDICTS = ("supported", "not supported", "inconclusive", "not testable here")
KINDS = ("superiority", "non-inferiority", "equivalence")
SETTINGS = ("smoke", "default", "evidence")
DIRECTIONS = ("increase", "decrease")
_OPS = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less}

@dataclass
class Precondition:
    name: str  # what the paper's effect needs, e.g. "pre-training plateaued (D1 loss gain when doubled)"
    value: float  # what this run measured
    op: str  # one of >=, <=, >, <
    required: float  # the threshold, fixed before the run
    met: bool = False  # computed from value, op and required

    def __post_init__(self):
        if self.op not in _OPS: raise EvidenceError(f"precondition {self.name!r}: op must be one of {list(_OPS)}, got {self.op!r}")
        self.met = bool(math.isfinite(self.value) and _OPS[self.op](self.value, self.required))

@dataclass
class Claim:
    notebook: str  # file name of the notebook that checks the claim
    id: str  # short id, unique within the notebook ("1", "2a", ...)
    claim: str  # the paper's statement
    metric: str  # what is measured, with units and split ("CIDEr on gold test clips")
    direction: str  # "increase" or "decrease": the sign of treatment - control the paper predicts
    treatment: str  # the variant the claim is about
    control: str  # what it is compared with
    kind: str = "superiority"  # superiority, non-inferiority or equivalence
    margin: float | None = None  # non-inferiority / equivalence margin, in the metric's units
    target: float | None = None  # superiority: smallest effect that counts, in the metric's units
    paper_effect: float | None = None  # the paper's number, in the paper's units (see paper_metric)
    paper_metric: str = ""  # the paper's metric and data set, e.g. "CIDEr on MSR-VTT"
    effect: float = float("nan")  # our estimate: treatment - control
    ci: tuple[float, float] = (float("nan"), float("nan"))  # its 95 % CI
    n: int = 0  # paired seeds or test items
    test: str = ""  # paired t, paired bootstrap or wilson
    mde: float = float("nan")  # minimum detectable effect at this n
    baselines: dict[str, float] = field(default_factory=dict)  # the metric's trivial baselines and references
    preconditions: list[Precondition] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)  # scale, data and protocol differences from the paper
    verdict: str = ""  # set by judge
    reason: str = ""  # set by judge: why this verdict
    primary: bool = True  # one primary row per paper claim; secondary rows are shown, not summarised
    setting: str = "default"  # smoke, default or evidence
    seeds: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    wall_s: float = float("nan")  # wall time of the experiment
    cpu_s: float = float("nan")  # CPU time of the experiment (its process and finished worker processes)
    load: float = float("nan")  # the machine's 1-minute load average when the experiment started
    commit: str | None = None
    dirty: bool | None = None

    def with_estimate(self, est: Estimate) -> "Claim":
        "This claim with `est` filled in."
        return dataclasses.replace(self, effect=est.effect, ci=tuple(est.ci), n=est.n, test=est.test, mde=est.mde)


# %% [markdown]
# ### The rule

# %%
#| export
def validate(c: Claim) -> None:
    "Raise `EvidenceError` naming the field when a claim's definition cannot be judged."
    where = f"claim {c.notebook}#{c.id}"
    if c.direction not in DIRECTIONS: raise EvidenceError(f"{where}: direction must be one of {DIRECTIONS}, got {c.direction!r}")
    if c.kind not in KINDS: raise EvidenceError(f"{where}: kind must be one of {KINDS}, got {c.kind!r}")
    if c.setting not in SETTINGS: raise EvidenceError(f"{where}: setting must be one of {SETTINGS}, got {c.setting!r}")
    if c.kind == "superiority" and not (c.target is not None and c.target > 0):
        raise EvidenceError(f"{where}: a superiority claim needs target > 0 (the smallest effect that counts), got {c.target!r}")
    if c.kind != "superiority" and not (c.margin is not None and c.margin > 0):
        raise EvidenceError(f"{where}: a {c.kind} claim needs margin > 0, got {c.margin!r}")
    if c.test not in MIN_N: raise EvidenceError(f"{where}: test must be one of {list(MIN_N)} (call with_estimate), got {c.test!r}")
    if not all(map(math.isfinite, (c.effect, *c.ci, c.mde))): raise EvidenceError(f"{where}: effect, CI and mde must be finite")
    if c.n < MIN_N[c.test]:
        raise EvidenceError(f"{where}: {c.test} intervals are not trusted at n={c.n}: their 95 % coverage was only "
                            f"measured to hold from n={MIN_N[c.test]} (see coverage)")

def judge(c: Claim) -> Claim:
    "Return `c` with its verdict and the reason, by the one rule every moebook claim check uses."
    validate(c)
    unmet = [p for p in c.preconditions if not p.met]
    if unmet:
        why = "; ".join(f"{p.name}: measured {p.value:.4g}, needs {p.op} {p.required:g}" for p in unmet)
        return dataclasses.replace(c, verdict="not testable here", reason=f"precondition not met: {why}")
    s = 1.0 if c.direction == "increase" else -1.0
    lo, hi = sorted((s * c.ci[0], s * c.ci[1]))  # CI of the benefit the paper predicts
    size = c.target if c.kind == "superiority" else c.margin
    if c.mde > size:
        return dataclasses.replace(c, verdict="inconclusive", reason=f"this run could detect {c.mde:.3g} at best (MDE), "
                                   f"more than the {'target' if c.kind == 'superiority' else 'margin'} {size:g}")
    ci_txt = f"95 % CI of the predicted benefit [{lo:.3g}, {hi:.3g}]"
    if c.kind == "superiority":
        verdict = "supported" if lo > 0 else "not supported" if hi < 0 else "inconclusive"
        why = {"supported": "excludes 0 in the paper's direction", "not supported": "excludes 0 against the paper's direction",
               "inconclusive": "contains 0"}[verdict]
    elif c.kind == "non-inferiority":
        verdict = "supported" if lo > -size else "not supported" if hi < -size else "inconclusive"
        why = {"supported": f"lies above -margin {-size:g}", "not supported": f"lies below -margin {-size:g}",
               "inconclusive": f"contains -margin {-size:g}"}[verdict]
    else:
        verdict = "supported" if -size < lo and hi < size else "not supported" if lo > size or hi < -size else "inconclusive"
        why = {"supported": f"lies inside ±{size:g}", "not supported": f"lies outside ±{size:g}",
               "inconclusive": f"overlaps ±{size:g}"}[verdict]
    return dataclasses.replace(c, verdict=verdict, reason=f"{ci_txt} {why}")


# %% [markdown]
# The rule on constructed data: a known effect, a known null, an unmet precondition, an under-powered run,
# and each kind of claim.

# %%
rng = np.random.default_rng(seed)
base = Claim(notebook="demo.ipynb", id="1", claim="B beats A", metric="score", direction="increase",
             treatment="B", control="A", target=0.2)
ctrl = rng.normal(0, 1, 10)
strong = judge(base.with_estimate(paired_t(ctrl + 1.0 + rng.normal(0, 0.1, 10), ctrl)))
test_eq(strong.verdict, "supported")
wrong_way = judge(base.with_estimate(paired_t(ctrl - 1.0 + rng.normal(0, 0.1, 10), ctrl)))
test_eq(wrong_way.verdict, "not supported")
null = judge(base.with_estimate(paired_t(ctrl + rng.normal(0, 0.05, 10), ctrl)))
test_eq(null.verdict, "inconclusive")
noisy = judge(base.with_estimate(paired_t(ctrl + 1.0 + rng.normal(0, 2, 10), ctrl)))
test_eq(noisy.verdict, "inconclusive"); assert "MDE" in noisy.reason, noisy.reason
blocked = judge(dataclasses.replace(strong, preconditions=[Precondition("trained to a plateau", 0.04, "<", 0.01)]))
test_eq(blocked.verdict, "not testable here"); assert "trained to a plateau" in blocked.reason
lower_is_better = judge(dataclasses.replace(base, direction="decrease").with_estimate(paired_t(ctrl - 1.0 + rng.normal(0, 0.1, 10), ctrl)))
test_eq(lower_is_better.verdict, "supported")
ni = dataclasses.replace(base, kind="non-inferiority", direction="decrease", target=None, margin=0.3)
test_eq(judge(ni.with_estimate(paired_t(ctrl + 0.05 + rng.normal(0, 0.05, 10), ctrl))).verdict, "supported")  # worse, within margin
test_eq(judge(ni.with_estimate(paired_t(ctrl + 1.0 + rng.normal(0, 0.05, 10), ctrl))).verdict, "not supported")
eq = dataclasses.replace(ni, kind="equivalence")
test_eq(judge(eq.with_estimate(paired_t(ctrl - 0.05 + rng.normal(0, 0.05, 10), ctrl))).verdict, "supported")
test_eq(judge(eq.with_estimate(paired_t(ctrl - 1.0 + rng.normal(0, 0.05, 10), ctrl))).verdict, "not supported")
test_fail(lambda: judge(dataclasses.replace(base, target=None).with_estimate(paired_t(ctrl + 1, ctrl))), contains="needs target")
test_fail(lambda: judge(base.with_estimate(paired_bootstrap(ctrl + 1 + rng.normal(0, 0.1, 10), ctrl))), contains="not trusted at n=10:")
test_fail(lambda: Precondition("x", 1.0, "=>", 2.0), contains="op must be one of")


# %% [markdown]
# ## Paired runs
#
# Paired seeds mean: variant A and variant B of seed *s* see the same data order and start from the same
# initial weights, so their difference is the effect of the variant alone. `paired_runs` runs a function
# `fn(variant, seed) -> dict` over every (variant, seed) pair, in worker processes when more than one is
# asked for, caching each result as JSON so an interrupted run resumes where it stopped. Pairing itself is
# the function's job: it must seed its data and initialisation from `seed` only, never from `variant`.
# With workers, `fn` is pickled by reference: it must be a module-level function (or a notebook-level one
# under the fork start method), not a closure or a lambda. Workers are forked, except when each is to use
# more than one torch thread: OpenMP's thread pool does not survive `fork` (a forked worker that enters a
# parallel region after its parent did hangs forever), so such workers are *spawned*, which needs `fn`
# importable from a module; for a notebook's own `fn` the default falls back to one thread per worker.

# %%
#| export
def _key(config: dict, variant: str, seed: int) -> str:
    return hashlib.sha256(json.dumps(to_jsonable([config, variant, seed]), sort_keys=True).encode()).hexdigest()[:20]

def _importable(fn: Callable) -> bool:
    "Whether a spawned process can import `fn` (a module-level function, or a partial of one; not one defined in a notebook)."
    f = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(f, "__module__", "__main__") != "__main__" and "<locals>" not in getattr(f, "__qualname__", "<locals>")

def _call(fn: Callable, variant: str, seed: int, threads: int | None):
    if threads:
        import torch; torch.set_num_threads(threads)
    return fn(variant, seed)

def paired_runs(fn: Callable[[str, int], dict], # fn(variant, seed) -> JSON-able dict; seeds data and init from `seed` only
                variants: Sequence[str], # the variants compared on every seed
                seeds: Sequence[int], # the paired seeds
                config: dict | None = None, # every setting the results depend on (part of the cache key)
                cache_dir: str | Path | None = None, # if set, each result is saved there and reused on resume
                reuse: Sequence[str | Path] = (), # read-only folders of earlier results (e.g. sealed, committed ones), looked up first
                workers: int = 1, # processes; >1 forks workers (CPU only: CUDA cannot be forked), or spawns them for >1 thread each
                threads_per_worker: int | None = None, # torch threads per run (default: cores // workers in worker processes, 1 if `fn` is not importable; this process's count in-process)
                progress: Callable | None = None, # called as progress(done, total, variant, seed) after each result
               ) -> dict[tuple[str, int], dict]: # result of every (variant, seed)
    "Run `fn` for every variant on every seed (cached, optionally in parallel) and return the results."
    if not variants or not seeds: raise EvidenceError("paired_runs needs at least one variant and one seed")
    if len(set(variants)) != len(variants) or len(set(seeds)) != len(seeds): raise EvidenceError("variants and seeds must be unique")
    if not (isinstance(workers, int) and workers >= 1): raise EvidenceError(f"workers must be an int >= 1, got {workers!r}")
    config = config or {}
    cache = Path(cache_dir) if cache_dir else None
    if missing := [str(d) for d in reuse if not Path(d).is_dir()]: raise EvidenceError(f"reuse folders not found: {missing}")
    out, todo = {}, []
    for s in seeds:  # seed-major order: an interrupted run has complete pairs
        for v in variants:
            name = f"{_key(config, v, s)}.json"
            p = cache / name if cache else None
            if found := [f for f in [*(Path(d) / name for d in reuse), p] if f is not None and f.exists()]: out[(v, s)] = json.loads(found[0].read_text())
            else: todo.append((v, s, p))
    def done(v, s, p, r):
        r = to_jsonable(r)
        if p is not None: atomic_write_text(p, json.dumps(r))
        out[(v, s)] = r
        if progress: progress(len(out), len(variants) * len(seeds), v, s)
    if workers == 1 or len(todo) <= 1:  # in this process: `threads_per_worker` holds here too, and the caller's count comes back
        if threads_per_worker: import torch; before = torch.get_num_threads()
        try:
            for v, s, p in todo: done(v, s, p, _call(fn, v, s, threads_per_worker))
        finally:
            if threads_per_worker: torch.set_num_threads(before)
    else:
        threads, method = threads_per_worker or max(1, (os.cpu_count() or 1) // workers), "fork"
        if threads > 1:  # OpenMP's thread pool does not survive fork: a forked worker using > 1 thread can hang
            if _importable(fn): method = "spawn"
            elif threads_per_worker: raise EvidenceError(f"threads_per_worker={threads_per_worker} needs spawned workers, which must import fn; "
                                                         f"{fn!r} is defined in a notebook or function: move it to a module or use 1 thread")
            else: threads = 1
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as ex:
            futs = {ex.submit(_call, fn, v, s, threads): (v, s, p) for v, s, p in todo}
            for f in cf.as_completed(futs): done(*futs[f], f.result())
    return {(v, s): out[(v, s)] for s in seeds for v in variants}


# %%
def _toy(variant: str, seed: int) -> dict:
    g = np.random.default_rng(seed)  # data and "initialisation" from the seed only: the variants are paired
    x = g.normal(size=100)
    return {"score": float(x.mean() + (0.5 if variant == "B" else 0.0))}

with tempfile.TemporaryDirectory() as d:
    r1 = paired_runs(_toy, ["A", "B"], [0, 1, 2], {"n": 100}, cache_dir=d, workers=2)
    test_eq(len(list(Path(d).glob("*.json"))), 6)
    test_eq([round(r1[("B", s)]["score"] - r1[("A", s)]["score"], 9) for s in (0, 1, 2)], [0.5] * 3)  # paired
    r2 = paired_runs(lambda v, s: 1 / 0, ["A", "B"], [0, 1, 2], {"n": 100}, cache_dir=d)  # all cached: fn never runs
    test_eq(r1, r2)
    test_eq(paired_runs(_toy, ["A"], [0], {"n": 100}), {("A", 0): r1[("A", 0)]})
    with tempfile.TemporaryDirectory() as d2:  # a read-only folder of earlier results: found there, nothing written to it
        r3 = paired_runs(lambda v, s: {"score": -1.0}, ["A", "B", "C"], [0, 1, 2], {"n": 100}, cache_dir=d2, reuse=[d])
        test_eq([r3[(v, 0)] for v in "AB"], [r1[(v, 0)] for v in "AB"]); test_eq(r3[("C", 0)], {"score": -1.0})
        test_eq(len(list(Path(d).glob("*.json"))), 6); test_eq(len(list(Path(d2).glob("*.json"))), 3)
    test_fail(lambda: paired_runs(_toy, ["A"], [0], reuse=[f"{d}/nope"]), contains="reuse folders not found")
test_fail(lambda: paired_runs(_toy, ["A", "A"], [0]), contains="unique")
test_fail(lambda: paired_runs(_toy, ["A", "B"], [0], workers=2, threads_per_worker=2), contains="needs spawned workers")
_before = torch.get_num_threads()
_seen = paired_runs(lambda v, s: {"threads": torch.get_num_threads()}, ["A", "B"], [0], threads_per_worker=_before + 1)
test_eq({r["threads"] for r in _seen.values()}, {_before + 1})  # in-process runs use the requested threads...
test_eq(torch.get_num_threads(), _before)  # ...and the caller's count is restored
test_eq((_importable(_toy), _importable(functools.partial(json.dumps, indent=1))), (False, True))  # a notebook's function; a module's


# %% [markdown]
# ### How long a run took, and on how busy a machine
#
# Every default run must fit 10 minutes on an idle 2-core machine. Wall time only measures that on an idle
# machine, so a record also carries the CPU time (of the kernel and the worker processes it waited for) and
# the load average when the experiment started: on a loaded machine, CPU seconds / 2 is the honest estimate of
# the idle 2-core wall time, and the record says which one applies.

# %%
#| export
def _cpu_seconds() -> float:
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

class RunClock:
    "Started at the experiment's first cell; `fields()` gives `wall_s`, `cpu_s` and `load` for the claim records."
    def __init__(self):
        self.wall0, self.cpu0, self.load = time.time(), _cpu_seconds(), float(os.getloadavg()[0])
    def fields(self) -> dict[str, float]:
        return {"wall_s": time.time() - self.wall0, "cpu_s": _cpu_seconds() - self.cpu0, "load": self.load}

def idle_wall_estimate(record: dict, # a claim record
                       cores: int = 2, # the reference machine's cores
                       idle_load: float = 2.0, # a load average up to this counts as idle on that machine
                      ) -> float: # seconds
    "The record's wall time if it ran on an idle machine, else its CPU time spread over `cores`."
    return record["wall_s"] if record["load"] <= idle_load else record["cpu_s"] / cores


# %%
clock = RunClock(); sum(i * i for i in range(2_000_000)); f = clock.fields()
assert f["wall_s"] > 0 and f["cpu_s"] > 0 and f["load"] >= 0, f
test_eq(idle_wall_estimate({"wall_s": 900.0, "cpu_s": 1000.0, "load": 9.0}), 500.0)
test_eq(idle_wall_estimate({"wall_s": 300.0, "cpu_s": 580.0, "load": 0.5}), 300.0)

# %% [markdown]
# ## Records in notebooks and runs
#
# `show_claims` is the last call of every claim check: it judges the claims, adds provenance (git commit,
# whether the tree had uncommitted changes), displays the ledger table and embeds the records in the cell's
# output under the MIME type `application/vnd.moebook.claims+json`, and records them with
# `record_metrics(claims=...)` so a `moebook run` folder holds them too.

# %%
#| export
MIME = "application/vnd.moebook.claims+json"

def seal_runs(folder: str | Path, # a `cache_dir` of `paired_runs`, complete
              command: str, # the exact command that made the results
              made_at: dict | None = None, # {'commit', 'dirty'} of the code that made them (default: this checkout's now)
             ) -> dict: # the manifest
    "Write `manifest.json` beside cached run results: each file's SHA-256, the command, and the commit that made them."
    folder = Path(folder)
    files = sorted(f for f in folder.glob("*.json") if f.name != "manifest.json")
    if not files: raise EvidenceError(f"{folder}: no run results to seal")
    made_at = made_at or provenance()
    if set(made_at) != {"commit", "dirty"}: raise EvidenceError(f"made_at must have exactly the keys commit and dirty, got {sorted(made_at)}")
    manifest = dict(command=command, **made_at, files={f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest

def sealed_runs(folder: str | Path) -> dict:
    "The manifest of a folder written by `seal_runs`, once every result in it matches its SHA-256 and nothing was added."
    folder = Path(folder)
    if not (folder / "manifest.json").is_file(): raise EvidenceError(f"{folder}: no manifest.json (seal it with seal_runs)")
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {f.name for f in folder.glob("*.json") if f.name != "manifest.json"}
    if extra := sorted(on_disk - set(manifest["files"])): raise EvidenceError(f"{folder}: results not in the manifest: {extra}")
    for name, sha in manifest["files"].items():
        if not (folder / name).is_file(): raise EvidenceError(f"{folder / name}: listed in the manifest but missing")
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != sha: raise EvidenceError(f"{folder / name}: SHA-256 differs from the manifest")
    return manifest

def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"

def ledger_markdown(records: Iterable[dict], # claim records (as dicts), or pending rows
                    links: bool = False, # link each notebook name to its page
                   ) -> str:
    "The ledger as a markdown table: one row per claim."
    rows = ["| notebook | claim | metric (treatment vs control) | effect [95 % CI] | n, test | MDE | paper | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        nb = r["notebook"]; name = f"[{Path(nb).stem}]({nb})" if links else Path(nb).stem
        if r.get("status") == "pending":
            rows.append(f"| {name} | {r['id']}. {r['claim']} | – | – | – | – | – | pending (issue #{r['issue']}) |"); continue
        paper = (f"{r['paper_effect']:+g} {r.get('paper_metric', '')}".strip() if r.get("paper_effect") is not None else "–")
        star = "" if r.get("primary", True) else " (secondary)"
        rows.append(f"| {name} | {r['id']}. {r['claim']}{star} | {r['metric']} ({r['treatment']} vs {r['control']}) | "
                    f"{r['effect']:+.3g} [{r['ci'][0]:+.3g}, {r['ci'][1]:+.3g}] | {r['n']}, {r['test']} | {_fmt(r['mde'])} | "
                    f"{paper} | **{r['verdict']}** |")
    return "\n".join(rows)

def show_claims(claims: Sequence[Claim], # the notebook's claims, with estimates filled in
                **common, # fields shared by every claim (setting, seeds, params, device, and RunClock().fields())
               ) -> list[dict]: # the judged records
    "Judge `claims`, add provenance, display the ledger table with the records embedded, and record them."
    prov = provenance()
    judged = [judge(dataclasses.replace(c, **{**prov, **common})) for c in claims]
    ids = [c.id for c in judged]
    if len(set(ids)) != len(ids): raise EvidenceError(f"claim ids must be unique within a notebook, got {ids}")
    records = [to_jsonable(dataclasses.asdict(c)) for c in judged]
    md = ledger_markdown(records)
    try:
        from IPython.display import display
        display({"text/markdown": md, MIME: {"claims": records}}, raw=True)
    except ImportError: print(md)
    record_metrics(claims=records)
    return records


# %% [markdown]
# ### Reading records back
#
# `read_claims` accepts a committed (executed) notebook, a run folder written by `moebook run`, or a folder
# of runs. A paper notebook whose claim check has not yet been ported to this standard yields `pending`
# rows, one per paper claim, naming the issue that ports it.
#
# `agreement` compares two runs of the same claims (another thread count or machine): a rerun reproduces a
# claim when its effect moves by at most a quarter of the smaller 95 % CI half-width, a change no verdict
# should hinge on.

# %%
#| export
REQUIRED = [f.name for f in dataclasses.fields(Claim)]
PENDING = {  # notebook -> (issue that ports its claim check, the paper's headline claims)
}

def check_record(r: Any, source: str) -> dict:
    "Validate one record read from `source`; raise `EvidenceError` naming the file and the problem."
    if not isinstance(r, dict): raise EvidenceError(f"{source}: a claim record must be a JSON object, got {type(r).__name__}")
    missing = [k for k in REQUIRED if k not in r]
    if missing: raise EvidenceError(f"{source}: claim {r.get('id', '?')} lacks fields {missing}")
    if r["verdict"] not in VERDICTS:
        raise EvidenceError(f"{source}: claim {r['id']} has verdict {r['verdict']!r}, not one of {list(VERDICTS)}")
    return r

def _pending(notebook: str) -> list[dict]:
    issue, claims = PENDING[notebook]
    return [{"notebook": notebook, "id": str(i), "claim": c, "status": "pending", "issue": issue} for i, c in enumerate(claims, 1)]

def _from_notebook(path: Path) -> list[dict]:
    import nbformat
    try: nb = nbformat.read(path, as_version=4)
    except Exception as e: raise EvidenceError(f"{path}: not a readable notebook ({e})") from None
    code = [c for c in nb.cells if c.cell_type == "code"]
    found = [o["data"][MIME] for c in code for o in c.get("outputs", []) if MIME in o.get("data", {})]
    if found: return [check_record(r, str(path)) for bundle in found for r in bundle.get("claims", [])]
    if path.name in PENDING: return _pending(path.name)
    if not any(c.get("outputs") for c in code): raise EvidenceError(f"{path}: the notebook was never executed (no outputs)")
    raise EvidenceError(f"{path}: executed, but holds no claim records (no {MIME} output)")

def _from_run(run: Path) -> list[dict]:
    m = json.loads((run / "metrics.json").read_text())
    claims = m.get("metrics", {}).get("claims")
    if not claims: raise EvidenceError(f"{run}: the run folder holds no claims (metrics.json has no 'claims'; status {m.get('status')!r})")
    return [check_record(r, str(run / "metrics.json")) for r in claims]

def read_claims(path: str | Path) -> list[dict]:
    "Claim records from an executed notebook, a run folder, or a folder of run folders."
    p = Path(path)
    if not p.exists(): raise EvidenceError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix != ".ipynb": raise EvidenceError(f"{p}: expected a .ipynb notebook or a run folder")
        return _from_notebook(p)
    if (p / "metrics.json").exists(): return _from_run(p)
    runs = sorted(f.parent for f in p.glob("*/*/metrics.json"))
    if not runs: raise EvidenceError(f"{p}: neither a run folder (no metrics.json) nor a folder of runs")
    out = []
    for run in runs:
        claims = json.loads((run / "metrics.json").read_text()).get("metrics", {}).get("claims")
        if claims: out += [check_record(r, str(run / "metrics.json")) for r in claims]
    if not out: raise EvidenceError(f"{p}: none of its {len(runs)} runs holds claim records")
    return out

def agreement(reference: Sequence[dict], # claim records of one run
              rerun: Sequence[dict], # records of the same claims from a rerun (another thread count, machine, ...)
              tolerance: float = 0.25, # allowed |effect difference| as a fraction of the CI half-width
             ) -> list[dict]: # per claim: both effects, the smaller half-width, their ratio and `agree`
    "Whether a rerun reproduces every claim's effect to within `tolerance` of the smaller of the two 95 % CI half-widths."
    ref = {r["id"]: r for r in reference if r.get("status") != "pending"}
    new = {r["id"]: r for r in rerun if r.get("status") != "pending"}
    if set(ref) != set(new): raise EvidenceError(f"the runs judge different claims: {sorted(set(ref) ^ set(new))}")
    rows = []
    for cid, a in ref.items():
        b = new[cid]
        half = min(a["ci"][1] - a["ci"][0], b["ci"][1] - b["ci"][0]) / 2
        gap = abs(b["effect"] - a["effect"])
        ratio = gap / half if half > 0 else (0.0 if gap == 0 else math.inf)
        rows.append({"id": cid, "effect": a["effect"], "rerun_effect": b["effect"], "half_width": half, "ratio": ratio,
                     "agree": ratio <= tolerance, "verdict": a["verdict"], "rerun_verdict": b["verdict"]})
    return rows


# %% [markdown]
# ## The command line and the README
#
# `moebook claims PATH...` prints the ledger (`--json`: the records). `readme_ledger` builds the README's
# claim table from the committed notebooks; it accepts only records made at the `default` or `evidence`
# setting from a clean tree, so a smoke run or an uncommitted experiment never reaches the README.

# %%
#| export
PAPER_NOTEBOOKS = ("02_global_lbl.ipynb", "03_moe_cpt.ipynb", "04_mtti_ensad.ipynb", "05_vidcap_pseudolabels.ipynb",
                   "06_causal_world_models.ipynb")

def claims_command(paths: Sequence[str], # notebooks, run folders or folders of runs
                   as_json: bool = False, # print the records as JSON instead of the table
                  ) -> int: # exit status
    "`moebook claims`: print the ledger of `paths`; raises `EvidenceError` on bad input."
    if not paths: raise EvidenceError("give at least one notebook, run folder or runs folder")
    records = [r for p in paths for r in read_claims(p)]
    print(json.dumps(records, indent=2) if as_json else ledger_markdown(records))
    return 0

def readme_ledger(root: str | Path | None = None, # project root (default: this checkout)
                 ) -> str: # the markdown claim table of the committed paper notebooks
    "The README's claim table, read from the committed executed paper notebooks."
    root = Path(root) if root else _repo_root()
    records = [r for nb in PAPER_NOTEBOOKS for r in read_claims(root / "nbs" / nb)]
    for r in records:
        if r.get("status") == "pending": continue
        if r["setting"] not in ("default", "evidence") or r["dirty"] is not False:
            raise EvidenceError(f"nbs/{r['notebook']}: claim {r['id']} comes from a {r['setting']} run with dirty={r['dirty']}; "
                                "the README takes only default or evidence runs from a clean tree (commit, then execute)")
    return ledger_markdown(records, links=True)


# %%
demo = [to_jsonable(dataclasses.asdict(dataclasses.replace(strong, setting="default", dirty=False, commit="abc")))]
with tempfile.TemporaryDirectory() as d:
    run = Path(d) / "05_x" / "20260101-000000-abc"; run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "metrics": {"claims": demo}}))
    test_eq(read_claims(run), demo); test_eq(read_claims(d), demo)
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "metrics": {}}))
    test_fail(lambda: read_claims(run), contains="holds no claims")
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "metrics": {"claims": [{**demo[0], "verdict": "probably"}]}}))
    test_fail(lambda: read_claims(run), contains="not one of")
test_fail(lambda: read_claims("nope.ipynb"), contains="no such file")
shift = lambda r, frac: {**r, "effect": r["effect"] + frac * (r["ci"][1] - r["ci"][0]) / 2}
test_eq([row["agree"] for row in agreement(demo, [shift(demo[0], 0.2)])], [True])
test_eq([row["agree"] for row in agreement(demo, [shift(demo[0], -0.3)])], [False])
test_close(agreement(demo, [shift(demo[0], 0.2)])[0]["ratio"], 0.2, eps=1e-9)
test_fail(lambda: agreement(demo, [{**demo[0], "id": "other"}]), contains="judge different claims")
pending_demo = {"notebook": "07_example.ipynb", "id": "1", "claim": "a claim whose notebook is not ported yet", "status": "pending", "issue": 99}
display(Markdown(ledger_markdown(demo + [pending_demo])))

# %% [markdown]
# ## A forest plot of the ledger
#
# Each claim's effect and 95 % CI on the scale of the benefit the paper predicts (so right of zero is
# always the paper's direction), with its target or margin marked and the colour of its verdict.

# %%
#| export
COLOURS = {"supported": "tab:green", "not supported": "tab:red", "inconclusive": "tab:orange", "not testable here": "tab:grey"}

def forest_plot(records: Sequence[dict], # judged claim records (pending rows are skipped)
                ax=None, # matplotlib Axes (new figure if None)
               ):
    "Effects with 95 % CIs, signed so that positive is the paper's predicted direction, coloured by verdict."
    import matplotlib.pyplot as plt
    rs = [r for r in records if r.get("status") != "pending"]
    if ax is None: _, ax = plt.subplots(figsize=(8, 0.45 * len(rs) + 1.2))
    for i, r in enumerate(rs):
        s = 1 if r["direction"] == "increase" else -1
        lo, hi = sorted((s * r["ci"][0], s * r["ci"][1])); scale = max(abs(lo), abs(hi), r.get("target") or r.get("margin") or 0, 1e-12)
        ax.plot([lo / scale, hi / scale], [i, i], color=COLOURS[r["verdict"]], lw=3)
        ax.plot([s * r["effect"] / scale], [i], "o", color=COLOURS[r["verdict"]])
        ref = r.get("target") if r["kind"] == "superiority" else -r["margin"]
        ax.plot([ref / scale], [i], "|", color="k", ms=12)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rs)), [f"{Path(r['notebook']).stem[:2]} #{r['id']}: {r['verdict']}" for r in rs], fontsize=8)
    ax.invert_yaxis(); ax.set_xlabel("benefit in the paper's direction (each row scaled to its largest |value|; | = target or -margin)")
    return ax


# %%
recs = [to_jsonable(dataclasses.asdict(c)) for c in (strong, wrong_way, null, blocked)]
forest_plot(recs); plt.tight_layout(); plt.show()

# %% [markdown]
# ## The ledger of this repository
#
# The claim checks of the committed paper notebooks, read with `read_claims` (this is what `moebook claims
# nbs/0[2-6]*.ipynb` prints and what the README shows).

# %%
root = _repo_root()
ledger = [r for nb in PAPER_NOTEBOOKS for r in read_claims(root / "nbs" / nb)]
display(Markdown(ledger_markdown(ledger)))
if any(r.get("status") != "pending" for r in ledger): forest_plot(ledger); plt.tight_layout(); plt.show()
