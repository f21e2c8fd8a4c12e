# %% [markdown]
# # Global-batch load balancing ("Demons in the Detail")
#
# > Where the load-balancing loss counts its tokens decides whether MoE experts may specialise: micro-batch,
# > sequence, gradient-accumulation buffer, all-reduce over data-parallel ranks, and a random-token-sample control.

# %% [markdown]
# **Paper.** Qiu et al. (Qwen), *Demons in the Detail: On Implementing Load Balancing Loss for Training
# Specialized Mixture-of-Expert Models*, arXiv 2501.11873 (ACL 2025).
#
# **Question.** MoE frameworks compute the load-balancing loss `LBL = E · Σ_i f_i P_i` inside each micro-batch,
# then average over micro-batches and ranks. A micro-batch holds a handful of sequences, usually of one
# domain, so the loss asks for uniform routing *within every domain*, which forbids domain experts. Does
# computing `f` over the whole global batch (all micro-batches of an optimizer step, all data-parallel ranks)
# let the experts specialise and lower perplexity? And is that because the balance statistics are *bigger*, or
# because they are more *diverse*?
#
# **Idea.** Only the length-E count vector `f` needs to be global: all-reduce it across ranks and accumulate it
# over gradient-accumulation micro-steps in a buffer that is reset at each optimizer step (the paper's
# Algorithm 1); `P` stays local. The paper's shuffle ablation computes `f` from a micro-batch-*sized* random
# sample of the global batch's tokens: diversity without size.
#
# **Here.** Tiny `MoeLM`s (`moebook.moe`: fine-grained routed experts + a shared expert, top-k softmax, aux + z
# losses, dropless) trained with `moebook.train` on the four-domain corpus of `moebook.corpus`, whose
# micro-batches are domain-homogeneous (as long packed pre-training sequences are). Everything is identical
# between runs except the balance scope. This module adds only what the experiment needs on top of those:
# the random-sample balancer, routing capture, per-domain evaluation and specialisation metrics, and the
# experiment driver (single process or `torchrun`).

# %%
#| default_exp global_lbl

# %%
#| export
from __future__ import annotations
import dataclasses, json, math, os, sys, tempfile, time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import moebook
from moebook.core import seed_everything
from moebook.corpus import Corpus, CorpusRecipe, load_corpus, stable_hash
from moebook.moe import GlobalBalancer, MoELayer, MoeLM, MoeLMConfig, RouterOutput, capture_routing, expert_counts
from moebook.schedules import WarmupCosine
from moebook.train import TrainConfig, close_distributed, init_distributed, load_checkpoint, run_torchrun, save_checkpoint, train
import concurrent.futures as cf
import multiprocessing as mp
from moebook.core import progress as progress_bar

# %%
import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_ne, test_fail, test_close
from moebook.core import record_metrics, pick_device
from moebook.moe import load_balancing_loss

# %% tags=["parameters"]
seed: int = 0  # first seed; runs use seed, seed+1, ... (model init, data order and token samples)
progress: bool = True  # show progress bars
n_seeds: int = 2  # seeds per variant (the spread is the seed noise the claims are judged against)
steps: int = 100  # optimizer steps per run
n_micro: int = 8  # micro-batches per optimizer step (gradient accumulation x data-parallel ranks)
batch_size: int = 2  # sequences per micro-batch (the micro balance BSZ)
seq_len: int = 64  # tokens per sequence
d_model: int = 64  # width of the MoeLM
n_layers: int = 2  # decoder blocks, all MoE
n_experts: int = 16  # fine-grained routed experts per layer
top_k: int = 4  # routed experts per token
d_ff_expert: int = 32  # hidden width of each routed and shared expert
n_shared_experts: int = 1  # always-on shared experts
aux_loss_coef: float = 0.01  # load-balancing loss coefficient (paper: 0.008)
z_loss_coef: float = 0.001  # router z-loss coefficient
lr: float = 3e-3  # peak AdamW learning rate (warmup + cosine)
corpus_bytes: int = 1500000  # text budget per domain of the corpus recipe (1.5 MB: the committed default corpus)
vocab_size: int = 4096  # BPE vocabulary of the corpus recipe
eval_batches: int = 8  # validation micro-batches per domain
workers: int = 2  # parallel processes for the single-process runs (1: run them in this process)
ddp: bool = True  # also run the 2-rank torchrun variants (global via all-reduce, micro for the timing)
ckpt_dir: str = ""  # folder where runs checkpoint and resume (empty: no checkpoints)
device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda" for the single-process runs; 2-rank runs use gloo on the CPU


# %% [markdown]
# **Scale-up** (longer training, more seeds, e.g. on a GPU; not timed here):
# `moebook run nbs/02_global_lbl.ipynb -p steps 1000 -p n_seeds 4 -p d_model 256 -p n_layers 4 -p device cuda`

# %% [markdown]
# ## The experiment's configuration
#
# `ExperimentConfig` holds everything a run depends on except the balance variant; it is plain data, so it
# travels as JSON to `torchrun` workers and to spawned processes. `model_config` builds the `MoeLMConfig`
# (no renormalisation of the top-k gates, so the top-k routing-score sum is meaningful), `recipe` the corpus.

