"Package tests of moebook.moe: dispatch vs the loop reference, losses, the global balancer on 2 gloo ranks, MoeLM."
import json, math, os, tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moebook.moe import (FAMILIES, GlobalBalancer, MoEConfig, MoELayer, MoeLM, MoeLMConfig, RoutingStats, Router,
                         capture_routing, count_parameters, dense_matched, dispatch, expert_bias_update, expert_counts,
                         load_balancing_loss, moe_reference, plot_load_heatmap, routing_stats, sinkhorn,
                         update_expert_bias, z_loss)

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
    "Independent reference: transformers' Mixtral `load_balancing_loss_func` (one layer) is k times ours, masks included."
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    for e, k in [(4, 1), (8, 2), (16, 4)]:
        idx = torch.arange(4 * e * k).reshape(4 * e, k) % e
        assert abs(load_balancing_loss(torch.full((4 * e, e), 1 / e), idx).item() - 1) < 1e-6
    torch.manual_seed(0)
    for k in (1, 2, 3):
        logits = torch.randn(2, 25, 6) * 2
        mask = torch.ones(2, 25); mask[1, 17:] = 0
        probs = logits.softmax(-1); idx = probs.topk(k).indices
        for m in (None, mask):
            hf = load_balancing_loss_func((logits.reshape(-1, 6),), 6, k, m)
            torch.testing.assert_close(hf, k * load_balancing_loss(probs, idx, m))


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
        # aux-loss-free balancing: counts of 2 micro-steps on each rank, one all-reduce, one sign update
        torch.manual_seed(0)
        model = MoeLM(_lm_config("micro", enable_expert_bias=True, bias_update_rate=0.1)).double()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for ids in _lm_batch(8).split(4)[rank].split(2): ddp(ids, labels=ids).loss.backward()
        res["bias_counts"] = [c.tolist() for c in update_expert_bias(ddp)]
        res["bias"] = [b.ffn.router.expert_bias.tolist() for b in model.blocks]
        (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()  # leave together (see moebook.train.close_distributed)
    finally:
        dist.destroy_process_group()


def _lm_config(scope, **kw):
    return MoeLMConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, n_experts=E, num_experts_per_tok=K,
                       d_ff_expert=8, aux_loss_coef=1.0, lb_scope=scope, **kw)


