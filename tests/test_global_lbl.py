"""moebook.global_lbl through the MoeLM + train path: the global load-balancing loss over 2 gloo ranks equals
one process on the concatenated batch (value and gradients, fp64), a 1/world_size scale error is caught, the
count buffer accumulates over gradient-accumulation steps and is reset after each optimizer step.

Runs itself as the torchrun worker: `torchrun --nproc_per_node 2 tests/test_global_lbl.py --worker OUT.json`.
"""
import copy, dataclasses, json, os, sys
from pathlib import Path

import pytest
import torch

from moebook.global_lbl import ExperimentConfig, SampledBalancer, block_routes, make_balancer, run_key
from moebook.moe import GlobalBalancer, MoeLM, MoeLMConfig, ModelSettings, capture_routing, expert_counts, update_expert_bias
from moebook.train import TrainConfig, batch_rng, run_torchrun, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MOEBOOK_QUIET": "1", "OMP_NUM_THREADS": "1"}
ROWS, SEQ, VOCAB = 4, 12, 64  # rows per micro-step of the global batch (2 per rank), tokens per row, vocabulary
# AdamW with betas (0, 0) and a huge eps makes the update linear in the gradient: delta = -lr * g / (|g| + eps)
EPS = 1e6


def tiny_model(scope: str) -> MoeLM:
    "A fp64 MoeLM with a strong balance term (aux coefficient 1), so its gradient matters in the comparison."
    torch.manual_seed(0)
    cfg = MoeLMConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, n_experts=4, num_experts_per_tok=2, d_ff_expert=8,
                      n_shared_experts=1, aux_loss_coef=1.0, z_loss_coef=1e-3, lb_scope=scope)
    return MoeLM(cfg).double()


def batches(step, micro):
    return {"input_ids": torch.randint(0, VOCAB, (ROWS, SEQ), generator=batch_rng(0, step, micro))}


