"Package tests of moebook.moe: dispatch vs the loop reference, losses, the global balancer on 2 gloo ranks, MoeLM."
import json, math, os, tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moebook.moe import (FAMILIES, GlobalBalancer, MoEConfig, MoELayer, MoeLM, MoeLMConfig, RoutingStats, Router,
                         count_parameters, dense_matched, dispatch, expert_counts, load_balancing_loss, moe_reference,
                         plot_load_heatmap, routing_stats, sinkhorn, z_loss)

torch.set_num_threads(1)
WORLD = 2
E, K, D = 4, 2, 8


# ---------------------------------------------------------------- dispatch and layer
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_grouped_dispatch_equals_loop_forward_and_grads(family, dtype, tol):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig.family(family, 16, 32, n_experts=4)).to(dtype)
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    y, _ = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = moe_reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=tol, rtol=tol)


def test_capacity_drops_are_counted_and_match_loop():
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(d_model=16, d_ff_expert=8, n_experts=4, top_k=2, capacity_factor=0.75)).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    y, aux = layer(x)
    cap = math.ceil(0.75 * 32 * 2 / 4)
    assert aux.dropped == int((aux.routed_counts - cap).clamp(min=0).sum()) > 0
    torch.testing.assert_close(y, moe_reference(layer, x))


def test_dispatch_offsets_and_stability():
    idx = torch.tensor([[1, 0], [1, 2], [0, 1]])
    d = dispatch(idx, 4)
    assert d.counts.tolist() == [2, 3, 1, 0] and d.offsets.dtype == torch.int32
    assert d.offsets.tolist() == [2, 5, 6, 6]
    assert d.token_idx.tolist() == [0, 2, 0, 1, 2, 1]


def test_sinkhorn_balances_and_reports_non_convergence():
    torch.manual_seed(0)
    logits = torch.randn(256, 8) + torch.linspace(3, -3, 8)
    balanced, iters, ok = sinkhorn(logits, tol=1e-5, max_iters=1000)
    assert ok and iters > 1
    load = torch.bincount(balanced.argmax(-1), minlength=8).float()
    assert (load.max() - load.mean()) / load.mean() < 0.3
    assert sinkhorn(logits, tol=1e-12, max_iters=2)[1:] == (2, False)
    r = Router(MoEConfig(d_model=8, n_experts=4, top_k=1, router="sinkhorn", sinkhorn_max_iters=1, sinkhorn_tol=1e-9))
    out = r(torch.randn(20, 8))
    assert out.sinkhorn_iters == 1 and out.sinkhorn_converged is False
    torch.testing.assert_close(out.gates, torch.sigmoid(out.logits).gather(-1, out.expert_idx))
    r.eval()
    assert r(torch.randn(20, 8)).sinkhorn_iters == 0  # plain top-k at inference


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="top_k=5 > n_experts=4"): MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="expects"): MoELayer(MoEConfig(d_model=8))(torch.randn(4, 6))
    with pytest.raises(FloatingPointError, match="non-finite router logits"):
        MoELayer(MoEConfig(d_model=8))(torch.full((4, 8), float("inf")))
    with pytest.raises(ValueError, match="share leading dims"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must have"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), mask=torch.ones(3))
    with pytest.raises(ValueError, match="sequence"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), scope="sequence")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        GlobalBalancer(process_group=object())


# ---------------------------------------------------------------- losses
def test_lbl_normalisation_and_mapping_to_transformers():
    for e, k in [(4, 1), (8, 2), (16, 4)]:
        idx = torch.arange(4 * e * k).reshape(4 * e, k) % e
        assert abs(load_balancing_loss(torch.full((4 * e, e), 1 / e), idx).item() - 1) < 1e-6
    # transformers' Mixtral formula (one layer): sum_i mean_t(k-hot_i) * mean_t(p_i) * E  == k * ours
    torch.manual_seed(0)
    probs = torch.rand(50, 6).softmax(-1); idx = probs.topk(2).indices
    hf = (F.one_hot(idx, 6).sum(1).float().mean(0) * probs.mean(0)).sum() * 6
    torch.testing.assert_close(hf, 2 * load_balancing_loss(probs, idx))


def test_lbl_gradient_only_through_probs_and_z_loss():
    torch.manual_seed(0)
    logits = torch.randn(30, 5, requires_grad=True)
    probs = logits.softmax(-1); idx = probs.topk(2).indices
    counts = expert_counts(idx, 5).float()
    expected = 5 * ((counts / counts.sum()) * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, idx), expected)
    torch.testing.assert_close(z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())
    m = torch.ones(30); m[20:] = 0
    torch.testing.assert_close(z_loss(logits, m), (torch.logsumexp(logits[:20], -1) ** 2).mean())