def _lm_batch(n=4):
    return torch.randint(0, 16, (n, 12), generator=torch.Generator().manual_seed(1))


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


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_global_scope_two_ranks_equals_single_process(two_ranks):
    ref_loss, ref_grad = _single_process_reference()
    for r in two_ranks:
        assert abs(r["ours"]["loss"] - ref_loss) < 1e-6
        torch.testing.assert_close(torch.tensor(r["ours"]["grad"], dtype=torch.float64), ref_grad, atol=1e-6, rtol=0)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_global_scope_check_catches_world_size_error(two_ranks):
    "The same comparison flags a balancer whose gradient is 1/world_size too small (Megatron-LM #3672)."
    _, ref_grad = _single_process_reference()
    bug_grad = torch.tensor(two_ranks[0]["bug"]["grad"], dtype=torch.float64)
    assert (bug_grad - ref_grad).abs().max() > 1e-3
    torch.testing.assert_close(bug_grad * WORLD, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_global_buffer_over_micro_steps_and_ranks(two_ranks):
    w0, _, _, micro = _data()
    all_tokens = torch.cat([x for rank in micro for x in rank])
    expected = expert_counts((all_tokens @ w0.T).topk(K).indices, E).tolist()
    for r in two_ranks:
        assert r["buffer"] == expected and r["after_reset"] == 0


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_moelm_ddp_global_equals_single_process(two_ranks):
    torch.manual_seed(0)
    model = MoeLM(_lm_config("micro")).double()
    ids = _lm_batch()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "router" not in name: continue
        for r in two_ranks:
            torch.testing.assert_close(torch.tensor(r["lm_grads"][name], dtype=torch.float64), p.grad, atol=1e-6, rtol=0)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_expert_bias_two_ranks_equals_single_process(two_ranks):
    "Counts all-reduced over 2 ranks x 2 micro-steps equal the whole batch's; the bias follows the sign rule on them."
    torch.manual_seed(0)
    model = MoeLM(_lm_config("micro", enable_expert_bias=True, bias_update_rate=0.1)).double().eval()  # bias still 0
    with capture_routing(model) as cap: model(_lm_batch(8))
    counts = [expert_counts(c, E).tolist() for c in cap.expert_choices()]
    for r in two_ranks:
        assert r["bias_counts"] == counts
        for got, c in zip(r["bias"], counts):
            mean = sum(c) / E
            assert got == pytest.approx([0.1 * ((mean > v) - (mean < v)) for v in c])


# ---------------------------------------------------------------- MoeLM
def _tiny(family="topk", **kw):
    torch.manual_seed(0)
    return MoeLM(MoeLMConfig.from_family(family, d_ff=32, n_experts=4, **{**dict(vocab_size=20, d_model=16, n_layers=2, n_heads=2), **kw}))


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


# ---------------------------------------------------------------- independent references: transformers' MoE blocks
def _olmoe_block(layer):
    "transformers' OLMoE sparse block with the weights of `layer` (OLMoE stores (E, out, in) expert weights)."
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    c = layer.cfg
    cfg = OlmoeConfig(hidden_size=c.d_model, intermediate_size=c.d_ff_expert, num_experts=c.n_experts,
                      num_experts_per_tok=c.top_k, norm_topk_prob=c.norm_topk_prob)
    cfg._experts_implementation = "eager"  # transformers' per-expert loop
    block = OlmoeSparseMoeBlock(cfg).to(layer.router.weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w_down.transpose(1, 2))
    return block


def _deepseek_v3_moe(layer):
    "transformers' DeepSeek-V3 MoE (sigmoid router with e_score_correction_bias, shared expert) with the weights of `layer`."
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    c = layer.cfg
    cfg = DeepseekV3Config(hidden_size=c.d_model, moe_intermediate_size=c.d_ff_expert, n_routed_experts=c.n_experts,
                           num_experts_per_tok=c.top_k, n_shared_experts=c.n_shared_experts, n_group=1, topk_group=1,
                           routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob)
    cfg._experts_implementation = "eager"
    block = DeepseekV3MoE(cfg).to(layer.router.weight.dtype)
    f = c.d_ff_shared
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.gate.e_score_correction_bias.copy_(layer.router.expert_bias)
        block.experts.gate_up_proj.copy_(layer.experts.w_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w_down.transpose(1, 2))
        block.shared_experts.gate_proj.weight.copy_(layer.shared.w_gate_up.weight[:f])
        block.shared_experts.up_proj.weight.copy_(layer.shared.w_gate_up.weight[f:])
        block.shared_experts.down_proj.weight.copy_(layer.shared.w_down.weight)
    return block


def _fwd_bwd(fn, x, g):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y = y[0] if isinstance(y, tuple) else y
    return y, torch.autograd.grad(y, x, g)[0]


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_layer_equals_transformers_olmoe_block(norm_topk_prob):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff_expert=8, n_experts=6, top_k=2, norm_topk_prob=norm_topk_prob)).double()
    ref = _olmoe_block(layer)
    x, g = torch.randn(3, 10, 16, dtype=torch.float64), torch.randn(3, 10, 16, dtype=torch.float64)
    (y, gx), (y_ref, gx_ref) = _fwd_bwd(layer, x, g), _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref); torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_deepseek_v3_options_equal_transformers_deepseek_v3_moe(norm_topk_prob):
    "sigmoid scores + selection-only bias + top-k renormalisation + routed_scaling_factor + shared expert, vs transformers."
    torch.manual_seed(0)
    cfg = MoEConfig.family("deepseek", 16, 32, n_experts=4, score_function="sigmoid", norm_topk_prob=norm_topk_prob,
                           routed_scaling_factor=2.5, enable_expert_bias=True)
    layer = MoELayer(cfg).double().eval()
    with torch.no_grad(): layer.router.expert_bias.copy_(torch.randn(cfg.n_experts) * 0.3)  # a bias that changes choices
    ref = _deepseek_v3_moe(layer)
    x, g = torch.randn(3, 10, 16, dtype=torch.float64), torch.randn(3, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        no_bias = MoELayer(cfg).double().eval(); no_bias.load_state_dict(layer.state_dict()); no_bias.router.expert_bias.zero_()
        assert not torch.equal(layer(x)[1].router.expert_idx, no_bias(x)[1].router.expert_idx)
    (y, gx), (y_ref, gx_ref) = _fwd_bwd(layer, x, g), _fwd_bwd(ref, x, g)
    torch.testing.assert_close(y, y_ref); torch.testing.assert_close(gx, gx_ref)
    _, w_ref, i_ref = ref.gate(x)
    out = layer.router(x.reshape(-1, 16))
    o, o_ref = out.expert_idx.argsort(-1), i_ref.argsort(-1)  # transformers' top-k is unsorted: compare as sets
    torch.testing.assert_close(out.expert_idx.gather(-1, o), i_ref.gather(-1, o_ref))
    torch.testing.assert_close(out.gates.gather(-1, o), w_ref.to(out.gates).gather(-1, o_ref))


def test_routed_scaling_factor_with_softmax_equals_transformers_deepseek_v2_router():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    torch.manual_seed(0)
    r = Router(MoEConfig(d_model=16, n_experts=6, top_k=2, routed_scaling_factor=16.0))
    ref = DeepseekV2TopkRouter(DeepseekV2Config(hidden_size=16, n_routed_experts=6, num_experts_per_tok=2,
                                                routed_scaling_factor=16.0, topk_method="greedy",
                                                num_attention_heads=2, num_key_value_heads=2))
    with torch.no_grad(): ref.weight.copy_(r.weight)
    x = torch.randn(20, 16)
    out, ref_out = r(x), ref(x)
    w_ref, i_ref = (ref_out[1], ref_out[2]) if len(ref_out) == 3 else ref_out
    o, o_ref = out.expert_idx.argsort(-1), i_ref.argsort(-1)
    torch.testing.assert_close(out.expert_idx.gather(-1, o), i_ref.gather(-1, o_ref))
    torch.testing.assert_close(out.gates.gather(-1, o), w_ref.gather(-1, o_ref))


# ---------------------------------------------------------------- aux-loss-free balancing
def test_sign_rule_against_its_formula():
    "b_i <- b_i + u * sign(mean(c) - c_i), written as an explicit per-expert loop."
    torch.manual_seed(0)
    for _ in range(5):
        c, b = torch.randint(0, 50, (7,)), torch.randn(7)
        mean = c.double().mean().item()
        expected = [bi + 0.003 * (1 if mean > ci else -1 if mean < ci else 0) for bi, ci in zip(b.tolist(), c.tolist())]
        torch.testing.assert_close(expert_bias_update(b, c, 0.003), torch.tensor(expected))


def test_expert_bias_steers_selection_only_and_gets_no_gradient():
    torch.manual_seed(0)
    r = Router(MoEConfig(d_model=8, n_experts=4, top_k=2, enable_expert_bias=True))
    assert "expert_bias" in dict(r.named_buffers()) and "expert_bias" not in dict(r.named_parameters())
    with torch.no_grad(): r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.randn(16, 8)
    out = r(x)
    assert (out.expert_idx == 3).any(-1).all()
    torch.testing.assert_close(out.gates, (x @ r.weight.T).softmax(-1).gather(-1, out.expert_idx))  # no bias in the gates
    assert "expert_bias" not in dict(MoeLM(MoeLMConfig(vocab_size=8, d_model=8, n_heads=2)).named_buffers()).__str__()


def test_update_counts_real_tokens_over_micro_steps_and_resets():
    torch.manual_seed(0)
    model = _tiny("deepseek", enable_expert_bias=True, bias_update_rate=0.01)
    ids = torch.randint(0, 20, (2, 3, 8)); am = torch.ones(3, 8, dtype=torch.long); am[2, 5:] = 0
    with capture_routing(model) as cap:
        for step_ids in ids: model(step_ids, attention_mask=am)
    masks = torch.cat([am.reshape(-1)] * 2)
    expected = [expert_counts(c, model.config.n_experts, masks) for c in cap.expert_choices()]
    before = [b.ffn.router.expert_bias.clone() for b in model.blocks]
    got = update_expert_bias(model)
    for g, e, b0, blk in zip(got, expected, before, model.blocks):
        assert torch.equal(g, e) and int(g.sum()) == 2 * 21 * 3  # 21 real tokens per micro-step, k = 3
        torch.testing.assert_close(blk.ffn.router.expert_bias, expert_bias_update(b0, e, 0.01))
        assert blk.ffn.router.tokens_per_expert is None


def test_expert_bias_is_saved_and_reloaded(tmp_path):
    model = _tiny("topk", enable_expert_bias=True)
    with torch.no_grad(): model.blocks[0].ffn.router.expert_bias.copy_(torch.arange(4.0))
    model.save_pretrained(tmp_path)
    again = MoeLM.from_pretrained(tmp_path)
    assert torch.equal(again.blocks[0].ffn.router.expert_bias, torch.arange(4.0))


def test_checkpointed_replay_does_not_count_twice():
    ids = torch.randint(0, 20, (2, 8))
    counts, grads = [], []
    for ckpt in (False, True):
        model = _tiny("topk", enable_expert_bias=True)
        if ckpt: _enable_checkpointing(model)
        calls = []
        for b in model.blocks: b.ffn.register_forward_pre_hook(lambda m, a: calls.append(1))
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # replay whole blocks, MoE layer included
            model(ids, labels=ids).loss.backward()
        assert len(calls) == (4 if ckpt else 2)  # the replay really ran the MoE layers again
        counts.append([b.ffn.router.tokens_per_expert.clone() for b in model.blocks])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for a, b in zip(*counts): assert torch.equal(a, b) and int(a.sum()) == 16 * 2
    for n in grads[0]: torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


# ---------------------------------------------------------------- presets, accounting, drops, padding, input checks
def test_sinkhorn_preset_has_no_lb_loss_and_overrides_win():
    assert MoeLMConfig.from_family("sinkhorn").aux_loss_coef == 0.0
    assert MoeLMConfig.from_family("sinkhorn", aux_loss_coef=0.1).aux_loss_coef == 0.1
    assert all(MoeLMConfig.from_family(f).aux_loss_coef == 0.01 for f in FAMILIES if f != "sinkhorn")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aux_loss_reduction_against_transformers_per_layer(reduction):
    "Each layer's LB loss is transformers' Mixtral loss of that layer / k; 'sum' adds them (Switch, Megatron), 'mean' averages."
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    model = _tiny("topk", n_layers=3, aux_loss_reduction=reduction)
    ids = torch.randint(0, 20, (2, 9)); am = torch.ones_like(ids); am[1, 6:] = 0
    with capture_routing(model) as cap: out = model(ids, attention_mask=am)
    per_layer = torch.stack([load_balancing_loss_func((o[0].logits,), 4, 2, am) / 2 for o in cap.outputs])
    torch.testing.assert_close(out.aux_loss, per_layer.sum() if reduction == "sum" else per_layer.mean())
    with pytest.raises(ValueError, match="aux_loss_reduction"): MoeLMConfig(aux_loss_reduction="max")


def test_drop_policies_on_the_issue_example():
    "dispatch([[0,1],[1,0]], 2, capacity=1): position order drops both of token 1's slots; GShard's choice order keeps each first choice."
    idx = torch.tensor([[0, 1], [1, 0]])
    pos = dispatch(idx, 2, capacity=1)
    assert pos.token_idx.tolist() == [0, 0] and pos.slot_idx.tolist() == [0, 1] and pos.dropped == 2
    cho = dispatch(idx, 2, capacity=1, drop_policy="choice")
    assert cho.token_idx.tolist() == [0, 1] and cho.slot_idx.tolist() == [0, 2] and cho.dropped == 2
    assert torch.equal(dispatch(idx, 2, drop_policy="choice").token_idx, dispatch(idx, 2).token_idx)  # dropless: same
    with pytest.raises(ValueError, match="drop_policy"): dispatch(idx, 2, capacity=1, drop_policy="random")


@pytest.mark.parametrize("policy", ["position", "choice"])
def test_drop_policy_layer_equals_loop(policy):
    torch.manual_seed(2)
    layer = MoELayer(MoEConfig(d_model=16, d_ff_expert=8, n_experts=4, top_k=2, capacity_factor=0.6, drop_policy=policy)).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    y, aux = layer(x)
    assert aux.dropped > 0
    torch.testing.assert_close(y, moe_reference(layer, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_not_routed_and_takes_no_capacity(family):
    "A padded batch gives the real tokens exactly what the unpadded real tokens alone get (capacity included)."
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig.family(family, 16, 32, n_experts=4, capacity_factor=0.8)).double().eval()
    x = torch.randn(24, 16, dtype=torch.float64)
    mask = torch.ones(24, dtype=torch.bool); mask[::3] = False
    y, aux = layer(x, mask.long())
    y_real, aux_real = layer(x[mask])
    torch.testing.assert_close(y[mask], y_real)
    assert aux.dropped == aux_real.dropped and torch.equal(aux.routed_counts, aux_real.routed_counts)
    routed_pad = y[~mask] - (layer.shared(x[~mask]) if layer.shared is not None else 0)
    assert routed_pad.abs().max() == 0  # padding reaches no routed expert
    with pytest.raises(ValueError, match="mask must have the token shape"): layer(x, mask[:5])


def test_loss_helpers_reject_bad_input():
    with pytest.raises(FloatingPointError, match="non-finite router logits"): z_loss(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(FloatingPointError, match="non-finite router logits"): z_loss(torch.tensor([[float("inf"), 0.0]]))
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        load_balancing_loss(probs, torch.tensor([[0], [4], [1]]))
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        load_balancing_loss(probs, torch.tensor([[0], [-1], [1]]))
    with pytest.raises(ValueError, match="mask must have the token shape"): z_loss(torch.zeros(3, 4), torch.ones(2))


# ---------------------------------------------------------------- transformers integration
def _enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _variant(name, **kw):
    "Every family, plus DeepSeek-V3 routing (sigmoid, renormalised, scaled, with the selection bias)."
    if name == "deepseek_v3":
        return _tiny("deepseek", score_function="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                     enable_expert_bias=True, **kw)
    return _tiny(name, **kw)


VARIANTS = [*FAMILIES, "deepseek_v3"]


@pytest.mark.parametrize("name", VARIANTS)
def test_auto_model_round_trip(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = _variant(name).eval()
    with torch.no_grad():
        for b in model.blocks:
            if b.ffn.router.expert_bias is not None: b.ffn.router.expert_bias.normal_()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MoeLMConfig
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is MoeLM and not again.training
    ids = torch.randint(0, 20, (2, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_generation_equals_uncached(name):
    model = _variant(name).double().eval()
    ids = torch.randint(0, 20, (3, 5)); am = torch.ones_like(ids); am[0, :2] = 0  # row 0 left-padded
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=am)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    cached = model.generate(ids, use_cache=True, **gen)
    hook.remove()
    uncached = model.generate(ids, use_cache=False, **gen)
    assert torch.equal(cached, uncached) and cached.shape == (3, 13)
    assert calls == [5] + [1] * 7  # the prefix once, then one new token per step


def test_cached_forward_continues_exactly():
    model = _tiny("topk").double().eval()
    ids = torch.randint(0, 20, (2, 9))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :6], use_cache=True)
    rest = model(ids[:, 6:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full)
    assert first.cache.get_seq_length() == 9  # updated in place
    assert model(ids).cache is not None and model.train()(ids).cache is None  # no cache built in training mode


def test_left_padded_batch_generates_like_single_prompts():
    "Padding is masked in attention and not routed, so a left-padded prompt continues as it would alone."
    model = _tiny("deepseek").double().eval()
    a, b = torch.randint(1, 20, (1, 6)), torch.randint(1, 20, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    am = (torch.arange(6) >= torch.tensor([[0], [3]])).long()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(batch, attention_mask=am, **gen)
    assert torch.equal(out[0], model.generate(a, **gen)[0])
    assert torch.equal(out[1, 3:], model.generate(b, **gen)[0])


def test_rotary_with_position_ids_equals_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from moebook.moe import rotary
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 3, 4, 9, 10]])
    cfg = LlamaConfig(hidden_size=24, num_attention_heads=3, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rotary(q, 500.0, pos), q_ref); torch.testing.assert_close(rotary(k, 500.0, pos), k_ref)
    torch.testing.assert_close(rotary(q, 500.0), rotary(q, 500.0, torch.arange(6)))


def test_position_ids_are_used():
    model = _tiny("topk").double().eval()
    ids = torch.randint(0, 20, (1, 6))
    base = model(ids).logits
    torch.testing.assert_close(model(ids, position_ids=torch.arange(6)[None] + 7).logits, base)  # RoPE: only offsets matter
    gapped = model(ids, position_ids=torch.tensor([[0, 1, 2, 10, 11, 12]])).logits
    torch.testing.assert_close(gapped[:, :3], base[:, :3])
    assert (gapped[:, 3:] - base[:, 3:]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="position_ids"): model(ids, position_ids=torch.arange(5)[None])


def test_generate_forwards_extra_kwargs_to_forward():
    model = _tiny("topk").eval()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("output_router_stats")), with_kwargs=True)
    model.generate(torch.randint(0, 20, (1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0, output_router_stats=True)
    hook.remove()
    assert seen == [True] * 3


def test_eager_attention_equals_sdpa(tmp_path):
    model = _tiny("topk").double().eval()
    model.save_pretrained(tmp_path)
    eager = MoeLM.from_pretrained(tmp_path, attn_implementation="eager").double().eval()
    assert eager.config._attn_implementation == "eager" and model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 20, (2, 8)); am = torch.ones_like(ids); am[1, :3] = 0
    for kw in ({}, {"attention_mask": am}):
        torch.testing.assert_close(eager(ids, **kw).logits, model(ids, **kw).logits)
    calls = []
    hook = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or hook(*a, **k)
        eager(ids); assert calls == []; model(ids); assert len(calls) == 2  # eager really skips SDPA
    finally:
        torch.nn.functional.scaled_dot_product_attention = hook


def test_output_attentions_and_hidden_states():
    model = _tiny("deepseek").eval()
    ids = torch.randint(0, 20, (2, 7)); am = torch.ones_like(ids); am[1, 5:] = 0
    out = model(ids, attention_mask=am, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 7, 16) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.embed(ids))
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)  # the last one is after the final norm
    assert len(out.attentions) == 2 and all(a.shape == (2, 2, 7, 7) for a in out.attentions)
    for a in out.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 7))
        assert a.triu(1).abs().max() == 0 and a[1, :, :5, 5:].abs().max() == 0  # causal; padded keys get no weight
    plain = model(ids, attention_mask=am)
    assert plain.attentions is None and plain.hidden_states is None
    torch.testing.assert_close(plain.logits, out.logits)