# %%
#| export
@dataclass(frozen=True)
class ExperimentConfig:
    "Model, data and optimisation settings shared by every balance variant of one seed."
    steps: int = 100            # optimizer steps
    n_micro: int = 8            # micro-batches per optimizer step (= grad accumulation x data-parallel ranks)
    batch_size: int = 2         # sequences per micro-batch (the micro balance BSZ)
    seq_len: int = 64           # tokens per sequence
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 16         # routed experts per MoE layer
    top_k: int = 4
    d_ff_expert: int = 32
    n_shared_experts: int = 1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    lr: float = 3e-3
    weight_decay: float = 0.1
    corpus_bytes: int = 1_500_000  # CorpusRecipe.max_bytes_per_domain
    vocab_size: int = 4096         # CorpusRecipe.vocab_size
    eval_batches: int = 8          # validation micro-batches (batch_size x seq_len) per domain
    seed: int = 0
    device: str = "cpu"            # single-process runs train here; data-parallel runs use gloo on the CPU

    def __post_init__(self):
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"ExperimentConfig.device must be a device name such as 'cpu' or 'cuda', got {self.device!r}")
        for f in dataclasses.fields(self):
            if f.name == "device": continue
            v = getattr(self, f.name)
            want = float if f.type == "float" else int
            if isinstance(v, bool) or not isinstance(v, (int, float) if want is float else int):
                raise TypeError(f"ExperimentConfig.{f.name} must be {want.__name__}, got {type(v).__name__} ({v!r})")
            if v < 0 or (v == 0 and f.name not in ("seed", "weight_decay", "aux_loss_coef", "z_loss_coef", "n_shared_experts")):
                raise ValueError(f"ExperimentConfig.{f.name} must be {'>= 0' if f.name == 'seed' else '> 0'}, got {v!r}")
        if self.top_k > self.n_experts: raise ValueError(f"top_k={self.top_k} > n_experts={self.n_experts}")

    def recipe(self) -> CorpusRecipe:
        "The corpus recipe (the tokenizer sample rule of `02a_corpus`, so the default is the committed corpus)."
        return CorpusRecipe(max_bytes_per_domain=self.corpus_bytes, vocab_size=self.vocab_size,
                            tokenizer_sample_bytes=min(CorpusRecipe().tokenizer_sample_bytes, self.corpus_bytes // 2))

    def model_config(self, vocab_size: int, lb_scope: str) -> MoeLMConfig:
        "The MoeLM of this experiment with balance scope `lb_scope` ('micro', 'sequence' or 'global')."
        return MoeLMConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_ff=self.top_k * self.d_ff_expert, n_experts=self.n_experts, num_experts_per_tok=self.top_k,
                           d_ff_expert=self.d_ff_expert, n_shared_experts=self.n_shared_experts, router="softmax",
                           norm_topk_prob=False, capacity_factor=None, aux_loss_coef=self.aux_loss_coef,
                           z_loss_coef=self.z_loss_coef, lb_scope=lb_scope)


# %%
test_eq(ExperimentConfig().recipe(), CorpusRecipe())  # the default experiment uses the committed default corpus
test_eq(ExperimentConfig().model_config(300, "global").lb_scope, "global")
test_fail(lambda: ExperimentConfig(steps=2.5), contains="ExperimentConfig.steps must be int")
test_fail(lambda: ExperimentConfig(n_micro=0), contains="ExperimentConfig.n_micro must be > 0")
test_fail(lambda: ExperimentConfig(top_k=5, n_experts=4), contains="top_k=5 > n_experts=4")
test_eq(ExperimentConfig(lr=1).lr, 1)  # an int is a fine float

# %% [markdown]
# ## The balance variants
#
# | variant | f is counted over | how | world |
# |---|---|---|---|
# | `micro` | one micro-batch (`batch_size` sequences of one domain) | `lb_scope="micro"` | 1 process, `n_micro` accumulation steps |
# | `sequence` | one sequence | `lb_scope="sequence"` | 1 process |
# | `global` | all micro-batches of the step so far | `GlobalBalancer` buffer, reset after each optimizer step | 1 process |
# | `global_dp` | all micro-batches of both ranks so far | `GlobalBalancer`: all-reduce + buffer | `torchrun`, 2 ranks |
# | `micro_dp` | one micro-batch per rank | `lb_scope="micro"` | `torchrun`, 2 ranks (timing reference) |
# | `sampled` | a random sample of `batch_size·seq_len` tokens of the whole global batch, new at every micro-step | `SampledBalancer` | 1 process |
# | `micro_shuffled` | one micro-batch of sequences regrouped across domains | `corpus.shuffled_global_batch`, `lb_scope="micro"` | 1 process |
#
# All variants see the same sequences at every optimizer step, so the LM part of the gradient of a step is
# the same function of the weights; only the balance term differs.
#
# **The shuffle ablation, decided.** The paper keeps the training micro-batches as they are and changes only
# the tokens the balance statistics `f` are computed on: a micro-batch-sized random sample of the global batch.
# That is `sampled`: at the start of each optimizer step the weights are fixed until the optimizer step, so a
# no-grad forward of the whole global batch gives exactly the routing the training forwards will use; we draw
# one sample of `batch_size·seq_len` tokens per micro-step (without replacement, seeded by seed and step) and
# use its expert counts as `f`, while `P` is the micro-batch's own mean router probability (as in the global
# formula: `f` is the only thing that changes). This costs one extra forward per step. `micro_shuffled` is a
# second, coarser control built on `corpus.shuffled_global_batch`: it regroups whole *sequences* across
# micro-batches, so the micro-batches themselves (the LM loss terms are the same, only grouped differently)
# become mixed-domain and the ordinary micro scope sees diversity at sequence granularity.

# %%
#| export
VARIANTS = ("micro", "sequence", "global", "global_dp", "micro_dp", "sampled", "micro_shuffled")
DP_VARIANTS = ("global_dp", "micro_dp")  # need torchrun with 2 (or more) ranks

def variant_scope(variant: str) -> str:
    "The `MoeLMConfig.lb_scope` of `variant`."
    if variant not in VARIANTS: raise ValueError(f"unknown variant {variant!r}; the variants are {VARIANTS}")
    return {"micro": "micro", "micro_dp": "micro", "micro_shuffled": "micro", "sequence": "sequence"}.get(variant, "global")


# %%
test_eq([variant_scope(v) for v in VARIANTS], ["micro", "sequence", "global", "global", "micro", "global", "micro"])
test_fail(lambda: variant_scope("batch"), contains="unknown variant 'batch'")


# %% [markdown]
# ## Capturing the routing
#
# `moebook.moe.capture_routing(model)` records the `RouterOutput` (full softmax `probs (T, E)`, chosen
# `expert_idx (T, k)`) of every MoE layer's forward passes through forward hooks. `block_routes` keys them by
# block index: the `layer` a MoeLM passes to its balancer.

# %%
#| export
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    "The model inside a `DistributedDataParallel` wrapper (or the model itself)."
    return getattr(model, "module", model)

def moe_layer_indices(model: torch.nn.Module) -> list[int]:
    "Block indices of the MoE layers of a MoeLM."
    return [i for i, b in enumerate(unwrap(model).blocks) if isinstance(b.ffn, MoELayer)]

def block_routes(model: torch.nn.Module, # the MoeLM (or DDP-wrapped MoeLM) that `cap` watched
                 cap: capture_routing, # a finished capture
                ) -> dict[int, list[RouterOutput]]: # block index -> RouterOutput of each forward
    "The routing `cap` recorded, keyed by MoeLM block index."
    return dict(zip(moe_layer_indices(model), cap.outputs))


# %%
seed_everything(seed)
tiny_cfg = ExperimentConfig(d_model=16, n_heads=2, n_experts=4, top_k=2, d_ff_expert=8)
tiny = MoeLM(tiny_cfg.model_config(50, "micro"))
ids = torch.randint(0, 50, (3, 7))
with capture_routing(tiny) as cap: tiny(ids); tiny(ids[:1])
rec = block_routes(tiny, cap)
test_eq(sorted(rec), [0, 1]); test_eq(len(rec[0]), 2)
test_eq(rec[1][0].expert_idx.shape, (21, 2)); test_eq(rec[1][1].probs.shape, (7, 4))
part_moe = MoeLM(MoeLMConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=3, moe_layers=[1, 2], n_experts=4,
                             num_experts_per_tok=2, d_ff_expert=8))
with capture_routing(part_moe) as cap: part_moe(ids)
test_eq(sorted(block_routes(part_moe, cap)), [1, 2])  # block indices, not positions among the MoE layers


# %% [markdown]
# ## The random-sample balancer (shuffle ablation)
#
# `SampledBalancer` is a `GlobalBalancer` (so `MoeLM` uses it through `lb_scope="global"`) whose `fractions`
# returns `f` from the token sample drawn for the current micro-step by `prepare`, and the local token count as
# `P`'s normaliser, so the loss is `E · Σ_i f_i^{sample} P_i^{micro}`. It is single-process only.

