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
# | notebook | paper | module | default run |
# |---|---|---|---|
# | [MoE core](01_moe.ipynb) | routers (top-k, Switch, DeepSeek fine-grained + shared, Sinkhorn), LBL and z-loss, grouped dispatch, telemetry, `MoeLM` | `moebook.moe` | 1 min |
# | [Training loop](01a_train.ipynb) | AdamW + accumulation, atomic checkpoints with exact resume, DDP via `torchrun` | `moebook.train` | 1 min |
# | [Learning-rate schedules](01b_schedules.ipynb) | warmup + cosine, re-warm/re-decay, infinite schedules (Ibrahim et al. 2024) | `moebook.schedules` | 10 s |
# | [Multi-domain corpus](02a_corpus.ipynb) | English / Python code / arithmetic / Unicode text from the Python install, byte-level BPE | `moebook.corpus` | 20 s |
# | [Global-batch load balancing](02_global_lbl.ipynb) | Qiu et al. 2025, "Demons in the Detail" (arXiv 2501.11873) | `moebook.global_lbl` | 3 min |
# | [Continual pre-training of MoEs](03_moe_cpt.ipynb) | Thérien et al. 2025, "How robust is your router?" (arXiv 2503.05029) | `moebook.cpt` | 8 min |
# | [Multilingual text-to-image (EnsAd)](04_mtti_ensad.ipynb) | Li et al., ACL 2023 (arXiv 2305.19216) | `moebook.mtti` | 3.5 min |
# | [Video captioning from pseudolabels](05_vidcap_pseudolabels.ipynb) | Lialin et al. 2023 (arXiv 2304.02080) | `moebook.vidcap` | 5 min |
# | [Causal world models](06_causal_world_models.ipynb) | Gkountouras et al., ICLR 2025 (arXiv 2410.19923) | `moebook.causal` | 6.5 min |
# | [Core utilities](00_core.ipynb) | seeds, metrics, progress bars, atomic files | `moebook.core` | 10 s |
# | [Experiment runner](90_runner.ipynb) | `moebook run` / `moebook runs` | `moebook.runner` | 10 s |
# | [Website builder](91_site.ipynb) | Quarto site or the nbconvert preview, README | `moebook.site` | 15 s |
#
# *Default run*: wall time of `moebook run nbs/<notebook>.ipynb` at its default parameters on an idle 2-core CPU
# (measured 2026-11-23; all of them, as `make run` executes them: about 30 minutes).
#
# Benchmarks live in `benchmarks/` (see its README for the commands and the recorded JSON results).

# %% [markdown]
# ## Claim checks
#
# Every paper notebook ends with a claim check: the paper's headline claims, what the committed run of the
# notebook measured (its default, CPU-sized setting: tiny models, minutes of training) and a verdict. The
# numbers below are copied from those executed notebooks; follow the links for tables, spreads and plots.
# At this scale most effects are small relative to seed noise, and we say so rather than round them up.
#
# | paper (notebook) | claim | our measurement | verdict |
# |---|---|---|---|
# | MoE core ([01](01_moe.ipynb)) | balanced routing gives LBL = 1; grouped dispatch = per-token loop; global-scope gradients = single process | LBL 1.0 at balance; max dispatch error 1.2e-7 (fp32); gradient error 7e-18 (fp64); 2-rank gloo checks in `tests/` | supported |
# | Global LBL ([02](02_global_lbl.ipynb)) | (1) global-batch LBL lowers perplexity | avg PPL micro 416.4 ± 13.5 vs global 416.8 ± 14.6 (2 seeds) | inconclusive (within seed noise) |
# | | (2) global-batch LBL increases domain specialisation | I(domain; expert) 0.230 → 0.409 | supported |
# | | (3) the gain comes from diversity (shuffle ablation) | sampled-token balance: I = 0.534 | supported on specialisation only |
# | | (4) the synchronisation overhead is small | +26 ± 2 % step time (2 gloo ranks on an idle 2-core CPU, 130 ms steps) | not supported at this scale (latency-bound; paper: +5.8 % on 1.5 s steps) |
# | MoE CPT ([03](03_moe_cpt.ipynb)) | (1) routers do not worsen forgetting vs dense | worst MoE forgets 0.17 nats more than dense (replay 0) | not supported at toy scale |
# | | (2) balance on the old distribution is kept | aux+z: D1 max-violation spikes, partly recovers; Sinkhorn moves little but is unbalanced at inference | not supported |
# | | (3) replay + re-warm/re-decay suffices | replay 0.3 removes forgetting; D2 loss 2–5 % above re-training | not supported (2 % threshold) |
# | | (4) CPT matches full re-training at a fraction of the cost | mean loss 3–7 % worse than re-training at 33 % of its compute | not supported |
# | mTTI / EnsAd ([04](04_mtti_ensad.ipynb)) | (1) translation-based methods vs zero-shot transfer | Translate Test better FID, worse attribute accuracy in all 3 languages | inconclusive |
# | | (2) EnsAd beats the best single translation in every language | better FID in de and ru, worse in es | partly supported (2 of 3) |
# | | (3) more translations help; attention vs mean pooling | FID 858 → 732 from 0 to 3 translations; mean pooling has better FID, attention better accuracy | supported / inconclusive |
# | Video captioning ([05](05_vidcap_pseudolabels.ipynb)) | (1) pseudolabels pre-train better than ASR-like captions; (2) images + videos beat either alone | default run (seed 0): pseudolabels 2.22 vs ASR-like 0.96; images + videos 2.65 vs images only 2.83. 3 seeds: pseudolabels 2.38 ± 0.31 vs ASR-like 1.27 ± 0.23; images + videos 2.72 ± 0.05 vs images 2.04 ± 0.83, videos 2.38 ± 0.31 (CIDEr) | (1) supported, (2) inconclusive (3 seeds; seed 0 alone says not supported) |
# | Causal world models ([06](06_causal_world_models.ipynb)) | (1) the causal world model beats the LLM-only reasoner | inference accuracy, world model vs LM (50 problems): h=1 0.61 vs 0.29, h=8 0.31 vs 0.29; planning success (20 goals per horizon) 0.05 vs 0.05 at h=2, 0 vs 0 at h=4 and 8 | supported for short-horizon inference; not for planning (neither planner works at this scale) |
# | | (2) the gap grows with the horizon | inference gap +0.32 (h=1) → +0.01 (h=8) | not supported (it shrinks) |

# %%
#| hide
from moebook.runner import list_runs, format_runs

# %%
#| hide
if show_runs: print(format_runs(list_runs("../runs")))
