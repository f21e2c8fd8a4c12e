"""moebook.cpt: checkpoint keys cover every setting, FLOP-matched models, the pre-training -> CPT hand-off, the committed
checkpoints, retraining reproduces them, and a continual phase killed with SIGKILL resumes to exactly the metrics of an
uninterrupted run."""
import dataclasses, hashlib, json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from moebook.cpt import (CHECKPOINT_DIR, DEFAULT_VARIANTS, VARIANTS, CPTConfig, CPTCorpusSpec, CPTEvaluator, PhaseBatches,
                         committed_pretraining, continue_variant, load_cpt_corpus, load_weights, pretrain_variant, replay_weights,
                         run_phase)
from moebook.core import seed_everything
from moebook.moe import ModelSettings, MoeLM, count_parameters
from moebook.train import CHECKPOINT_NAME, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MOEBOOK_QUIET": "1", "OMP_NUM_THREADS": "1"}
SMALL = CPTCorpusSpec(d1="english", d2="code", max_bytes_per_domain=50_000, max_doc_bytes=4096, vocab_size=400, tokenizer_sample_bytes=20_000)
TINY = dict(batch_size=4, seq_len=16, model=ModelSettings(d_ff_expert=32), eval_every=3, cpt_eval_every=2, eval_batches=1)

DRIVER = textwrap.dedent("""
    import json, sys, time
    import torch
    from moebook.cpt import CPTConfig, CPTCorpusSpec, continue_variant, load_cpt_corpus, pretrain_variant
    torch.set_num_threads(1)
    root, cache, out, sleep, spec, cfg = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5]), json.loads(sys.argv[6])
    cfg = CPTConfig.scaled(6, 10, corpus=CPTCorpusSpec(**spec), **cfg)
    corpus = load_cpt_corpus(cfg.corpus, cache)
    pre = pretrain_variant(cfg, "switch_aux", corpus, root)
    hooks = [lambda: time.sleep(sleep)] if sleep else []
    res = continue_variant(cfg, "switch_aux", corpus, pre["weights"], root, replays=(0.3,), after_optimizer_step=hooks)
    open(out, "w").write(json.dumps(res))
""")


@pytest.fixture(autouse=True)
def one_thread():
    "These models are tiny: one thread is fastest (and several are very slow on a busy machine)."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus")
    load_cpt_corpus(SMALL, cache)
    return cache


def changed(value, name):
    "A different valid value for a config field."
    if name in ("d1", "d2"): return {"wordchain": "arithmetic", "english": "unicode", "arithmetic": "code", "code": "unicode"}[value]
    if name in ("d_ff_expert", "d_model"): return value + 4
    if name == "n_heads": return value * 2
    if isinstance(value, bool): return not value
    if isinstance(value, int): return value + 1
    if isinstance(value, float): return value * 1.1
    raise AssertionError(f"no changed value for {name}={value!r}")


def test_key_changes_with_every_setting(monkeypatch):
    "Every setting a run depends on (corpus recipe, tokenizer, model, schedule, seed) changes the checkpoint key."
    base = CPTConfig()
    k0 = base.key("switch_aux")
    for f in dataclasses.fields(CPTCorpusSpec):
        spec = dataclasses.replace(base.corpus, **{f.name: changed(getattr(base.corpus, f.name), f.name)})
        assert dataclasses.replace(base, corpus=spec).key("switch_aux") != k0, f"corpus.{f.name}"
    for f in dataclasses.fields(ModelSettings):
        if f.name in ("top_k", "n_shared_experts"): continue  # fixed by the Switch shape (a test below)
        model = dataclasses.replace(base.model, **{f.name: changed(getattr(base.model, f.name), f.name)})
        assert dataclasses.replace(base, model=model).key("switch_aux") != k0, f"model.{f.name}"
    for f in dataclasses.fields(CPTConfig):
        if f.name in ("corpus", "model", "progress", "device"): continue
        c = dataclasses.replace(base, **{f.name: changed(getattr(base, f.name), f.name)})
        assert c.key("switch_aux") != k0, f.name
    # not the model's behaviour: progress bars and the device the run happens on
    assert dataclasses.replace(base, progress=True, device="cuda").key("switch_aux") == k0
    assert base.key("switch_sinkhorn") != k0 and base.key("dense") != k0  # the model
    import tokenizers  # another tokenizers release may tokenize differently: a fresh corpus and fresh runs
    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".post1")
    assert base.key("switch_aux") != k0