# %%
#| export
class SampledBalancer(GlobalBalancer):
    "f from a random `n_sample`-token sample of the whole global batch, new at every micro-step; P stays local."
    def __init__(self, n_sample: int, # tokens per sample (the micro-batch size, for the paper's ablation)
                 seed: int = 0, # seed of the token samples
                ):
        super().__init__()
        if self.world_size != 1: raise RuntimeError("SampledBalancer is single-process: the sample needs the routing of the whole global batch")
        if isinstance(n_sample, bool) or not isinstance(n_sample, int) or n_sample < 1:
            raise ValueError(f"n_sample must be a positive int, got {n_sample!r}")
        self.n_sample, self.seed = n_sample, seed
        self.sample_counts: dict[int, torch.Tensor] = {}  # layer -> (M, E) expert counts of each micro-step's sample

    @torch.no_grad()
    def prepare(self, model: torch.nn.Module, # the MoeLM being trained (weights of this optimizer step)
                input_ids: torch.Tensor, # (M, B, T) the whole global batch of this step, micro-batch by micro-batch
                step: int, # optimizer step (seeds the samples)
               ) -> None:
        "Route the global batch as training will (one forward per micro-batch) and draw one token sample per micro-step."
        if input_ids.ndim != 3: raise ValueError(f"input_ids must be (micro-batches, batch, seq), got {tuple(input_ids.shape)}")
        n_micro, n_tokens = input_ids.shape[0], input_ids[0].numel()
        if self.n_sample > n_micro * n_tokens: raise ValueError(f"n_sample={self.n_sample} > {n_micro * n_tokens} tokens in the global batch")
        model = unwrap(model); was_training = model.training
        model.eval()  # eval mode: same softmax routing, and the balance loss does not call back into this balancer
        try:
            with capture_routing(model) as cap:
                for m in range(n_micro): model(input_ids[m])
        finally: model.train(was_training)
        rec = block_routes(model, cap)
        gen = torch.Generator().manual_seed(stable_hash("lbl-sample", self.seed, step) % 2**63)
        samples = [torch.randperm(n_micro * n_tokens, generator=gen)[:self.n_sample] for _ in range(n_micro)]
        self.sample_counts = {}
        for layer, routes in rec.items():
            idx = torch.cat([r.expert_idx for r in routes])  # (M*B*T, k)
            n_exp = routes[0].probs.shape[-1]
            self.sample_counts[layer] = torch.stack([expert_counts(idx[s], n_exp) for s in samples])
        self.buffers.clear(); self.steps.clear()

    def fractions(self, counts: torch.Tensor, layer: int = 0, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        "f of this micro-step's sample (E,), and the local token count (so P is the micro-batch's mean probability)."
        m = self.steps.get(layer, 0)
        if layer not in self.sample_counts or m >= len(self.sample_counts[layer]):
            raise RuntimeError(f"SampledBalancer has no sample for layer {layer}, micro-step {m}: call prepare(model, global_batch, step) "
                               "at the start of every optimizer step (and reset() after it)")
        self.steps[layer] = m + 1
        sample = self.sample_counts[layer][m].to(counts.device)
        self.buffers[layer] = sample
        n_local = counts.detach().sum().double() / top_k
        return sample.double() / sample.sum().clamp(min=1), n_local.clamp(min=1e-12)

    def reset(self) -> None:
        "Forget the samples (call after every optimizer step)."
        super().reset(); self.sample_counts = {}


# %% [markdown]
# With a sample of *all* tokens the sampled loss of each micro-batch uses the global `f`; a sample the size of
# one micro-batch differs from the micro-batch's own counts; bad use is refused.

# %%
seed_everything(seed)
gids = torch.randint(0, 50, (3, 2, 5))  # M=3 micro-batches of 2x5 tokens
full = SampledBalancer(n_sample=30, seed=0); full.prepare(tiny, gids, step=0)
with capture_routing(tiny) as cap, torch.no_grad(): all_routes = [tiny(gids[m]) for m in range(3)]
rec = block_routes(tiny, cap)
idx_all = torch.cat([r.expert_idx for r in rec[0]])
for m in range(3): test_eq(full.sample_counts[0][m], expert_counts(idx_all, 4))  # sample = everything
probs_m, idx_m = rec[0][1].probs, rec[0][1].expert_idx
full.steps[0] = 1  # the second micro-step
glob_f = expert_counts(idx_all, 4).double() / expert_counts(idx_all, 4).sum()
test_close(load_balancing_loss(probs_m, idx_m, scope="global", balancer=full), 4 * (glob_f * probs_m.double().mean(0)).sum(), eps=1e-6)
part = SampledBalancer(n_sample=10, seed=0); part.prepare(tiny, gids, step=0)
test_eq(part.sample_counts[0].sum(1).tolist(), [20, 20, 20])  # 10 tokens x k=2 slots each
test_ne(part.sample_counts[0][0], part.sample_counts[0][1])  # a new sample every micro-step
again = SampledBalancer(n_sample=10, seed=0); again.prepare(tiny, gids, step=0); test_eq(again.sample_counts[0], part.sample_counts[0])
other = SampledBalancer(n_sample=10, seed=0); other.prepare(tiny, gids, step=1); test_ne(other.sample_counts[0], part.sample_counts[0])
for m in range(3): part.fractions(torch.ones(4, dtype=torch.long), 0, 2)
test_fail(lambda: part.fractions(torch.ones(4, dtype=torch.long), 0, 2), contains="call prepare")
part.reset(); test_eq(part.sample_counts, {})
test_fail(lambda: SampledBalancer(n_sample=0), contains="n_sample must be a positive int")
test_fail(lambda: SampledBalancer(n_sample=31).prepare(tiny, gids, 0), contains="n_sample=31 > 30 tokens")


# %% [markdown]
# ## Batches for `moebook.train`
#
# `make_batches` gives `train` its pure `batches(step, micro_step)` function. With `world_size` ranks the loop
# runs `n_micro / world_size` accumulation steps and `train` hands rank `r` rows `r·B … (r+1)·B` of each batch,
# so micro-step `j` concatenates micro-batches `j·W … j·W + W − 1` of the step: every variant, on any number of
# ranks, trains on the same `n_micro` micro-batches per step. Besides the tensors, each batch carries its `step`
# and `micro` indices (train passes non-tensors through) for the sampled variant's `prepare`.

# %%
#| export
class StepBatches:
    "batches(step, micro) for `train`: the step's global batch (cached), rows of `world_size` micro-batches per micro-step."
    def __init__(self, corpus: Corpus, cfg: ExperimentConfig, world_size: int = 1, shuffled: bool = False):
        if cfg.n_micro % world_size: raise ValueError(f"n_micro={cfg.n_micro} must be a multiple of the world size {world_size}")
        self.corpus, self.cfg, self.world_size, self.shuffled = corpus, cfg, world_size, shuffled
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def grad_accum(self) -> int: return self.cfg.n_micro // self.world_size

    def global_batch(self, step: int) -> torch.Tensor:
        "(n_micro, B, T) token ids of `step` (domain-homogeneous micro-batches unless `shuffled`)."
        if self._cached is None or self._cached[0] != step:
            c = self.cfg
            make = self.corpus.shuffled_global_batch if self.shuffled else self.corpus.global_batch
            self._cached = (step, make(step, c.n_micro, c.batch_size, c.seq_len, c.seed)[0])
        return self._cached[1]

    def __call__(self, step: int, micro: int) -> dict[str, Any]:
        if not 0 <= micro < self.grad_accum: raise IndexError(f"micro={micro} outside the {self.grad_accum} accumulation steps")
        ids = self.global_batch(step)[micro * self.world_size:(micro + 1) * self.world_size]
        return {"input_ids": ids.reshape(-1, ids.shape[-1]), "step": step, "micro": micro}


# %% [markdown]
# The loss function hands `train` the LM, aux and z losses as logs; for the sampled variant it first calls
# `prepare` at micro-step 0 of every step.

# %%
#| export
def make_loss_fn(batches: StepBatches, balancer: GlobalBalancer | None = None):
    "loss_fn(model, batch) -> (loss, logs) for `train`; prepares a `SampledBalancer` at the first micro-step of a step."
    def loss_fn(model, batch):
        if isinstance(balancer, SampledBalancer) and batch["micro"] == 0:
            balancer.prepare(model, batches.global_batch(batch["step"]), batch["step"])
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss, {"lm_loss": out.lm_loss.detach(), "aux_loss": out.aux_loss.detach(), "z_loss": out.z_loss.detach()}
    return loss_fn


# %% [markdown]
# A small corpus (built once into a temporary directory) for the tests of this notebook.

# %%
test_recipe = CorpusRecipe(max_bytes_per_domain=60_000, max_doc_bytes=4096, vocab_size=512, tokenizer_sample_bytes=30_000)
test_corpus = load_corpus(test_recipe, Path(tempfile.mkdtemp()))
ecfg = ExperimentConfig(n_micro=4, batch_size=2, seq_len=16, corpus_bytes=60_000, vocab_size=512)
sb = StepBatches(test_corpus, ecfg, world_size=2)
test_eq(sb.grad_accum, 2)
b1 = sb(3, 1); g = test_corpus.global_batch(3, 4, 2, 16, 0)[0]
test_eq(b1["input_ids"], torch.cat([g[2], g[3]])); test_eq((b1["step"], b1["micro"]), (3, 1))
test_eq(torch.cat([StepBatches(test_corpus, ecfg)(3, m)["input_ids"] for m in range(4)]), g.reshape(-1, 16))  # 1 rank: same rows
test_eq(StepBatches(test_corpus, ecfg, shuffled=True).global_batch(3), test_corpus.shuffled_global_batch(3, 4, 2, 16, 0)[0])
test_fail(lambda: StepBatches(test_corpus, ecfg, world_size=3), contains="must be a multiple of the world size 3")
test_fail(lambda: sb(0, 2), contains="outside the 2 accumulation steps")


# %% [markdown]
# ## Per-domain evaluation and routing metrics
#
# `evaluate_routing(model, corpus, cfg)` runs `eval_batches` fixed validation micro-batches (`batch_size ×
# seq_len`, as in training) of every domain and returns:
#
# - `loss`, `ppl`: next-token cross-entropy (nats) and perplexity per domain, and `avg_ppl` (mean of the
#   per-domain perplexities, the paper's "avg PPL");
# - `freq (L, D, E)`: per-layer, per-domain **selection frequency** of each expert: the fraction of the domain's
#   tokens that have the expert among their top-k (sums to k over experts; uniform routing gives k/E);
# - `score_sum (L, D)`: the mean **top-k routing-score sum** (sum of the chosen experts' softmax scores) per
#   layer and domain; a router that does not discriminate gives about k/E;
# - `maxvio_micro (L,)`: max-violation `(max_i load_i − mean load)/mean load` of one micro-batch, averaged over
#   the micro-batches, and `maxvio_global (L,)`: max-violation of the loads summed over all of them (every domain
#   equally), i.e. the balance a micro-scope and a global-scope loss each ask for.
#
# `specialisation(freq, top_k)` summarises `freq` per layer: the mutual information `I(domain; expert)` in nats
# between a token's domain and the expert of one of its routing slots (0 when every domain uses the experts
# alike), and the highest selection frequency relative to uniform.

# %%
#| export
def max_violation(load: torch.Tensor) -> float:
    "(max load - mean load) / mean load of an (E,) load vector; 0 = perfect balance."
    load = load.double(); mean = load.mean().clamp(min=1e-12)
    return float((load.max() - mean) / mean)

@torch.no_grad()
def evaluate_routing(model: MoeLM, corpus: Corpus, cfg: ExperimentConfig) -> dict:
    "Per-domain validation loss/perplexity, selection frequencies, top-k score sums and micro/global max-violation."
    model = unwrap(model); was_training = model.training; model.eval()
    layers, n_dom, E, k = moe_layer_indices(model), len(corpus.domains), cfg.n_experts, cfg.top_k
    counts = torch.zeros(len(layers), n_dom, E, dtype=torch.float64)
    score = torch.zeros(len(layers), n_dom, dtype=torch.float64)
    n_tok = torch.zeros(n_dom, dtype=torch.float64)
    vio_micro, loss = [[] for _ in layers], {}
    try:
        for d, dom in enumerate(corpus.domains):
            n_avail = corpus.num_validation_batches(dom, cfg.batch_size, cfg.seq_len)
            if n_avail < cfg.eval_batches:
                raise ValueError(f"domain {dom!r} has {n_avail} validation batches of {cfg.batch_size}x{cfg.seq_len}, eval_batches={cfg.eval_batches}")
            ce = []
            for ids in corpus.validation_batches(dom, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
                ids = ids.to(next(model.parameters()).device)
                with capture_routing(model) as cap: out = model(ids, labels=ids)
                rec = block_routes(model, cap)
                ce.append(out.lm_loss.item())
                n_tok[d] += ids.numel()
                for j, layer in enumerate(layers):
                    r = rec[layer][0]
                    c = expert_counts(r.expert_idx.cpu(), E).double()
                    counts[j, d] += c; vio_micro[j].append(max_violation(c))
                    score[j, d] += r.probs.double().topk(k, dim=-1).values.sum(-1).sum().cpu()
            loss[dom] = float(np.mean(ce))
    finally: model.train(was_training)
    ppl = {d: math.exp(v) for d, v in loss.items()}
    return {"domains": list(corpus.domains), "loss": loss, "ppl": ppl, "avg_ppl": float(np.mean(list(ppl.values()))),
            "freq": (counts / n_tok[None, :, None]).tolist(), "score_sum": (score / n_tok[None]).tolist(),
            "uniform_score_sum": k / E, "maxvio_micro": [float(np.mean(v)) for v in vio_micro],
            "maxvio_global": [max_violation(counts[j].sum(0)) for j in range(len(layers))]}

def specialisation(freq, # (L, D, E) selection frequencies (rows sum to top_k)
                   top_k: int, # k
                  ) -> dict[str, list[float]]: # per layer: mutual information (nats) and peak frequency / uniform
    "Per-layer domain specialisation: I(domain; expert) with equal domain weights, and max frequency / (k/E)."
    f = torch.as_tensor(freq, dtype=torch.float64)
    if f.ndim != 3: raise ValueError(f"freq must be (layers, domains, experts), got shape {tuple(f.shape)}")
    p = f / top_k                                     # p(expert | domain), rows sum to 1
    marginal = p.mean(1, keepdim=True)                # p(expert) with every domain weighted equally
    kl = torch.where(p > 0, p * (p / marginal.clamp(min=1e-300)).log(), torch.zeros_like(p)).sum(-1)  # (L, D)
    return {"mutual_info": kl.mean(1).tolist(), "peak_over_uniform": (f.amax((1, 2)) * f.shape[2] / top_k).tolist()}


# %%
test_eq(max_violation(torch.tensor([2, 2, 2, 2])), 0.0); test_close(max_violation(torch.tensor([4, 0, 2, 2])), 1.0, eps=1e-12)
uniform = torch.full((1, 4, 8), 2 / 8)
test_close(specialisation(uniform, 2)["mutual_info"], [0.0], eps=1e-12); test_close(specialisation(uniform, 2)["peak_over_uniform"], [1.0], eps=1e-12)
split = torch.zeros(1, 4, 8)
for d in range(4): split[0, d, 2 * d:2 * d + 2] = 1.0  # each domain owns two experts (k = 2)
test_close(specialisation(split, 2)["mutual_info"], [math.log(4)], eps=1e-9)  # = H(domain): the expert reveals the domain
test_close(specialisation(split, 2)["peak_over_uniform"], [4.0], eps=1e-9)
test_fail(lambda: specialisation(torch.zeros(4, 8), 2), contains="freq must be (layers, domains, experts)")
ev = evaluate_routing(tiny_small := MoeLM(ExperimentConfig(d_model=16, n_heads=2, n_experts=4, top_k=2, d_ff_expert=8).model_config(test_corpus.vocab_size, "micro")),
                      test_corpus, ExperimentConfig(n_experts=4, top_k=2, batch_size=2, seq_len=16, eval_batches=2))
test_close(torch.tensor(ev["freq"]).sum(-1), torch.full((2, 4), 2.0), eps=1e-9)  # k slots per token
assert all(0.5 - 1e-9 <= s <= 1 + 1e-9 for row in ev["score_sum"] for s in row)  # top-2 of 4 experts: at least 2/4 of the mass
assert ev["avg_ppl"] > 1 and set(ev["loss"]) == set(test_corpus.domains)
test_fail(lambda: evaluate_routing(tiny_small, test_corpus, ExperimentConfig(n_experts=4, top_k=2, batch_size=64, seq_len=256, eval_batches=50)),
          contains="validation batches of 64x256")


# %% [markdown]
# ## Running one variant
#
# `run_variant(variant, cfg)` builds the corpus and the model (same initialisation for every variant of a
# seed), trains with `moebook.train.train` (warmup + cosine LR, AdamW, `n_micro / world_size` accumulation
# steps, the balancer's `reset` after every optimizer step), times every optimizer step and, for the
# all-reduce variant, every count all-reduce (`TimedBalancer`), then evaluates on rank 0. Under `torchrun` it
# joins the process group first; with `ckpt_dir` it checkpoints atomically and resumes (a finished run is
# only re-evaluated).

# %%
#| export
class TimedBalancer(GlobalBalancer):
    "A GlobalBalancer that also adds up the wall time of its count all-reduces."
    def __init__(self, process_group=None):
        super().__init__(process_group); self.comm_seconds, self.n_all_reduce = 0.0, 0

    def _all_reduce(self, counts: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter(); out = super()._all_reduce(counts)
        self.comm_seconds += time.perf_counter() - t0; self.n_all_reduce += 1
        return out

def make_balancer(variant: str, cfg: ExperimentConfig) -> GlobalBalancer | None:
    "The balancer a variant needs (None for the micro and sequence scopes)."
    if variant_scope(variant) != "global": return None
    if variant == "sampled": return SampledBalancer(cfg.batch_size * cfg.seq_len, seed=cfg.seed)
    return TimedBalancer()

def run_variant(variant: str, # one of VARIANTS
                cfg: ExperimentConfig | dict, # the experiment (a dict is converted)
                ckpt_dir: str | None = None, # checkpoint folder of this run; resumes from it
                progress: bool = False, # progress bar (rank 0)
                threads: int = 0, # torch threads for this process (0 = leave as is)
                cache_dir: str | None = None, # corpus cache (default: moebook.corpus.default_cache_dir())
               ) -> dict: # history, step times, all-reduce time, evaluation (rank 0)
    "Train one balance variant and evaluate it."
    cfg = ExperimentConfig(**cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, ExperimentConfig): raise TypeError(f"cfg must be an ExperimentConfig or dict, got {type(cfg).__name__}")
    scope = variant_scope(variant)
    if threads: torch.set_num_threads(threads)
    info = init_distributed("cpu")
    if (variant in DP_VARIANTS) != (info.world_size > 1):
        raise RuntimeError(f"variant {variant!r} needs {'torchrun with >= 2 ranks' if variant in DP_VARIANTS else 'a single process'}, "
                           f"this process is rank {info.rank} of {info.world_size}")
    corpus = load_corpus(cfg.recipe(), cache_dir)
    seed_everything(cfg.seed)
    model = MoeLM(cfg.model_config(corpus.vocab_size, scope))
    balancer = make_balancer(variant, cfg)
    model.set_balancer(balancer)
    batches = StepBatches(corpus, cfg, info.world_size, shuffled=variant == "micro_shuffled")
    step_ends = []
    hooks = ([balancer.reset] if balancer is not None else []) + [lambda: step_ends.append(time.perf_counter())]
    tcfg = TrainConfig(max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accum=batches.grad_accum,
                       ckpt_every=max(1, cfg.steps // 4) if ckpt_dir else 0, ckpt_dir=ckpt_dir, seed=cfg.seed,
                       progress=progress, device=cfg.device if info.world_size == 1 else "cpu")
    schedule = WarmupCosine(cfg.lr, cfg.steps, warmup_steps=min(max(1, cfg.steps // 10), cfg.steps - 1), lr_min=cfg.lr / 10)
    t0 = time.perf_counter()
    history = train(model, batches, tcfg, schedule, loss_fn=make_loss_fn(batches, balancer),
                    after_optimizer_step=hooks, resume=ckpt_dir is not None)
    step_seconds = np.diff([t0] + step_ends).tolist()
    result = {"variant": variant, "config": dataclasses.asdict(cfg), "world_size": info.world_size, "history": history,
              "step_seconds": step_seconds, "comm_seconds": getattr(balancer, "comm_seconds", 0.0),
              "n_all_reduce": getattr(balancer, "n_all_reduce", 0)}
    if info.is_main: result["eval"] = evaluate_routing(model, corpus, cfg)
    return result


# %% [markdown]
# A few steps of every single-process variant on the small corpus: each runs, the global buffer is empty after
# training (reset after the optimizer step), and the variants share the same first-step LM loss (same
# initialisation, same data) but not the same balance loss.

# %%
small_cfg = dict(steps=2, n_micro=4, batch_size=2, seq_len=16, d_model=16, n_heads=2, n_experts=4, top_k=2, d_ff_expert=8,
                 corpus_bytes=60_000, vocab_size=512, eval_batches=1)
cache = str(test_corpus.path.parent)
small_runs = {v: run_variant(v, small_cfg, cache_dir=cache) for v in ("micro", "sequence", "global", "sampled", "micro_shuffled")}
lm0 = {v: r["history"][0]["lm_loss"] for v, r in small_runs.items()}
for v in lm0: test_close(lm0[v], lm0["micro"], eps=1e-5)
aux0 = {v: r["history"][0]["aux_loss"] for v, r in small_runs.items()}
assert len({round(a, 6) for a in aux0.values()}) == len(aux0), aux0
test_eq(len(small_runs["global"]["step_seconds"]), 2); test_eq(small_runs["global"]["n_all_reduce"], 2 * 4 * 2)  # steps x micro x layers
test_fail(lambda: run_variant("global_dp", small_cfg, cache_dir=cache), contains="needs torchrun with >= 2 ranks")


# %% [markdown]
# ## Data-parallel runs with `torchrun`
#
# `run_ddp(cfg, seeds, variants)` starts `torchrun --standalone --nproc_per_node 2` (gloo on CPU, one
# thread per rank) on `ddp_main`, which runs the given variants for every seed, one after the other, in the same process group
# (so the timing of the all-reduce path and of the micro path share a machine state) and saves rank 0's
# results atomically. It returns `{(variant, seed): result}`.

# %%
#| export
def ddp_main(argv: list[str] | None = None) -> None:
    "Entry point of the torchrun workers: `--config JSON --seeds 0,1 --variants a,b --out DIR [--ckpt-root DIR] [--cache-dir DIR]`."
    import argparse
    ap = argparse.ArgumentParser(prog="moebook.global_lbl.ddp_main")
    for a in ("--config", "--seeds", "--variants", "--out"): ap.add_argument(a, required=True)
    ap.add_argument("--ckpt-root", default=None); ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for s in map(int, args.seeds.split(",")):
        cfg = ExperimentConfig(**{**json.loads(args.config), "seed": s})
        for variant in args.variants.split(","):
            ckpt = str(Path(args.ckpt_root) / f"{variant}-seed{s}") if args.ckpt_root else None
            res = run_variant(variant, cfg, ckpt_dir=ckpt, cache_dir=args.cache_dir)
            if dist.get_rank() == 0: save_checkpoint(res, Path(args.out) / f"{variant}-seed{s}.pt")
    close_distributed()

def run_ddp(cfg: ExperimentConfig, # the experiment (its seed is replaced by each of `seeds`)
            seeds: list[int], # one run of every variant per seed
            variants: tuple[str, ...] = DP_VARIANTS, # data-parallel variants to run, in this order
            out_dir: str | Path | None = None, # where rank 0 writes the results (default: a temporary folder, removed after)
            nproc: int = 2, # data-parallel ranks
            ckpt_root: str | None = None, # checkpoint root (one folder per variant and seed)
            cache_dir: str | None = None, # corpus cache
            timeout: float = 3600, # seconds
           ) -> dict[tuple[str, int], dict]: # (variant, seed) -> run_variant's result
    "Run data-parallel variants for every seed in one `torchrun` job (gloo, CPU) and collect their results."
    for v in variants:
        if v not in DP_VARIANTS: raise ValueError(f"{v!r} is not a data-parallel variant; those are {DP_VARIANTS}")
    if cfg.n_micro % nproc: raise ValueError(f"n_micro={cfg.n_micro} must be a multiple of nproc={nproc}")
    import shutil
    out = Path(out_dir or tempfile.mkdtemp(prefix="glbl-ddp-"))
    root = str(Path(moebook.__file__).resolve().parents[1])  # make the workers import this very package
    env = {"OMP_NUM_THREADS": "1", "MOEBOOK_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    argv = ["--no-python", sys.executable, "-c", "import sys; from moebook.global_lbl import ddp_main; ddp_main(sys.argv[1:])",
            "--config", json.dumps(dataclasses.asdict(cfg)), "--seeds", ",".join(map(str, seeds)),
            "--variants", ",".join(variants), "--out", str(out)]
    if ckpt_root: argv += ["--ckpt-root", str(ckpt_root)]
    if cache_dir: argv += ["--cache-dir", str(cache_dir)]
    try:
        run_torchrun(argv, nproc=nproc, env=env, timeout=timeout)
        return {(v, s): load_checkpoint(out / f"{v}-seed{s}.pt") for s in seeds for v in variants}
    finally:
        if out_dir is None: shutil.rmtree(out, ignore_errors=True)  # our temporary folder: gone on success and failure


# %%
test_fail(lambda: run_ddp(ExperimentConfig(**small_cfg), [0], variants=("micro",)), contains="'micro' is not a data-parallel variant")
test_fail(lambda: run_ddp(ExperimentConfig(**{**small_cfg, "n_micro": 3}), [0]), contains="n_micro=3 must be a multiple of nproc=2")


# %% [markdown]
# The torchrun path itself (2 gloo ranks) runs in the experiment below, and its equivalence with one process,
# value and gradients, is tested in `tests/test_global_lbl.py`.

# %% [markdown]
# ## Running a whole experiment
#
# `run_experiment` runs the single-process variants of every seed in a pool of `workers` processes (one
# torch thread each; results are identical to a sequential run) and then the data-parallel variants of every
# seed under `torchrun`, alone on the machine so their step times are not disturbed by the pool.
# `summarise` turns the results into one row per (variant, seed).

# %%
#| export
def _run_in_worker(args: tuple) -> dict:
    variant, cfg, ckpt, cache_dir = args
    return run_variant(variant, cfg, ckpt_dir=ckpt, threads=1, cache_dir=cache_dir)

def run_experiment(cfg: ExperimentConfig, # settings of the first seed
                   seeds: list[int], # one run of every variant per seed
                   variants: tuple[str, ...] = VARIANTS, # which variants
                   workers: int = 2, # processes for the single-process variants (1 = in this process)
                   ckpt_root: str | None = None, # checkpoint root ("<root>/<variant>-seed<seed>")
                   cache_dir: str | None = None, # corpus cache
                   progress: bool = True, # progress bar over finished runs
                  ) -> dict[tuple[str, int], dict]: # (variant, seed) -> run_variant's result
    "Every variant for every seed: single-process variants in a process pool, then the torchrun variants."
    for v in variants: variant_scope(v)
    load_corpus(cfg.recipe(), cache_dir)  # build the corpus once, before the workers look for it
    ckpt = lambda v, s: str(Path(ckpt_root) / f"{v}-seed{s}") if ckpt_root else None
    jobs = [(v, dataclasses.asdict(dataclasses.replace(cfg, seed=s)), ckpt(v, s), cache_dir)
            for s in seeds for v in variants if v not in DP_VARIANTS]
    results = {}
    bar = progress_bar(total=len(jobs) + len(seeds) * any(v in DP_VARIANTS for v in variants), enabled=progress, desc="runs")
    if workers > 1 and len(jobs) > 1:
        import moebook.global_lbl as module  # workers unpickle the function from the package, not from a notebook
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(module._run_in_worker, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                job = futures[fut]; results[job[0], job[1]["seed"]] = fut.result(); bar.update()
    else:
        for job in jobs:
            results[job[0], job[1]["seed"]] = run_variant(job[0], job[1], job[2], cache_dir=job[3]); bar.update()
    if dp := tuple(v for v in variants if v in DP_VARIANTS):
        results.update(run_ddp(cfg, seeds, dp, ckpt_root=ckpt_root, cache_dir=cache_dir)); bar.update(len(seeds))
    bar.close()
    return results

def summarise(results: dict[tuple[str, int], dict]) -> list[dict]:
    "One row per (variant, seed): average perplexity, per-domain perplexity, specialisation, balance, score sum, step time."
    rows = []
    for (v, s), r in sorted(results.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])):
        ev, k = r["eval"], r["config"]["top_k"]
        spec = specialisation(ev["freq"], k)
        rows.append({"variant": v, "seed": s, "avg_ppl": ev["avg_ppl"], **{f"ppl_{d}": p for d, p in ev["ppl"].items()},
                     "mutual_info": float(np.mean(spec["mutual_info"])), "peak_over_uniform": float(np.mean(spec["peak_over_uniform"])),
                     "score_sum": float(np.mean(ev["score_sum"])), "uniform_score_sum": ev["uniform_score_sum"],
                     "maxvio_micro": float(np.mean(ev["maxvio_micro"])), "maxvio_global": float(np.mean(ev["maxvio_global"])),
                     "step_s": float(np.median(r["step_seconds"])) if r["step_seconds"] else float("nan"),
                     "comm_share": r["comm_seconds"] / max(sum(r["step_seconds"]), 1e-12) if r["step_seconds"] else float("nan"),
                     "final_lm_loss": float(np.mean([h["lm_loss"] for h in r["history"][-max(1, len(r["history"]) // 10):]]))})
    return rows


# %%
rows = summarise({(v, 0): r for v, r in small_runs.items()})
test_eq([r["variant"] for r in rows], ["micro", "sequence", "global", "sampled", "micro_shuffled"])
assert all(r["avg_ppl"] > 1 and r["mutual_info"] >= 0 for r in rows)
with tempfile.TemporaryDirectory() as d:  # checkpoint + resume: a finished run is only re-evaluated, with the same result
    first = run_experiment(ExperimentConfig(**small_cfg), [0], ("global",), workers=1, ckpt_root=d, cache_dir=cache, progress=False)
    again = run_experiment(ExperimentConfig(**small_cfg), [0], ("global",), workers=1, ckpt_root=d, cache_dir=cache, progress=False)
    test_eq(again["global", 0]["history"], first["global", 0]["history"]); test_eq(again["global", 0]["step_seconds"], [])
    test_eq(again["global", 0]["eval"], first["global", 0]["eval"])

# %% [markdown]
# ## Experiment
#
# Train every variant with the notebook's parameters for `n_seeds` seeds. The default setting (a 2-layer,
# d=64 MoeLM with 16 routed experts of width 32, top-4, one shared expert, about 0.8 M parameters; 100
# steps of 8 micro-batches of 2×64 tokens) is sized for a 2-core CPU.

# %%
#| slow
seeds = list(range(seed, seed + n_seeds))
cfg = ExperimentConfig(steps=steps, n_micro=n_micro, batch_size=batch_size, seq_len=seq_len, d_model=d_model, n_layers=n_layers,
                       n_experts=n_experts, top_k=top_k, d_ff_expert=d_ff_expert, n_shared_experts=n_shared_experts,
                       aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, lr=lr, corpus_bytes=corpus_bytes,
                       vocab_size=vocab_size, eval_batches=eval_batches, seed=seed, device=str(pick_device(device)))
variants = tuple(v for v in VARIANTS if ddp or v not in DP_VARIANTS)
corpus = load_corpus(cfg.recipe())
n_params = sum(p.numel() for p in MoeLM(cfg.model_config(corpus.vocab_size, "micro")).parameters())
print(f"{len(variants)} variants x {len(seeds)} seeds; MoeLM with {n_params:,} parameters; "
      f"{cfg.n_micro * cfg.batch_size * cfg.seq_len} tokens per step, {cfg.batch_size * cfg.seq_len} per micro-batch")
t0 = time.time()
results = run_experiment(cfg, seeds, variants, workers=workers, ckpt_root=ckpt_dir or None, progress=progress)
experiment_s = time.time() - t0
table = summarise(results)
print(f"all runs: {experiment_s:.0f} s")


# %%
#| slow
def by_variant(key: str) -> dict[str, np.ndarray]:
    "variant -> values of `key` over seeds."
    return {v: np.array([r[key] for r in table if r["variant"] == v]) for v in variants}

cols = ["avg_ppl"] + [f"ppl_{d}" for d in corpus.domains] + ["mutual_info", "peak_over_uniform", "score_sum", "maxvio_micro", "maxvio_global", "step_s"]
print(f"{'variant':<15}" + "".join(f"{c:>18}" for c in cols))
for v in variants:
    vals = {c: by_variant(c)[v] for c in cols}
    print(f"{v:<15}" + "".join(f"{vals[c].mean():>11.3f} ±{vals[c].std():<6.3f}" for c in cols))
print(f"(mean ± std over {len(seeds)} seed(s); uniform top-k score sum = k/E = {cfg.top_k / cfg.n_experts:.3f})")
if ddp:  # same initialisation and data: 2 ranks x micro scope = 1 process x micro scope (the first step's loss)
    for s in seeds: test_close(results["micro_dp", s]["history"][0]["loss"], results["micro", s]["history"][0]["loss"], eps=1e-4)

# %% [markdown]
# ### Validation perplexity per domain
#
# Relative to the micro-batch baseline of the same seed (negative = better than micro), mean and spread over seeds.

# %%
#| slow
fig, ax = plt.subplots(figsize=(10, 3.4))
others = [v for v in variants if v != "micro"]; wdt = 0.8 / len(others)
for i, v in enumerate(others):
    rel = np.array([[results[v, s]["eval"]["ppl"][d] / results["micro", s]["eval"]["ppl"][d] - 1 for d in corpus.domains] for s in seeds]) * 100
    ax.bar(np.arange(len(corpus.domains)) + (i - len(others) / 2 + 0.5) * wdt, rel.mean(0), wdt,
           yerr=rel.std(0) if len(seeds) > 1 else None, label=v)
ax.axhline(0, color="k", lw=0.8); ax.set_xticks(range(len(corpus.domains)), corpus.domains)
ax.set(ylabel="PPL change vs micro (%)", title="validation perplexity per domain"); ax.legend(fontsize=8, ncol=3)
fig.tight_layout(); plt.show()

# %% [markdown]
# ### Training curves

# %%
#| slow
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for v in variants:
    lm = np.mean([[h["lm_loss"] for h in results[v, s]["history"]] for s in seeds], 0)
    aux = np.mean([[h["aux_loss"] for h in results[v, s]["history"]] for s in seeds], 0)
    w = max(1, len(lm) // 20); sm = lambda x: np.convolve(x, np.ones(w) / w, mode="valid")
    axes[0].plot(sm(lm), label=v); axes[1].plot(sm(aux), label=v)
axes[0].set(xlabel="step", ylabel="LM loss (nats, smoothed)", title="training LM loss")
axes[1].set(xlabel="step", ylabel="LBL as optimised (1 = balanced)", title="balance loss in each variant's own scope")
axes[0].legend(fontsize=8); fig.tight_layout(); plt.show()


# %% [markdown]
# ### Per-domain expert selection frequency: micro vs global
#
# Each panel is one layer: rows are domains, columns experts sorted by the domain that uses them most, colour
# the fraction of the domain's tokens routed to the expert (uniform routing = k/E). The paper's Figure shows
# the same picture for its 3.4B models: under micro-batch balance every domain uses every expert about
# equally; under global balance domains claim their own experts.

# %%
#| slow
def plot_frequency(freq, title: str, axes) -> None:
    "One heatmap per layer of an (L, D, E) selection-frequency array, experts sorted by their favourite domain."
    f = np.asarray(freq)
    for j, ax in enumerate(axes):
        order = np.lexsort((-f[j].max(0), f[j].argmax(0)))
        im = ax.imshow(f[j][:, order], aspect="auto", cmap="magma", vmin=0, vmax=max(0.5, f.max()))
        ax.set_yticks(range(len(corpus.domains)), corpus.domains); ax.set_xlabel("expert (sorted)")
        ax.set_title(f"{title}, MoE layer {j}", fontsize=9)
    plt.colorbar(im, ax=axes[-1], label="selection frequency")

shown = [v for v in ("micro", "global", "global_dp", "sampled") if v in variants]
fig, axes = plt.subplots(len(shown), cfg.n_layers, figsize=(4.2 * cfg.n_layers + 1, 2.1 * len(shown)), squeeze=False)
for v, ax_row in zip(shown, axes): plot_frequency(results[v, seeds[0]]["eval"]["freq"], v, ax_row)
fig.tight_layout(); plt.show()

# %% [markdown]
# ### Routing confidence and balance
#
# Left: the mean top-k routing-score sum per layer (how much of the router's probability mass the chosen
# experts get) against the uniform baseline k/E. Middle/right: max-violation of the expert loads measured over
# one micro-batch and over the global batch (all domains): micro balance makes both small; global balance keeps
# the global batch balanced while single (one-domain) micro-batches are not.

# %%
#| slow
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
x = np.arange(cfg.n_layers); wdt = 0.8 / len(variants)
for i, v in enumerate(variants):
    for ax, key in zip(axes, ("score_sum", "maxvio_micro", "maxvio_global")):
        vals = np.array([results[v, s]["eval"][key] for s in seeds])  # (seeds, L) or (seeds, L, D)
        per_layer = vals.mean(-1) if vals.ndim == 3 else vals
        ax.bar(x + (i - len(variants) / 2 + 0.5) * wdt, per_layer.mean(0), wdt, yerr=per_layer.std(0) if len(seeds) > 1 else None, label=v)
axes[0].axhline(cfg.top_k / cfg.n_experts, color="k", ls=":", label="uniform k/E")
for ax, t in zip(axes, ("top-k routing-score sum", "max-violation, one micro-batch", "max-violation, global batch")):
    ax.set_xticks(x, [f"layer {j}" for j in x]); ax.set_title(t)
axes[0].legend(fontsize=7, ncol=2); fig.tight_layout(); plt.show()

# %% [markdown]
# ### Synchronisation cost
#
# Step times of the two torchrun variants, measured in the same process group one after the other: the only
# difference is the all-reduce of the length-E count vector (per MoE layer and micro-step) and the buffer.
# The all-reduce time is also measured directly.

# %%
#| slow
if ddp:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for v in DP_VARIANTS:
        ax.hist(np.concatenate([results[v, s]["step_seconds"][1:] for s in seeds]) * 1e3, bins=30, alpha=0.6, label=v)
    ax.set(xlabel="ms per optimizer step (2 ranks)", ylabel="steps", title="step time with and without the count all-reduce")
    ax.legend(); fig.tight_layout(); plt.show()

# %% [markdown]
# ## Claim check
#
# Each claim is judged against seed noise: a difference counts only if it has the same sign for every seed and
# its mean is larger than the spread (standard deviation over seeds) of the quantities compared.

# %%
#| slow
#| output: asis
ppl, mi, peak = by_variant("avg_ppl"), by_variant("mutual_info"), by_variant("peak_over_uniform")
def verdict(diffs: np.ndarray, noise: float, paper_direction: bool = True) -> str:
    "supported / not supported / inconclusive for per-seed differences (positive = the paper's direction)."
    if len(diffs) == 0: return "not run"
    if np.all(diffs > 0) and diffs.mean() > noise: return "supported"
    if np.all(diffs < 0) and -diffs.mean() > noise: return "not supported (opposite direction)"
    return "inconclusive (within seed noise)"

noise_ppl = float(max(ppl["micro"].std(), ppl["global"].std()))
gain = ppl["micro"] - ppl["global"]
gain_dp = ppl["micro"] - ppl["global_dp"] if "global_dp" in ppl else np.array([])
gain_sampled = ppl["micro"] - ppl["sampled"]
recovered = float(gain_sampled.mean() / gain.mean()) if abs(gain.mean()) > 1e-12 else float("nan")
mi_gain = mi["global"] - mi["micro"]
if ddp:
    step_g = np.array([np.median(results["global_dp", s]["step_seconds"][1:]) for s in seeds])
    step_m = np.array([np.median(results["micro_dp", s]["step_seconds"][1:]) for s in seeds])
    overhead = step_g / step_m - 1
    comm_share = np.array([results["global_dp", s]["comm_seconds"] / sum(results["global_dp", s]["step_seconds"]) for s in seeds])
mi_gain_sampled = mi["sampled"] - mi["micro"]
# diversity explains the gain if the sampled balance keeps most of it; judged on PPL when the PPL gain is real,
# else on specialisation when that gain is real
if verdict(gain, noise_ppl) == "supported":
    claim3_verdict = verdict(gain_sampled - 0.5 * gain, noise_ppl) + " (on PPL)"
elif verdict(mi_gain, float(max(mi["micro"].std(), mi["global"].std()))) == "supported":
    claim3_verdict = verdict(mi_gain_sampled - 0.5 * mi_gain, float(mi["sampled"].std())) + " (on specialisation; the PPL gain is within noise)"
else: claim3_verdict = "inconclusive (neither gain of global balance exceeds seed noise)"
fmt = lambda a: f"{np.mean(a):.3f}" + (f" ± {np.std(a):.3f}" if len(a) > 1 else "")
claims = [
    ("1. global-batch LBL lowers perplexity vs micro-batch",
     f"avg PPL micro {fmt(ppl['micro'])} → global (accum buffer) {fmt(ppl['global'])}"
     + (f", global (all-reduce, 2 ranks) {fmt(ppl['global_dp'])}" if ddp else ""),
     "3.4A0.6B: 8.167 → 8.062 (BSZ 32) / 8.038 (BSZ 512); 15A2.54B: 5.778 → 5.603",
     verdict(gain, noise_ppl)),
    ("2. global-batch LBL increases domain specialisation",
     f"I(domain; expert) micro {fmt(mi['micro'])} → global {fmt(mi['global'])} nats; peak frequency / uniform "
     f"{fmt(peak['micro'])} → {fmt(peak['global'])}",
     "global: many math experts above 0.2 selection frequency, micro: none above 0.15 (uniform 4/64 = 0.0625)",
     verdict(mi_gain, float(max(mi["micro"].std(), mi["global"].std())))),
    ("3. the gain comes from diversity (random-token-sample balance ≈ global)",
     f"avg PPL sampled {fmt(ppl['sampled'])} (micro {fmt(ppl['micro'])}, global {fmt(ppl['global'])}): "
     f"{recovered:.0%} of the global PPL gain recovered; I(domain; expert) sampled {fmt(mi['sampled'])} "
     f"({mi_gain_sampled.mean() / mi_gain.mean():.0%} of the global specialisation gain)",
     "shuffled micro-sized balance 8.041 vs global 8.038 vs micro 8.167 (98% of the gain)",
     claim3_verdict),
    ("4. the synchronisation overhead is small",
     (f"2-rank step {fmt(step_m * 1e3)} ms (micro) → {fmt(step_g * 1e3)} ms (global all-reduce): {fmt(overhead * 100)} %; "
      f"time inside the count all-reduce, including waiting for the slower rank: {fmt(comm_share * 100)} % of the step") if ddp else "not run (ddp=False)",
     "43A6.6B: 1.55 → 1.64 s/iter (+5.8 %), ~1 % communication",
     ("supported" if np.mean(overhead) < 0.10 else "not supported") if ddp else "not run"),
]
print("| claim | ours | paper | verdict |\n|---|---|---|---|")
for c in claims: print("| " + " | ".join(c) + " |")
print(f"\nScale: {n_params:,}-parameter MoeLMs ({cfg.n_layers} layers, {cfg.n_experts} experts top-{cfg.top_k} + "
      f"{cfg.n_shared_experts} shared) trained for {cfg.steps} steps of {cfg.n_micro * cfg.batch_size * cfg.seq_len} tokens on a CPU, "
      f"{len(seeds)} seed(s); the paper trains 3.4B-43B models on 120-400B tokens. Differences smaller than the seed spread are noise here.")
record_metrics(avg_ppl={v: ppl[v].tolist() for v in variants}, mutual_info={v: mi[v].tolist() for v in variants},
               peak_over_uniform={v: peak[v].tolist() for v in variants}, score_sum=by_variant("score_sum"),
               maxvio_micro=by_variant("maxvio_micro"), maxvio_global=by_variant("maxvio_global"),
               ppl_gain_global=gain.tolist(), ppl_gain_sampled=gain_sampled.tolist(), sampled_recovered_fraction=recovered,
               sync_overhead=overhead.tolist() if ddp else None, comm_share=comm_share.tolist() if ddp else None,
               verdicts={c[0]: c[3] for c in claims}, experiment_s=experiment_s, n_params=n_params, seeds=seeds)

# %% [markdown]
# **Reading the table.** The recovered fractions in row 3 are ratios of the gains over micro; when the global
# PPL gain is within noise (or negative) the PPL ratio means nothing and only the specialisation ratio is
# informative. The step times of row 4 come from a 2-rank gloo run on an idle 2-core CPU (the committed run),
# one rank per core. At this scale a step takes about 130 ms and each micro-step of each MoE layer adds one
# blocking all-reduce of 16 counts: its cost is latency and the wait for the slower rank (the forward-pass
# all-reduce is where a fast rank waits, time DDP would otherwise spend waiting in the gradient all-reduce), not
# bandwidth. The paper's +5.8 % is for 1.5-second steps of a 6.6B-parameter model, where the same number of
# tiny all-reduces is a far smaller share; our overhead says nothing about that regime.
