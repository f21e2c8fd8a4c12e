"""moebook.cpt: FLOP-matched models, the pre-training -> CPT hand-off, and a continual phase killed with SIGKILL
that resumes to exactly the metrics of an uninterrupted run."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from moebook.corpus import CorpusRecipe, load_corpus
from moebook.cpt import VARIANTS, CPTConfig, PhaseBatches, replay_weights, run_variant
from moebook.moe import MoeLM, count_parameters
from moebook.train import CHECKPOINT_NAME, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MOEBOOK_QUIET": "1", "OMP_NUM_THREADS": "1"}
SMALL = CorpusRecipe(max_bytes_per_domain=50_000, max_doc_bytes=4096, vocab_size=400, tokenizer_sample_bytes=20_000)
TINY = dict(batch_size=4, seq_len=16, d_model=32, d_ff=32, n_experts=4, eval_every=3, cpt_eval_every=2, eval_batches=1)

DRIVER = textwrap.dedent("""
    import json, sys, time
    import torch
    from moebook.corpus import CorpusRecipe, load_corpus
    from moebook.cpt import CPTConfig, run_variant
    torch.set_num_threads(1)
    root, cache, out, sleep, recipe, cfg = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5]), json.loads(sys.argv[6])
    corpus = load_corpus(CorpusRecipe(**recipe), cache)
    hooks = [lambda: time.sleep(sleep)] if sleep else []
    res = run_variant(CPTConfig.scaled(6, 10, **cfg), "switch_aux", corpus, root, replays=(0.3,), after_optimizer_step=hooks)
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
    load_corpus(SMALL, cache)
    return cache


def driver(tmp_path, root, cache, out, sleep=0.0):
    script = tmp_path / "cpt_driver.py"
    script.write_text(DRIVER)
    import dataclasses
    args = [sys.executable, str(script), str(root), str(cache), str(out), str(sleep), json.dumps(dataclasses.asdict(SMALL)), json.dumps(TINY)]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_cpt_then_resume_gives_identical_metrics(tmp_path, corpus_cache):
    ckpt = tmp_path / "killed" / "switch_aux" / "cpt_r0.3" / CHECKPOINT_NAME
    p = driver(tmp_path, tmp_path / "killed", corpus_cache, tmp_path / "never.json", sleep=0.3)
    deadline, step = time.time() + 180, None
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
    assert a == b  # every record of both phases, eval metrics (loss, imbalance, drift) included, bit for bit
    final = a["cpt_r0.3"][-1]
    assert final["step"] == 10 and {"eval_d1_loss", "eval_d2_loss", "eval_d1_mri_l0", "eval_drift_l1"} <= set(final)
    assert final["eval_drift_l0"] > 0  # the run really changed the routing, so equal drift is a real check


def test_five_models_have_equal_active_parameters():
    "The dense model and the four MoEs of the default experiment use the same parameters per token (up to the router)."
    cfg = CPTConfig()
    params = {v: count_parameters(MoeLM(cfg.model_config(v, vocab_size=1024))) for v in VARIANTS}
    dense = params["dense"]["active"]
    for v, p in params.items():
        assert p["active"] - p["router"] == dense, (v, p, dense)
        if v != "dense": assert p["total"] > 2.5 * dense
    with torch.no_grad():  # and the same FLOPs in practice: every MoE token uses k experts of width d_ff/k plus shared
        for v in VARIANTS[1:]:
            m = cfg.model_config(v, 1024)
            assert m.num_experts_per_tok * m.d_ff_expert + m.n_shared_experts * m.d_ff_expert == cfg.d_ff


def test_cpt_starts_from_the_pretrained_weights(tmp_path, corpus_cache):
    "The first CPT step's loss is the pre-trained model's loss on the first CPT batch (not a fresh model's)."
    corpus = load_corpus(SMALL, corpus_cache)
    cfg = CPTConfig.scaled(6, 4, **TINY)
    res = run_variant(cfg, "deepseek_aux", corpus, tmp_path, replays=(0.0,))
    model = MoeLM(cfg.model_config("deepseek_aux", corpus.vocab_size))
    model.load_state_dict(load_checkpoint(tmp_path / "deepseek_aux" / "pretrain" / CHECKPOINT_NAME)["model"])
    batch = PhaseBatches(corpus, replay_weights(cfg.d1, cfg.d2, 0.0), cfg.batch_size, cfg.seq_len, cfg.seed + 1)(0)
    with torch.no_grad(): loss = model.train()(**batch).lm_loss.item()
    assert res["cpt_r0"][0]["lm_loss"] == pytest.approx(loss, rel=1e-6)
    fresh = MoeLM(cfg.model_config("deepseek_aux", corpus.vocab_size))
    with torch.no_grad(): assert abs(fresh.train()(**batch).lm_loss.item() - loss) > 1e-3  # a fresh model differs
    # the pre-training really lowered the D1 loss, and CPT lowered the D2 loss below where pre-training left it
    pre_d1, pre_d2 = ([r[f"eval_{k}"] for r in res["pretrain"] if f"eval_{k}" in r] for k in ("d1_loss", "d2_loss"))
    cpt_d2 = [r["eval_d2_loss"] for r in res["cpt_r0"] if "eval_d2_loss" in r]
    assert len(pre_d1) == 2 and len(cpt_d2) == 2  # evaluations at steps 3, 6 (pre-training) and 2, 4 (CPT)
    assert pre_d1[-1] < pre_d1[0], pre_d1
    assert cpt_d2[-1] < pre_d2[-1] - 0.02, (pre_d2, cpt_d2)


def test_bad_arguments_fail_before_training(tmp_path, corpus_cache):
    corpus = load_corpus(SMALL, corpus_cache)
    with pytest.raises(ValueError, match="unknown variant 'moe'"):
        run_variant(CPTConfig.scaled(6, 4, **TINY), "moe", corpus, tmp_path)
    with pytest.raises(ValueError, match="replay must be a fraction"):
        run_variant(CPTConfig.scaled(6, 4, **TINY), "dense", corpus, tmp_path, replays=(0.0, 1.0))
    with pytest.raises(ValueError, match="d_ff must divide by 4"):
        CPTConfig(d_ff=130)
    assert not any(tmp_path.iterdir())  # nothing was trained or written