def test_models_have_equal_active_parameters():
    "The dense model and the MoEs use the same parameters per token (up to the router)."
    cfg = CPTConfig()
    params = {v: count_parameters(MoeLM(cfg.model_config(v, vocab_size=512))) for v in VARIANTS}
    dense = params["dense"]["active"]
    for v, p in params.items():
        assert p["active"] - p["router"] == dense, (v, p, dense)
        if v != "dense": assert p["total"] > 1.5 * dense
    for v in VARIANTS[1:]:  # every MoE token uses k experts of width d_ff/k plus the shared ones
        m = cfg.model_config(v, 512)
        assert m.num_experts_per_tok * m.d_ff_expert + m.n_shared_experts * m.d_ff_expert == cfg.model.d_ff_expert


def test_cpt_starts_from_the_pretrained_weights(tmp_path, corpus_cache):
    "The first CPT step's loss is the pre-trained model's loss on the first CPT batch (not a fresh model's)."
    corpus = load_cpt_corpus(SMALL, corpus_cache)
    cfg = CPTConfig.scaled(6, 4, corpus=SMALL, **{**TINY, "cpt_eval_every": 1})  # a record at every CPT step
    pre = pretrain_variant(cfg, "switch_aux", corpus, tmp_path)
    res = continue_variant(cfg, "switch_aux", corpus, pre["weights"], tmp_path, replays=(0.0,))
    model = MoeLM(cfg.model_config("switch_aux", corpus.vocab_size))
    model.load_state_dict(load_weights(pre["weights"]["pretrain"]))
    batch = PhaseBatches(corpus, replay_weights(cfg.d1, cfg.d2, 0.0), cfg.batch_size, cfg.seq_len, cfg.seed + 1)(0)
    with torch.no_grad(): loss = model.train()(**batch).lm_loss.item()
    assert res["cpt_r0"][0]["step"] == 1 and res["cpt_r0"][0]["lm_loss"] == pytest.approx(loss, rel=1e-6)
    seed_everything(123); fresh = MoeLM(cfg.model_config("switch_aux", corpus.vocab_size))
    with torch.no_grad(): assert abs(fresh.train()(**batch).lm_loss.item() - loss) > 1e-3  # a fresh model differs
    # the start evaluation is the pre-trained model's, and CPT lowered the D2 loss below it
    assert res["start"]["d1_loss"] == pytest.approx(pre["pretrain"][-1]["eval_d1_loss"], rel=1e-6)
    assert res["cpt_r0"][-1]["eval_d2_loss"] < res["start"]["d2_loss"] - 0.02


def test_bad_arguments_fail_before_training(tmp_path, corpus_cache):
    corpus = load_cpt_corpus(SMALL, corpus_cache)
    cfg = CPTConfig.scaled(6, 4, corpus=SMALL, **TINY)
    with pytest.raises(ValueError, match="unknown variant 'moe'"): pretrain_variant(cfg, "moe", corpus, tmp_path)
    with pytest.raises(ValueError, match="replay must be a fraction"): continue_variant(cfg, "dense", corpus, {}, tmp_path, replays=(0.0, 1.0))
    with pytest.raises(ValueError, match="not the one of cfg.corpus"): pretrain_variant(CPTConfig.scaled(6, 4, **TINY), "dense", corpus, tmp_path)
    with pytest.raises(ValueError, match="d_ff_expert must divide by 4"): CPTConfig(model=ModelSettings(d_ff_expert=130))
    with pytest.raises(ValueError, match="derive from a Switch model"): CPTConfig(model=ModelSettings(top_k=2))
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_committed_checkpoints_are_complete_and_small():
    "data/cpt_checkpoints: every file of the manifest with its sha256, provenance from a clean commit, <= 8 MB."
    m = json.loads((CHECKPOINT_DIR / "manifest.json").read_text())
    assert m["commit"] and m["dirty"] is False and "make_checkpoints" in m["command"]
    assert set(m["variants"]) == set(DEFAULT_VARIANTS) and len(m["seeds"]) >= 3
    for name, meta in m["files"].items():
        assert hashlib.sha256((CHECKPOINT_DIR / name).read_bytes()).hexdigest() == meta["sha256"], name
    assert sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir()) <= 8 * 2**20