def test_buffer_accumulates_like_one_big_batch_and_resets():
    torch.manual_seed(0)
    probs = torch.rand(24, E).softmax(-1); idx = probs.topk(K).indices
    bal = GlobalBalancer()
    losses = [load_balancing_loss(probs[i:i + 8], idx[i:i + 8], scope="global", balancer=bal, layer=3) for i in (0, 8, 16)]
    assert torch.equal(bal.buffers[3], expert_counts(idx, E)) and bal.steps[3] == 3
    f_big = expert_counts(idx, E).double() / (24 * K)  # the last micro-step uses f of the whole batch
    torch.testing.assert_close(losses[-1], (E * (f_big * probs[16:].double().mean(0)).sum()).float())
    after_optimizer_step = [bal.reset]
    for cb in after_optimizer_step: cb()
    assert bal.buffers == {} and bal.steps == {}


# ---------------------------------------------------------------- two gloo ranks
def _router_loss(w, x, mask, scope, balancer):
    "LBL of a linear router with weight w (E, D) on tokens x (T, D)."
    probs = (x @ w.T).softmax(-1)
    return load_balancing_loss(probs, probs.topk(K).indices, mask, scope, balancer)


def _data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, D, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in (6, 10)]  # unequal tokens per rank
    masks = [torch.ones(6, dtype=torch.float64), torch.tensor([1.0] * 8 + [0.0] * 2, dtype=torch.float64)]
    micro = [[torch.randn(5, D, generator=g, dtype=torch.float64) for _ in range(3)] for _ in range(WORLD)]
    return w, xs, masks, micro


class _Megatron3672Balancer(GlobalBalancer):
    "The reported bug: global f, but P normalised by the local token count (gradient 1/world_size too small)."
    def fractions(self, counts, layer=0, top_k=1):
        f, p_norm = super().fractions(counts, layer, top_k)
        return f, p_norm * self.world_size


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        w0, xs, masks, micro = _data()
        res = {}
        for name, cls in [("ours", GlobalBalancer), ("bug", _Megatron3672Balancer)]:
            router = torch.nn.Linear(D, E, bias=False).double()
            router.weight.data.copy_(w0)
            ddp = torch.nn.parallel.DistributedDataParallel(router)  # averages gradients over ranks
            bal = cls(dist.group.WORLD)
            probs = ddp(xs[rank]).softmax(-1)
            loss = load_balancing_loss(probs, probs.topk(K).indices, masks[rank], "global", bal)
            loss.backward()
            value = loss.detach().clone(); dist.all_reduce(value); value /= WORLD
            res[name] = {"loss": value.item(), "grad": router.weight.grad.tolist()}
        # accumulation over 3 micro-steps on each rank
        bal = GlobalBalancer(dist.group.WORLD)
        for x in micro[rank]:
            probs = (x @ w0.T).softmax(-1)
            load_balancing_loss(probs, probs.topk(K).indices, scope="global", balancer=bal)
        res["buffer"] = bal.buffers[0].tolist()
        bal.reset(); res["after_reset"] = len(bal.buffers)
        # a whole MoeLM under DDP with global scope
        torch.manual_seed(0)
        model = MoeLM(_lm_config("global")).double()
        model.set_balancer(GlobalBalancer(dist.group.WORLD))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = _lm_batch()[rank * 2:(rank + 1) * 2]
        out = ddp(ids, labels=ids)
        out.loss.backward()
        res["lm_grads"] = {n: p.grad.tolist() for n, p in model.named_parameters() if "router" in n}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()  # leave together (see moebook.train.close_distributed)
    finally:
        dist.destroy_process_group()


def _lm_config(scope):
    return MoeLMConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, n_experts=E, num_experts_per_tok=K,
                       d_ff_expert=8, aux_loss_coef=1.0, lb_scope=scope)


