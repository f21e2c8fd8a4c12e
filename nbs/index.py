# %% [markdown]
# # moebook
#
# > Five recent papers on mixture-of-experts training and multimodal learning, re-implemented as
# > literate notebooks, one tested Python package and one website.

# %% tags=["parameters"]
#| hide
show_runs: bool = False  # list the recorded runs below the summary

# %% [markdown]
# ## Quick start
#
# Two commands, on a fresh clone (2 CPU cores are enough; no GPU, no model hub):
#
# ```sh
# make run    # venv + install, run every notebook with papermill (small defaults), build the website
# make test   # venv + install, run the test suite, every notebook once (this is what CI runs)
# ```
#
# `make test` on a fresh clone took 8.3 minutes on an idle 2-core machine (2026-12-03, commit 301dbfa: 1.7 min
# install, 6.6 min of tests in 2 pytest-xdist processes, every notebook once as a papermill smoke run); on the same
# machine the time of one suite has varied by up to 1.5x between days. `make test-fast` (no notebooks, no
# processes) takes about 1 minute.
#
# `make run` prints where the executed notebooks (`runs/`) and the website (`_site/index.html`) are.
#
# ### Run one experiment with parameters
#
# ```sh
# .venv/bin/moebook run nbs/02_global_lbl.ipynb -p steps 400 -p seed 1                # one run
# .venv/bin/moebook run nbs/02_global_lbl.ipynb --sweep lr=1e-3,3e-3 --sweep seed=0,1  # a sweep: 4 runs
# .venv/bin/moebook runs                                                              # table of recorded runs
# .venv/bin/moebook claims nbs/05_vidcap_pseudolabels.ipynb runs                      # the claim ledger
# ```
#
# Parameters are checked against the notebook's `parameters` cell before anything executes: an unknown
# name or a value of the wrong type stops with exit code 2 and a message naming it. `-p` takes a value as
# written (a comma is just a character); sweeps are explicit. Re-running a sweep skips the combinations
# already recorded `ok` at the same clean commit (`--force` runs them again); interrupted and failed runs are
# recorded with that status. Each run writes
# `runs/<notebook>/<timestamp>-<hash>/` with the executed notebook and `metrics.json` (the notebook's
# metrics and claim records, parameters, seed, git commit, package versions, wall time). To fan a sweep out over several
# machines, give each machine the same command plus `--shard i/n` (machine `i` of `n` runs every
# `n`-th combination), then copy the `runs/` folders together: `moebook runs` reads them all.
#
# ### Preview the website
#
# ```sh
# make site                                   # processes nbs/ and renders _site/
# python -m http.server -d _site 8000         # then open http://localhost:8000
# ```
#
# `_quarto.yml` is the site's configuration. `make site` runs `quarto render` when Quarto is installed;
# without Quarto it builds a static preview of the same processed notebooks with `nbconvert` (every page,
# figures embedded, the sidebar from `_quarto.yml`) and says so on every page.
#
# ### Use the package
#
# ```python
# import moebook
# from moebook.core import seed_everything, record_metrics
# ```
#
# ## Source of truth
#
# The notebooks in `nbs/` are the source of everything: `nbdev_export` writes the `moebook/` package from
# their `#| export` cells (never edit `moebook/` by hand), and the site renders them. Each `nbs/X.ipynb`
# is paired with a `nbs/X.py` (jupytext, py:percent) for reviewable diffs: edit either in JupyterLab
# (`make lab`), or edit the `.py` and run `make sync`; then `make export` and `make clean-nbs`. Tests
# check that the pair, the export and the cleaning are all in sync.
#
# ## Topics
#
# | notebook | paper | module | default run |
# |---|---|---|---|
# | [MoE core](01_moe.ipynb) | routers (top-k, Switch, DeepSeek fine-grained + shared, Sinkhorn), LBL and z-loss, grouped dispatch, telemetry, `MoeLM` | `moebook.moe` | 1 min |
# | [Training loop](01a_train.ipynb) | AdamW + accumulation, atomic checkpoints with exact resume, DDP via `torchrun` | `moebook.train` | 1 min |
# | [Learning-rate schedules](01b_schedules.ipynb) | warmup + cosine, re-warm/re-decay, infinite schedules (Ibrahim et al. 2024) | `moebook.schedules` | 10 s |
# | [Multi-domain corpus](02a_corpus.ipynb) | English / Python code / arithmetic / Unicode text from the Python install, a synthetic word-chain language, byte-level BPE | `moebook.corpus` | 20 s |
# | [Global-batch load balancing](02_global_lbl.ipynb) | Qiu et al. 2025, "Demons in the Detail" (arXiv 2501.11873) | `moebook.global_lbl` | 3 min |
# | [Continual pre-training of MoEs](03_moe_cpt.ipynb) | Thérien et al. 2025, "How robust is your router?" (arXiv 2503.05029) | `moebook.cpt` | 8 min* |
# | [Multilingual text-to-image (EnsAd)](04_mtti_ensad.ipynb) | Li et al., ACL 2023 (arXiv 2305.19216) | `moebook.mtti` | 6 min* |
# | [Video captioning from pseudolabels](05_vidcap_pseudolabels.ipynb) | Lialin et al. 2023 (arXiv 2304.02080) | `moebook.vidcap` | 10 s* |
# | [Causal world models](06_causal_world_models.ipynb) | Gkountouras et al., ICLR 2025 (arXiv 2410.19923) | `moebook.causal` | 1 min* |
# | [Core utilities](00_core.ipynb) | seeds, metrics, progress bars, atomic files | `moebook.core` | 10 s |
# | [Evidence: the claim ledger](00a_evidence.ipynb) | claim records, paired estimates with CIs and MDE, the verdict rule, paired runs | `moebook.evidence` | 15 s |
# | [Experiment runner](90_runner.ipynb) | `moebook run` / `moebook runs` | `moebook.runner` | 10 s |
# | [Website builder](91_site.ipynb) | Quarto site or the nbconvert preview, README | `moebook.site` | 15 s |
#
# *Default run*: wall time of `moebook run nbs/<notebook>.ipynb` at its default parameters on an idle 2-core CPU
# (measured 2026-11-23). \*Redesigned on 2026-12-02 and executed on a loaded machine, so the time is the one
# the claim records give (whole notebook after the imports; wall time when the load was ≤ 2, else CPU-seconds /
# 2): mTTI 734 CPU-s; video captioning loads its 60 sealed runs (`data/vidcap_runs`, 4,117 CPU-s to make, about
# 34 idle minutes, `-p evidence_runs ""`); CPT loads its committed pre-trained models (837 CPU-s, 450 s wall at an idle load of 0.7); causal world models load their committed checkpoints (113 CPU-s).
# Kernel start-up and imports add about 20 s to each.
#
# Benchmarks live in `benchmarks/` (see its README for the commands and the recorded JSON results).

# %% [markdown]
# ## Claim checks
#
# Every paper notebook ends with a claim check, and every claim check follows one standard of evidence
# ([Evidence: the claim ledger](00a_evidence.ipynb)): the claim's metric, direction, margin and
# preconditions are fixed before the experiment; variants are compared on paired seeds; each effect has a
# 95 % confidence interval from `scipy.stats` and a minimum detectable effect; the metric's trivial baselines
# are reported beside it; and one rule gives `supported`, `not supported`, `inconclusive` or
# `not testable here` (a precondition of the paper's effect, such as a model trained to a plateau, was not
# met). Our settings are CPU-sized toy versions of the papers' experiments, so a verdict here speaks about the
# mechanism at this scale, never about the paper's numbers.
#
# The table below is generated by `moebook readme` from the claim records embedded in the committed,
# executed notebooks (the same records `moebook claims nbs/0[2-6]*.ipynb` prints); a test fails when it
# differs from them. Notebooks whose claim checks are still being redesigned to this standard show their
# claims as *pending*, with the issue that ports them.
#
# <!-- claim-ledger -->

# %%
#| hide
from moebook.runner import list_runs, format_runs

# %%
#| hide
if show_runs: print(format_runs(list_runs("../runs")))