def test_notebook_defaults_find_every_committed_run():
    "The runs are keyed by their settings and by the corpus key, which includes the tokenizers version."
    import tokenizers
    # they were made with the lock's tokenizers; `make test` installs the lock, `make test-min` the floors
    locked = re.search(r"^tokenizers==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    if tokenizers.__version__ != locked:
        pytest.skip(f"tokenizers {tokenizers.__version__} is installed; the committed runs are keyed to {locked} (constraints.txt)")
    m = json.loads((CHECKPOINT_DIR / "manifest.json").read_text())
    got = committed_pretraining(CPTConfig(), DEFAULT_VARIANTS, m["seeds"])
    assert len(got) == len(DEFAULT_VARIANTS) * len(m["seeds"])
    assert all("d2_only" in got[("dense", s)] for s in m["seeds"])  # the shift precondition's model


@pytest.mark.retrain
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retraining_reproduces_a_committed_checkpoint():
    "Pre-training dense seed 0 again from scratch reaches the committed checkpoint's held-out D1 loss (within 0.01 nats)."
    m = json.loads((CHECKPOINT_DIR / "manifest.json").read_text())
    cfg = CPTConfig()
    assert dataclasses.asdict(cfg) == {**m["config"], "seed": 0}  # the committed config is the default
    got = committed_pretraining(cfg, ["dense"], [0])[("dense", 0)]
    corpus = load_cpt_corpus(cfg.corpus)
    seed_everything(cfg.seed); model = MoeLM(cfg.model_config("dense", corpus.vocab_size))
    ev = CPTEvaluator(corpus, cfg.d1, cfg.d2, cfg.eval_batches, cfg.batch_size, cfg.seq_len)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hist = run_phase(model, PhaseBatches(corpus, {cfg.d1: 1.0}, cfg.batch_size, cfg.seq_len, cfg.seed),
                         cfg.pretrain_schedule(cfg.pretrain_steps), cfg.pretrain_steps, d, cfg, ev)
    assert hist[-1]["eval_d1_loss"] == pytest.approx(got["pretrain"][-1]["eval_d1_loss"], abs=0.01)
    committed = load_weights(got["weights"]["pretrain"])
    drift = max((model.state_dict()[k] - v).abs().max().item() for k, v in committed.items())
    assert drift < 0.05, drift


def driver(tmp_path, root, cache, out, sleep=0.0):
    script = tmp_path / "cpt_driver.py"
    script.write_text(DRIVER)
    args = [sys.executable, str(script), str(root), str(cache), str(out), str(sleep), json.dumps(dataclasses.asdict(SMALL)),
            json.dumps({**TINY, "model": dataclasses.asdict(TINY["model"])})]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=400):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_cpt_then_resume_gives_identical_metrics(tmp_path, corpus_cache):
    cfg = CPTConfig.scaled(6, 10, corpus=SMALL, **TINY)
    ckpt = tmp_path / "killed" / f"switch_aux-seed0-{cfg.key('switch_aux')}" / "cpt_r0.3" / CHECKPOINT_NAME
    p = driver(tmp_path, tmp_path / "killed", corpus_cache, tmp_path / "never.json", sleep=0.3)
    deadline, step = time.time() + 300, None
    while time.time() < deadline and p.poll() is None:
        if ckpt.exists() and (step := load_checkpoint(ckpt)["step"]) >= 2: break
        time.sleep(0.05)
    assert p.poll() is None, f"the driver ended before it could be killed: {p.communicate()[1][-2000:]}"
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert 2 <= step < 10, step  # killed mid-way through the continual phase, after a checkpoint
    assert not (tmp_path / "never.json").exists()

    resumed = driver(tmp_path, tmp_path / "killed", corpus_cache, tmp_path / "resumed.json")
    straight = driver(tmp_path, tmp_path / "straight", corpus_cache, tmp_path / "straight.json")
    finish(resumed); finish(straight)
    a, b = json.loads((tmp_path / "resumed.json").read_text()), json.loads((tmp_path / "straight.json").read_text())
    assert a == b  # every record, eval metrics (loss, imbalance, drift, gates) included, bit for bit
    final = a["cpt_r0.3"][-1]
    assert final["step"] == 10 and {"eval_d1_loss", "eval_d2_loss", "eval_d1_mri_l0", "eval_drift_l1", "eval_d1_gate_l0"} <= set(final)
    assert final["eval_drift_l0"] > 0  # the run really changed the routing, so equal drift is a real check


def test_thread_rerun_agrees_with_the_committed_run():
    "data/results/cpt_rerun_threads2.json is the default run in 1 process x 2 threads; every effect agrees with the committed notebook's (2 x 1)."
    from moebook.evidence import agreement, read_claims
    rerun = json.loads((ROOT / "data" / "results" / "cpt_rerun_threads2.json").read_text())
    committed = read_claims(ROOT / "nbs" / "03_moe_cpt.ipynb")
    execution = ("workers", "threads")
    params = lambda r: {k: v for k, v in r["params"].items() if k not in execution}
    assert params(rerun["records"][0]) == params(committed[0]) and committed[0]["setting"] == "default"
    assert [rerun["records"][0]["params"][k] for k in execution] == [1, 2] != [committed[0]["params"][k] for k in execution]
    assert rerun["commit"] and rerun["dirty"] is False
    rows = agreement(committed, rerun["records"])
    assert len(rows) == len(committed) == 12 and all(r["agree"] for r in rows), [r for r in rows if not r["agree"]]