def loss_fn(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {"aux": out.aux_loss.detach(), "lm": out.lm_loss.detach()}


def train_cfg(grad_accum: int, steps: int = 2) -> TrainConfig:
    return TrainConfig(max_steps=steps, grad_accum=grad_accum, lr=1.0, eps=EPS, betas=(0.0, 0.0), weight_decay=0.0,
                       grad_clip=0.0, progress=False, device="cpu")


class ScaledBalancer(GlobalBalancer):
    "Megatron-LM #3672: P normalised by all tokens, then averaged over ranks again: gradient 1/world_size too small."
    def fractions(self, counts, layer=0, top_k=1):
        f, p_norm = super().fractions(counts, layer, top_k)
        return f, p_norm * self.world_size


def run(scope: str, grad_accum: int, balancer: GlobalBalancer | None) -> dict:
    "Train 2 steps; the scaled weight change (= summed gradients) and the history."
    model = tiny_model(scope)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.set_balancer(balancer)
    hooks = [balancer.reset] if balancer is not None else []
    history = train(model, batches, train_cfg(grad_accum), loss_fn=loss_fn, after_optimizer_step=hooks)
    grads = {k: ((w0[k] - v) * EPS).tolist() for k, v in model.state_dict().items()}
    return {"grads": grads, "history": history}


def worker(out: str) -> None:
    import torch.distributed as dist
    from moebook.train import close_distributed, init_distributed
    torch.set_num_threads(1)
    init_distributed("cpu")  # the balancer needs the process group when it is built
    res = {"accum1": run("global", 1, GlobalBalancer()), "accum2": run("global", 2, GlobalBalancer()),
           "scaled": run("global", 1, ScaledBalancer())}
    if dist.get_rank() == 0: Path(out).write_text(json.dumps(res))
    close_distributed()


def max_diff(a: dict, b: dict, only: str = "") -> float:
    return max((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max().item() for k in a if only in k)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out.json"
    run_torchrun([__file__, "--worker", out], nproc=2, env=ENV, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_two_ranks_global_equals_one_process_on_concatenated_batch(ddp):
    # reference without any balancer: the micro scope on the whole concatenated batch *is* the global loss
    ref = run("micro", 1, None)
    assert max_diff(ddp["accum1"]["grads"], ref["grads"]) < 1e-6
    for h_ddp, h_ref in zip(ddp["accum1"]["history"], ref["history"]):
        assert abs(h_ddp["aux"] - h_ref["aux"]) < 1e-6 and abs(h_ddp["loss"] - h_ref["loss"]) < 1e-6  # rank shares average to the global value
    # the balance term matters in this comparison: router gradients are far from zero
    assert max(abs(x) for row in ref["grads"]["blocks.0.ffn.router.weight"] for x in row) > 1e-3


@pytest.mark.distributed
def test_two_ranks_with_accumulation_equal_one_process_buffer(ddp):
    ref = run("global", 2, GlobalBalancer())  # one process, 2 accumulation steps of the 4 rows, count buffer
    assert max_diff(ddp["accum2"]["grads"], ref["grads"]) < 1e-6
    assert abs(ddp["accum2"]["history"][-1]["aux"] - ref["history"][-1]["aux"]) < 1e-6
    # and the buffer makes accumulation differ from treating every micro-step alone (micro scope)
    assert max_diff(ref["grads"], run("micro", 2, None)["grads"], "router") > 1e-4


@pytest.mark.distributed
def test_world_size_scale_error_is_caught(ddp):
    ref = run("micro", 1, None)
    err_router = max_diff(ddp["scaled"]["grads"], ref["grads"], "router")
    assert err_router > 1e-3, err_router  # the comparison above would fail on this bug
    # the LM part is unaffected: a model without the balance term would match (checked via the loss values)
    assert abs(ddp["scaled"]["history"][0]["lm"] - ref["history"][0]["lm"]) < 1e-6


class RecordingBalancer(GlobalBalancer):
    "Snapshots (layer, buffer) after every micro-step."
    def __init__(self):
        super().__init__(); self.snapshots = []

    def fractions(self, counts, layer=0, top_k=1):
        out = super().fractions(counts, layer, top_k)
        self.snapshots.append((layer, self.buffers[layer].clone()))
        return out


def routing_counts(model, ids) -> dict[int, torch.Tensor]:
    with torch.no_grad(), capture_routing(model) as cap: model(ids)
    return {layer: expert_counts(r[0].expert_idx, 4) for layer, r in block_routes(model, cap).items()}


@pytest.mark.parametrize("reset", [True, False])
def test_buffer_over_accumulation_equals_big_batch_and_resets(reset):
    model = tiny_model("global").train()
    start = copy.deepcopy(model).eval()  # eval mode: micro scope, no balancer needed
    big = torch.cat([batches(0, m)["input_ids"] for m in range(3)])  # step 0's three micro-batches as one batch
    expected_step0 = routing_counts(start, big)
    bal = RecordingBalancer(); model.set_balancer(bal)
    train(model, batches, train_cfg(3, steps=2), loss_fn=loss_fn, after_optimizer_step=[bal.reset] if reset else [])
    by_layer = {layer: [b for l, b in bal.snapshots if l == layer] for layer in (0, 1)}
    slots = ROWS * SEQ * 2  # token-slots of one micro-step (k = 2)
    for layer, snaps in by_layer.items():
        assert len(snaps) == 6  # 2 steps x 3 micro-steps
        assert torch.equal(snaps[2], expected_step0[layer])  # after 3 micro-steps: the counts of one big batch
        assert [int(s.sum()) for s in snaps[:3]] == [slots, 2 * slots, 3 * slots]
        # the first micro-step of step 1 starts from an empty buffer only if reset runs after the optimizer step
        assert int(snaps[3].sum()) == (slots if reset else 4 * slots)
    assert (bal.buffers == {}) == reset


def test_sampled_balancer_through_train_matches_global_when_sample_is_everything():
    "With a sample of all tokens and one micro-step, the sampled loss is the global (= big-batch) loss."
    ref = run("micro", 1, None)
    model = tiny_model("global"); w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bal = SampledBalancer(n_sample=ROWS * SEQ, seed=0); model.set_balancer(bal)

    def sampled_loss(m, batch):
        bal.prepare(m, batch["input_ids"][None], step=0)
        return loss_fn(m, batch)
    train(model, batches, train_cfg(1), loss_fn=sampled_loss, after_optimizer_step=[bal.reset])
    grads = {k: ((w0[k] - v) * EPS).tolist() for k, v in model.state_dict().items()}
    assert max_diff(grads, ref["grads"]) < 1e-6


class FractionRecorder:
    "Wraps a balancer's fractions to record (layer, f) of every call."
    def __init__(self, balancer):
        self.calls, self.inner = [], balancer.fractions
        balancer.fractions = self

    def __call__(self, counts, layer=0, top_k=1):
        f, norm = self.inner(counts, layer, top_k)
        self.calls.append((layer, f.clone()))
        return f, norm


def test_global_full_f_is_the_whole_steps_f_at_every_micro_step():
    "global_full: at every micro-step f = the expert fractions of the whole step (one forward of all its tokens)."
    n_micro = 3
    cfg = ExperimentConfig(n_micro=n_micro, batch_size=ROWS, seq_len=SEQ)
    step_ids = torch.stack([batches(0, m)["input_ids"] for m in range(n_micro)])  # (M, ROWS, SEQ)
    model = tiny_model("global").train()
    whole = routing_counts(copy.deepcopy(model).eval(), step_ids.reshape(-1, SEQ))  # independent: one big forward
    for variant, exact in (("global_full", True), ("global", False)):
        m = copy.deepcopy(model); bal = make_balancer(variant, cfg); m.set_balancer(bal); rec = FractionRecorder(bal)
        if isinstance(bal, SampledBalancer): bal.prepare(m, step_ids, step=0)
        for j in range(n_micro): m(input_ids=step_ids[j], labels=step_ids[j])
        assert len(rec.calls) == n_micro * 2  # micro-steps x MoE layers
        first = {layer: f for layer, f in rec.calls[:2]}
        for layer, f in (rec.calls if exact else first.items()):
            ref = whole[layer].double() / whole[layer].sum()
            # global_full: exact at every micro-step; the running buffer (Algorithm 1) is not, at micro-step 0
            assert torch.allclose(f, ref, atol=1e-12) == exact, (variant, layer)


def test_run_key_changes_with_every_setting():
    base = ExperimentConfig()
    keys = {run_key("micro", base)}
    bump = lambda v: "cuda" if isinstance(v, str) else v + 1 if isinstance(v, int) else v * 2 + 0.5
    changes = [{f.name: bump(getattr(base, f.name))} for f in dataclasses.fields(ExperimentConfig) if f.name != "model"]
    changes += [{"model": dataclasses.replace(base.model, **{f.name: bump(getattr(base.model, f.name))})} for f in dataclasses.fields(ModelSettings)]
    assert len(changes) == len(dataclasses.fields(ExperimentConfig)) - 1 + len(dataclasses.fields(ModelSettings))
    for change in changes:
        key = run_key("micro", dataclasses.replace(base, **change))
        assert key not in keys, f"changing {change} reuses a checkpoint folder: {key}"
        keys.add(key)
    assert run_key("global", base) not in keys
    assert run_key("micro", base) == run_key("micro", ExperimentConfig())  # and it is stable


def test_loss_free_bias_moves_against_a_constructed_imbalance():
    "The loss_free model: no balance loss; after a step the bias falls for overloaded experts and rises for idle ones."
    cfg = ExperimentConfig(model=ModelSettings(d_model=16, n_heads=2, n_experts=4, top_k=2, d_ff_expert=8, n_shared_experts=1), bias_update_rate=0.01)
    torch.manual_seed(0)
    model = MoeLM(cfg.model_config(VOCAB, "micro", loss_free=True)).train()
    routers = [b.ffn.router for b in model.blocks]
    assert model.config.aux_loss_coef == 0.0 and all(r.expert_bias is not None for r in routers)
    for r in routers: r.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))  # every token picks experts 0 and 1
    ids = batches(0, 0)["input_ids"]
    with capture_routing(model) as cap: model(input_ids=ids, labels=ids)
    for outs in cap.outputs: assert set(outs[0].expert_idx.unique().tolist()) == {0, 1}
    update_expert_bias(model)
    for r in routers:
        assert torch.allclose(r.expert_bias, torch.tensor([4.99, 4.99, 0.01, 0.01])), r.expert_bias


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(sys.argv[sys.argv.index("--worker") + 1])
