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
# make test   # venv + install, run the whole test suite (this is what CI runs)
# ```
#
# `make run` prints where the executed notebooks (`runs/`) and the website (`_site/index.html`) are.
#
# ### Run one experiment with parameters
#
# ```sh
# .venv/bin/moebook run nbs/02_global_lbl.ipynb -p steps 400 -p seed 1      # one run
# .venv/bin/moebook run nbs/02_global_lbl.ipynb -p lr 1e-3,3e-3 -p seed 0,1  # a sweep: 4 runs
# .venv/bin/moebook runs                                                      # table of recorded runs
# ```
#
# Parameters are checked against the notebook's `parameters` cell before anything executes: an unknown
# name or a value of the wrong type stops with exit code 2 and a message naming it. Each run writes
# `runs/<notebook>/<timestamp>-<hash>/` with the executed notebook and `metrics.json` (the notebook's
# metrics, parameters, seed, git commit, package versions, wall time). To fan a sweep out over several
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
# | notebook | paper | module |
# |---|---|---|
# | [Core utilities](00_core.ipynb) | — | `moebook.core` |
# | [Experiment runner](90_runner.ipynb) | — | `moebook.runner` |
# | [Website builder](91_site.ipynb) | — | `moebook.site` |

# %% [markdown]
# ## Claim checks
#
# Every paper notebook ends with a claim check: the paper's headline claims, what our run measured and
# a verdict. Their summary:
#
# | paper | claim | our measurement | verdict |
# |---|---|---|---|
# | — | *filled in as the paper notebooks land* | | |

# %%
#| hide
from moebook.runner import list_runs, format_runs

# %%
#| hide
if show_runs: print(format_runs(list_runs("../runs")))
