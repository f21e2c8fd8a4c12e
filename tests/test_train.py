"""moebook.train: exact resume (in process and after SIGKILL), atomic checkpoints, gradient accumulation,
DDP under torchrun (gloo, CPU) equal to a single process, hooks, history and argument checks."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from moebook.schedules import InfiniteSchedule, WarmupCosine
from moebook.train import (CHECKPOINT_NAME, TinyRegressor, TrainConfig, batch_rng, load_checkpoint, regression_batches,
                           run_torchrun, save_checkpoint, shard_batch, train)

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ["-m", "moebook.train"]  # the training command line that ships with the package
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MOEBOOK_QUIET": "1", "OMP_NUM_THREADS": "1"}


def tiny(dropout=0.1):
    torch.manual_seed(0)
    return TinyRegressor(dropout)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def cfg(**kw):
    return TrainConfig(**{"lr": 1e-2, "progress": False, "device": "cpu", **kw})


SCHED = WarmupCosine(1e-2, total_steps=12, warmup_steps=3, lr_min=1e-3)


def test_resume_in_process_is_exact(tmp_path):
    full = tiny()
    h_full = train(full, regression_batches(8), cfg(max_steps=10, ckpt_every=5, ckpt_dir=tmp_path / "a"), SCHED)
    first = tiny()
    train(first, regression_batches(8), cfg(max_steps=5, ckpt_every=5, ckpt_dir=tmp_path / "b"), SCHED)
    resumed = tiny(dropout=0.1)
    torch.rand(100)  # disturb the RNG: resuming must restore it
    h_res = train(resumed, regression_batches(8), cfg(max_steps=10, ckpt_every=5, ckpt_dir=tmp_path / "b"), SCHED, resume=True)
    assert h_res == h_full
    assert max_diff(state(resumed), state(full)) == 0.0
    # resuming a finished run changes nothing
    again = tiny()
    assert train(again, regression_batches(8), cfg(max_steps=10, ckpt_dir=tmp_path / "b"), SCHED, resume=True) == h_full
    assert max_diff(state(again), state(full)) == 0.0


def test_resume_restores_optimizer_and_rng_not_just_weights(tmp_path):
    "Loading only the weights (fresh AdamW moments, fresh RNG) would give a different run: the test above is sensitive."
    full = tiny()
    train(full, regression_batches(8), cfg(max_steps=10), SCHED)
    first = tiny()
    train(first, regression_batches(8), cfg(max_steps=5), SCHED)
    naive = tiny()
    naive.load_state_dict(first.state_dict())
    shifted = lambda step, micro: regression_batches(8)(step + 5, micro)
    train(naive, shifted, cfg(max_steps=5), lambda s: SCHED(s + 5))
    assert max_diff(state(naive), state(full)) > 1e-6


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"step": 3, "w": torch.arange(5.0)}, path)

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half written")  # a partial file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 4, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and torch.equal(ck["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_resume_ignores_and_removes_stale_temporary(tmp_path):
    train(tiny(), regression_batches(8), cfg(max_steps=4, ckpt_every=2, ckpt_dir=tmp_path), SCHED)
    (tmp_path / f".{CHECKPOINT_NAME}.abc.tmp").write_bytes(b"garbage from a killed writer")
    h = train(tiny(), regression_batches(8), cfg(max_steps=6, ckpt_every=2, ckpt_dir=tmp_path), SCHED, resume=True)
    assert [r["step"] for r in h] == list(range(1, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def run_driver(*args, **popen):
    return subprocess.Popen([sys.executable, *DRIVER, *map(str, args)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    common = ["--steps", 30, "--ckpt-every", 5, "--dropout", 0.1]
    full = run_driver(*common, "--ckpt-dir", tmp_path / "full", "--out", tmp_path / "full.json")
    assert full.wait(timeout=120) == 0, full.stderr.read()

    ck = tmp_path / "killed" / CHECKPOINT_NAME
    victim = run_driver(*common, "--ckpt-dir", ck.parent, "--sleep", 0.2, "--out", tmp_path / "killed.json")
    deadline = time.time() + 90
    while not ck.exists():
        assert victim.poll() is None, "the run ended before it could be killed: " + victim.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    killed_at = load_checkpoint(ck)["step"]
    assert 5 <= killed_at < 30 and not (tmp_path / "killed.json").exists()

    resumed = run_driver(*common, "--ckpt-dir", ck.parent, "--resume", "--out", tmp_path / "resumed.json")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    a, b = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    assert b["history"] == a["history"] and b["weights"] == a["weights"]
    assert len(a["history"]) == 30


@pytest.mark.distributed
def test_torchrun_two_ranks_equals_single_process(tmp_path):
    "2 ranks x 4 rows x 2 micro-steps (no_sync on the first) == 1 process x 8 rows x 2 micro-steps."
    common = ["--steps", 12, "--rows", 8, "--grad-accum", 2, "--dropout", 0.0]
    args = [*common, "--out", tmp_path / "ddp.json", "--ckpt-dir", tmp_path / "ck", "--ckpt-every", 6]
    run_torchrun([*DRIVER, *args], nproc=2, env=ENV, timeout=300)
    single = run_driver(*common, "--out", tmp_path / "single.json")
    assert single.wait(timeout=120) == 0, single.stderr.read()
    a, b = json.loads((tmp_path / "ddp.json").read_text()), json.loads((tmp_path / "single.json").read_text())
    for k in a["weights"]:
        assert torch.allclose(torch.tensor(a["weights"][k]), torch.tensor(b["weights"][k]), atol=1e-6, rtol=0), k
    assert [r["loss"] for r in a["history"]] == pytest.approx([r["loss"] for r in b["history"]], abs=1e-6)
    assert load_checkpoint(tmp_path / "ck" / CHECKPOINT_NAME)["world_size"] == 2  # only rank 0 wrote it
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CHECKPOINT_NAME]


def test_grad_accum_equals_big_batch():
    """2 micro-batches of 8 rows == 1 batch of the same 16 rows. AdamW is nearly blind to the scale of the gradient,
    so a missing `/ grad_accum` (gradients twice too large) shows in the logged gradient norm (taken before clipping)
    and, with eps=1 (the update then grows with the gradient), in the weights."""
    big = regression_batches(16)
    halves = lambda step, micro: {k: v[8 * micro:8 * (micro + 1)] for k, v in big(step, 0).items()}
    for kw in (dict(eps=1.0), dict(grad_clip=0.0)):
        a, b = tiny(0.0), tiny(0.0)
        ha = train(a, halves, cfg(max_steps=8, grad_accum=2, **kw), SCHED)
        hb = train(b, big, cfg(max_steps=8, **kw), SCHED)
        assert [r["grad_norm"] for r in ha] == pytest.approx([r["grad_norm"] for r in hb], rel=1e-5), kw
        assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], abs=1e-6), kw
        assert max_diff(state(a), state(b)) < 1e-6, kw


def test_history_lr_follows_schedule_and_clipping_bounds_update():
    inf = InfiniteSchedule(2, 3, lr_max=1e-2, lr_const=5e-3)
    h = train(tiny(), regression_batches(8), cfg(max_steps=8, log_every=2), inf)
    assert [r["step"] for r in h] == [2, 4, 6, 8]
    assert [r["lr"] for r in h] == [inf(1), inf(3), inf(5), inf(7)]
    assert all(r["grad_norm"] > 0 for r in h)


def test_hooks_eval_and_custom_loss():
    order = []

    def loss_fn(model, batch):
        order.append("micro")
        return model(**batch).loss, {"y_mean": batch["y"].mean()}

    def eval_fn(model):
        order.append("eval")
        return {"training_flag": model.training}

    h = train(tiny(), regression_batches(8), cfg(max_steps=4, grad_accum=2, eval_every=2, log_every=10),
              eval_fn=eval_fn, loss_fn=loss_fn, after_optimizer_step=[lambda: order.append("hook")])
    assert order == ["micro", "micro", "hook"] * 2 + ["eval"] + ["micro", "micro", "hook"] * 2 + ["eval"]
    assert [r["step"] for r in h] == [2, 4] and all(r["eval_training_flag"] == 0.0 for r in h)
    assert "y_mean" in h[0]


def test_batch_protocol_helpers():
    assert torch.equal(torch.rand(4, generator=batch_rng(1, 2, 3)), torch.rand(4, generator=batch_rng(1, 2, 3)))
    assert not torch.equal(torch.rand(4, generator=batch_rng(1, 2, 3)), torch.rand(4, generator=batch_rng(1, 3, 2)))
    b = {"x": torch.arange(6), "meta": 1}
    assert torch.equal(torch.cat([shard_batch(b, r, 3)["x"] for r in range(3)]), b["x"])
    with pytest.raises(ValueError, match="must divide by world size 4"):
        shard_batch(b, 0, 4)


@pytest.mark.parametrize("kw,msg", [
    (dict(max_steps=-1), "max_steps must be >= 1"),
    (dict(grad_accum=0), "grad_accum must be >= 1"),
    (dict(log_every=1.5), "log_every must be an int, got float"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(seed=-3), "seed must be >= 0"),
    (dict(ckpt_every=10), "ckpt_every > 0 needs a ckpt_dir"),
    (dict(device="tpu7"), "is not a device"),
])
def test_config_validation(kw, msg):
    with pytest.raises((TypeError, ValueError)) as e:
        TrainConfig(**kw)
    assert msg in str(e.value)


def test_train_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="does not|without a tensor `.loss`"):
        train(torch.nn.Linear(4, 1), lambda s, m: {"input": torch.zeros(2, 4)}, cfg(max_steps=1))
    with pytest.raises(TypeError, match="schedule must be a function"):
        train(tiny(), regression_batches(8), cfg(max_steps=1), schedule=1e-3)
    with pytest.raises(TypeError, match="not callable"):
        train(tiny(), regression_batches(8), cfg(max_steps=1), after_optimizer_step=[None])
    train(tiny(), regression_batches(8), cfg(max_steps=4, ckpt_dir=tmp_path), SCHED)
    with pytest.raises(ValueError, match="beyond cfg.max_steps=2"):
        train(tiny(), regression_batches(8), cfg(max_steps=2, ckpt_dir=tmp_path), SCHED, resume=True)