def test_return_dict_false_and_inputs_embeds():
    model = _tiny("topk")
    ids = torch.randint(0, 20, (2, 6))
    out = model(ids, labels=ids)
    tup = model(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out.loss); torch.testing.assert_close(tup[1], out.logits)
    torch.testing.assert_close(model(inputs_embeds=model.embed(ids), labels=ids).loss, out.loss)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"): model(ids, inputs_embeds=model.embed(ids))


def test_resize_token_embeddings_keeps_old_rows():
    model = _tiny("topk")
    old_in, old_out = model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(27)
    assert model.config.vocab_size == 27 and model.embed.weight.shape == (27, 16) and model.lm_head.weight.shape == (27, 16)
    assert torch.equal(model.embed.weight[:20], old_in) and torch.equal(model.lm_head.weight[:20], old_out)
    assert model(torch.tensor([[26, 3]])).logits.shape == (1, 2, 27)


def test_enable_input_require_grads_reaches_the_embeddings_output():
    model = _tiny("topk")
    for p in model.parameters(): p.requires_grad_(False)
    ids = torch.randint(0, 20, (1, 5))
    seen = []
    h = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))  # what the blocks receive
    model(ids); model.enable_input_require_grads(); model(ids); h.remove()
    assert seen == [False, True]


def test_tie_word_embeddings(tmp_path):
    tied, untied = _tiny("topk", tie_word_embeddings=True), _tiny("topk")
    assert tied.lm_head.weight is tied.embed.weight and untied.lm_head.weight is not untied.embed.weight
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(tied) == 20 * 16
    tied.save_pretrained(tmp_path)
    again = MoeLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.embed.weight and torch.equal(again.embed.weight, tied.embed.weight)