def _lm_batch():
    return torch.randint(0, 16, (4, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(out / "init"), out), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _single_process_reference():
    w0, xs, masks, _ = _data()
    w = w0.clone().requires_grad_()
    loss = _router_loss(w, torch.cat(xs), torch.cat(masks), "micro", None)
    return loss.item(), torch.autograd.grad(loss, w)[0]


def test_global_scope_two_ranks_equals_single_process(two_ranks):
    ref_loss, ref_grad = _single_process_reference()
    for r in two_ranks:
        assert abs(r["ours"]["loss"] - ref_loss) < 1e-6
        torch.testing.assert_close(torch.tensor(r["ours"]["grad"], dtype=torch.float64), ref_grad, atol=1e-6, rtol=0)


def test_global_scope_check_catches_world_size_error(two_ranks):
    "The same comparison flags a balancer whose gradient is 1/world_size too small (Megatron-LM #3672)."
    _, ref_grad = _single_process_reference()
    bug_grad = torch.tensor(two_ranks[0]["bug"]["grad"], dtype=torch.float64)
    assert (bug_grad - ref_grad).abs().max() > 1e-3
    torch.testing.assert_close(bug_grad * WORLD, ref_grad, atol=1e-6, rtol=0)


def test_global_buffer_over_micro_steps_and_ranks(two_ranks):
    w0, _, _, micro = _data()
    all_tokens = torch.cat([x for rank in micro for x in rank])
    expected = expert_counts((all_tokens @ w0.T).topk(K).indices, E).tolist()
    for r in two_ranks:
        assert r["buffer"] == expected and r["after_reset"] == 0


def test_moelm_ddp_global_equals_single_process(two_ranks):
    torch.manual_seed(0)
    model = MoeLM(_lm_config("micro")).double()
    ids = _lm_batch()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "router" not in name: continue
        for r in two_ranks:
            torch.testing.assert_close(torch.tensor(r["lm_grads"][name], dtype=torch.float64), p.grad, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- MoeLM
def _tiny(family="topk", **kw):
    torch.manual_seed(0)
    return MoeLM(MoeLMConfig.from_family(family, d_ff=32, n_experts=4, vocab_size=20, d_model=16, n_layers=2, n_heads=2, **kw))


def test_moelm_outputs_losses_and_stats():
    model = _tiny()
    ids = torch.randint(0, 20, (3, 9)); am = torch.ones_like(ids); am[2, 5:] = 0
    labels = ids.masked_fill(am == 0, -100)
    out = model(ids, attention_mask=am, labels=labels, output_router_stats=True)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.loss, lm + 1e-2 * out.aux_loss + 1e-3 * out.z_loss)
    assert len(out.router_stats) == 2 and all(isinstance(s, RoutingStats) for s in out.router_stats)
    assert all(int(s.load.sum()) == (27 - 4) * 2 for s in out.router_stats)
    assert model(ids).loss is None and model(ids).router_stats is None


@pytest.mark.parametrize("scope", ["micro", "sequence"])
def test_moelm_scopes_train(scope):
    model = _tiny(lb_scope=scope)
    ids = torch.randint(0, 20, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)


def test_moelm_global_scope_with_accumulation_single_process():
    model = _tiny(lb_scope="global")
    with pytest.raises(RuntimeError, match="set_balancer"):
        model(torch.randint(0, 20, (2, 8)))
    bal = GlobalBalancer(); model.set_balancer(bal)
    batches = torch.randint(0, 20, (3, 2, 8))
    for b in batches: model(b, labels=b).loss.backward()
    assert all(v.sum() == 3 * 16 * 2 for v in bal.buffers.values()) and set(bal.buffers) == {0, 1}
    bal.reset()
    model.eval(); model(batches[0]); assert bal.buffers == {}  # evaluation does not touch the buffer


def test_moelm_roundtrip_and_greedy_generate(tmp_path):
    model = _tiny("deepseek").eval()
    ids = torch.randint(0, 20, (2, 6))
    model.save_pretrained(tmp_path)
    again = MoeLM.from_pretrained(tmp_path).eval()
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}
    assert drop(again.config.to_dict()) == drop(model.config.to_dict())
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    a, b = model.generate(ids, **gen), again.generate(ids, **gen)
    assert a.shape == (2, 12) and torch.equal(a, b) and torch.equal(a, model.generate(ids, **gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_matched_has_equal_active_parameters(family):
    cfg = MoeLMConfig.from_family(family, d_ff=64, n_experts=4, vocab_size=20, d_model=16, n_layers=3, n_heads=2, moe_layers=[0, 2])
    moe, dense = count_parameters(MoeLM(cfg)), count_parameters(MoeLM(dense_matched(cfg)))
    assert moe["active"] - moe["router"] == dense["active"] == dense["total"]
    assert moe["router"] == 2 * 16 * cfg.n_experts and moe["total"] > dense["total"]


def test_routing_stats_and_heatmap():
    layer = MoELayer(MoEConfig(d_model=8, n_experts=4, top_k=1))
    with torch.no_grad(): layer.router.weight.zero_(); layer.router.weight[0, :] = 10.0  # everyone picks expert 0
    _, aux = layer(torch.ones(10, 8))
    s = routing_stats(aux)
    assert s.load.tolist() == [10, 0, 0, 0] and abs(s.max_violation - 3.0) < 1e-6 and s.max_routed_fraction == 1.0
    ax = plot_load_heatmap(torch.stack([s.load, s.load]))
    assert ax.get_images()[0].get_array().shape == (2, 4)
    with pytest.raises(ValueError, match="layers, experts"): plot_load_heatmap(torch.ones(4))