@pytest.mark.parametrize("name", ["topk", "deepseek_v3", "sinkhorn"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    ids = torch.randint(0, 20, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = _variant(name).double()
        assert model.supports_gradient_checkpointing
        if ckpt: _enable_checkpointing(model)
        calls = []
        for b in model.blocks: b.attn.register_forward_pre_hook(lambda m, a: calls.append(1))
        model(ids, labels=ids).loss.backward()
        assert len(calls) == (4 if ckpt else 2)  # checkpointed blocks re-run in backward
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)
    model._set_gradient_checkpointing(True, torch.utils.checkpoint.checkpoint)
    assert all(b._gradient_checkpointing_func.keywords == {"use_reentrant": False} for b in model.blocks)


# ---------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", VARIANTS)
def test_compiled_moelm_equals_eager(name, dtype):
    "Dynamo + AOTAutograd trace every family (the step that failed on torch._grouped_mm's fp32 fake kernel); forward and backward equal eager."
    import torch._dynamo
    torch._dynamo.reset()
    model = _variant(name).to(dtype)
    ids = torch.randint(0, 20, (2, 16))
    out = torch.compile(model, backend="aot_eager")(ids, labels=ids)
    out.loss.backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits); torch.testing.assert_close(out.loss, ref.loss)
    for n, p in model.named_parameters(): torch.testing.assert_close(compiled[n], p.grad, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_inductor_compiled_layer_equals_eager(dtype, tol):
    "The Inductor backend (generated C++ kernels around the grouped-matmul custom op) on the DeepSeek-V3-style layer."
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig.family("deepseek", 32, 64, n_experts=4, score_function="sigmoid", norm_topk_prob=True,
                                      routed_scaling_factor=2.5, enable_expert_bias=True)).to(dtype).eval()
    x, g = torch.randn(64, 32, dtype=dtype), torch.randn(64, 32, dtype=dtype)
    (y, gx), (y_ref, gx_ref) = _fwd_bwd(torch.compile(layer), x, g), _fwd_bwd(layer, x, g)
    scale = lambda t: t.float().abs().max().item()
    assert (y - y_ref).float().abs().max().item() <= tol * scale(y_ref)
    assert (gx - gx_ref).float().abs().max().item() <= tol * scale(gx_ref)
