"""Forward + backward time of one MoE layer vs a FLOP-matched dense SwiGLU MLP and transformers' OLMoE block.

Commands that produced the results in benchmarks/results/ (from the repository root):

    python benchmarks/moe_layer.py --threads 2 --repeats 25 --warmup 3 --out benchmarks/results/moe_layer_cpu.json
    python benchmarks/moe_layer.py --threads 1 --repeats 15 --warmup 3 --out benchmarks/results/moe_layer_cpu_1thread.json

GPU shape (no GPU in the task that wrote this file; the flags are there for when one is available):

    python benchmarks/moe_layer.py --gpu --out benchmarks/results/moe_layer_gpu.json

Every variant runs in the same process on the same input: `y = layer(x); y.backward(dy)` with `x` requiring
grad, timed with `time.perf_counter` (after `torch.cuda.synchronize` on GPU), median over `--repeats` after
`--warmup` untimed runs, interleaved round-robin so that a load spike from other processes on a shared
machine hits every variant alike. `torch.set_num_threads(--threads)` fixes the CPU thread count (2 = the
machine's cores). The JSON records the machine, versions, shapes, the 1-minute load average before and after,
and every variant's median / min / all wall times, plus the median *process CPU time* of each step
(`time.process_time`): on a CPU shared with other jobs the wall time includes waiting for a core, the CPU time
mostly does not, so it is the steadier measure of the work each variant does (it sums over threads).

Variants (all with the same router weights, so they route identically):
- `dense`: SwiGLU MLP of width k * d_ff_expert (the MoE's active width: FLOP-matched expert compute);
- `moebook`: `moebook.moe.MoELayer` as the package uses it (fused gate+up grouped matmul where the platform
  supports it, else per-expert matmuls over contiguous slices);
- `moebook_grouped_mm` / `moebook_loop`: the same layer with the expert matmuls forced to
  `torch._grouped_mm` / to the per-expert loop;
- `naive_sort_grouped_mm`: sort + separate gate / up / down `torch._grouped_mm` calls, unfused, with gather
  and `index_add_` (the straightforward implementation);
- `hf_eager`, `hf_grouped_mm`: `transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock` with
  `config._experts_implementation` set to `"eager"` (a Python loop over the experts that were hit) and
  `"grouped_mm"` (sort + `torch._grouped_mm`; transformers' `@use_experts_implementation` decorator picks the
  forward from that config field at call time);
- `experts_only`: just our grouped experts (matmuls + SwiGLU) on pre-grouped rows (no router, no gather/scatter;
  a `repeat_interleave` and a sum stand in for them);
- `moebook_compiled`, `dense_compiled` (with `--compile`): `torch.compile` (Inductor) of the layer and of the dense
  MLP; the layer's grouped matmuls stay `torch._grouped_mm` calls (through the `moebook::grouped_mm` custom op),
  Inductor fuses the router, gates and SwiGLU element-wise work around them;
- `matmuls_dense`, `matmuls_grouped`: only the six matmuls of forward + backward (two forward, four backward)
  on stand-in activations, at the dense MLP's shapes and as grouped expert matmuls: the compute floor of
  `dense` and of any MoE layer built on `torch._grouped_mm`. The rest of each variant's time is element-wise
  work, routing and data movement.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moebook.moe import MoEConfig, MoELayer, SwiGLU  # noqa: E402


class NaiveSortGroupedMM(nn.Module):
    "Sort token-slots by expert and run three unfused `torch._grouped_mm` (gate, up, down)."
    def __init__(self, layer: MoELayer):
        super().__init__()
        self.router, f = layer.router, layer.cfg.d_ff_expert
        self.w_gate = nn.Parameter(layer.experts.w_gate_up.detach()[..., :f].contiguous())
        self.w_up = nn.Parameter(layer.experts.w_gate_up.detach()[..., f:].contiguous())
        self.w_down = nn.Parameter(layer.experts.w_down.detach().clone())
        self.n_experts, self.top_k = layer.cfg.n_experts, layer.cfg.top_k

    def forward(self, x):
        r = self.router(x)
        flat = r.expert_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=self.n_experts), 0).to(torch.int32)
        tok = order // self.top_k
        xs = x.index_select(0, tok)
        h = F.silu(torch._grouped_mm(xs, self.w_gate, offs=offs)) * torch._grouped_mm(xs, self.w_up, offs=offs)
        y = torch._grouped_mm(h, self.w_down, offs=offs) * r.gates.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)


def equal_groups(rows: int, groups: int) -> torch.Tensor:
    "Row counts of `groups` groups as equal as possible (the first `rows % groups` get one more)."
    counts = torch.full((groups,), rows // groups); counts[: rows % groups] += 1
    return counts


class ExpertsOnly(nn.Module):
    "Only the grouped expert matmuls on tokens already sorted into equal groups: no router, no permutation."
    def __init__(self, layer: MoELayer, n_tokens: int):
        super().__init__()
        self.experts, c = layer.experts, layer.cfg
        rows = n_tokens * c.top_k
        counts = equal_groups(rows, c.n_experts)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("offsets", torch.cumsum(counts, 0).to(torch.int32), persistent=False)
        self.top_k = c.top_k

    def forward(self, x):
        y = self.experts(x.repeat_interleave(self.top_k, 0), self.counts, self.offsets)
        return y.view(x.shape[0], self.top_k, -1).sum(1)


class _SixMatmuls(torch.autograd.Function):
    """The six matmuls of a SwiGLU MLP's forward + backward on stand-in activations, nothing else.

    Forward: `xs @ w1` (rows, 2f) and `h @ w2` (rows, d); backward: `dys @ w2^T`, `h^T @ dys`, `da @ w1^T`,
    `xs^T @ da`. Grouped (`offs` given): the same per row-group with `torch._grouped_mm`. The output is `x`
    itself, so the harness's `backward(dy)` reaches the backward matmuls with no element-wise work around them."""
    @staticmethod
    def forward(ctx, x, w1, w2, xs, h, da, dys, offs):
        mm = torch.mm if offs is None else (lambda a, b: torch._grouped_mm(a, b, offs=offs))
        mm(xs, w1); mm(h, w2)
        ctx.save_for_backward(xs, w1, w2, h, da, dys); ctx.offs = offs
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w2, h, da, dys = ctx.saved_tensors
        if ctx.offs is None: mm, t = torch.mm, (lambda w: w.t())
        else: mm, t = (lambda a, b: torch._grouped_mm(a, b, offs=ctx.offs)), (lambda w: w.transpose(-2, -1))
        mm(dys, t(w2)); mm(da, t(w1))  # input-side gradients (dh, dx): computed, not needed by the harness
        return dy, mm(xs.t(), da), mm(h.t(), dys), None, None, None, None, None


class MatmulsOnly(nn.Module):
    """Only the matmuls, no router, dispatch or element-wise work: the floor of a SwiGLU layer's fwd + bwd.

    `grouped=False`: the dense FLOP-matched MLP's shapes, T rows of width k*f. `grouped=True`: the same FLOPs
    as E experts of width f on k*T rows in equal groups (`torch._grouped_mm`)."""
    def __init__(self, cfg: MoEConfig, n_tokens: int, grouped: bool):
        super().__init__()
        d, f, k, e = cfg.d_model, cfg.d_ff_expert, cfg.top_k, cfg.n_experts
        rows, width = (n_tokens * k, f) if grouped else (n_tokens, k * f)
        lead = (e,) if grouped else ()
        self.w1 = nn.Parameter(torch.randn(*lead, d, 2 * width) * 0.02)
        self.w2 = nn.Parameter(torch.randn(*lead, width, d) * 0.02)
        for name, shape in (("xs", (rows, d)), ("h", (rows, width)), ("da", (rows, 2 * width)), ("dys", (rows, d))):
            self.register_buffer(name, torch.randn(shape), persistent=False)
        offs = torch.cumsum(equal_groups(rows, e), 0).to(torch.int32) if grouped else None
        self.register_buffer("offs", offs, persistent=False)

    def forward(self, x):
        return _SixMatmuls.apply(x, self.w1, self.w2, self.xs, self.h, self.da, self.dys, self.offs)


def olmoe_block(layer: MoELayer, implementation: str) -> nn.Module:
    "transformers' OLMoE sparse block with the same weights as `layer` (OLMoE stores (E, out, in) weights)."
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    c = layer.cfg
    cfg = OlmoeConfig(hidden_size=c.d_model, intermediate_size=c.d_ff_expert, num_experts=c.n_experts,
                      num_experts_per_tok=c.top_k, norm_topk_prob=c.norm_topk_prob)
    cfg._experts_implementation = implementation
    block = OlmoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w_down.transpose(1, 2))
    return block


class Tokens2D(nn.Module):
    "Adapt a (B, S, d) block to (T, d) tokens; drop the aux record of MoELayer."
    def __init__(self, inner: nn.Module, needs_3d: bool = False):
        super().__init__(); self.inner, self.needs_3d = inner, needs_3d

    def forward(self, x):
        y = self.inner(x[None] if self.needs_3d else x)
        y = y[0] if isinstance(y, tuple) else y
        return y[0] if self.needs_3d else y


def machine_info(device: torch.device) -> dict:
    "Machine, versions and threads, recorded with every result."
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads()}


def build_variants(args, dtype, device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=args.d_model, d_ff_expert=args.d_ff, n_experts=args.experts, top_k=args.top_k)
    layer = MoELayer(cfg)
    with torch.no_grad(): layer.router.weight.normal_(0, 1.0 / args.d_model ** 0.5)  # roughly balanced routing
    forced_mm = MoELayer(cfg); forced_mm.load_state_dict(layer.state_dict())
    forced_loop = MoELayer(MoEConfig(**{**cfg.__dict__, "use_grouped_mm": False})); forced_loop.load_state_dict(layer.state_dict())
    variants = {
        "dense": SwiGLU(args.d_model, args.top_k * args.d_ff),
        "moebook": Tokens2D(layer),
        "moebook_grouped_mm": Tokens2D(forced_mm),
        "moebook_loop": Tokens2D(forced_loop),
        "naive_sort_grouped_mm": NaiveSortGroupedMM(layer),
        "experts_only": ExpertsOnly(layer, args.tokens),
        "matmuls_dense": MatmulsOnly(cfg, args.tokens, grouped=False),
        "matmuls_grouped": MatmulsOnly(cfg, args.tokens, grouped=True),
        "hf_eager": Tokens2D(olmoe_block(layer, "eager"), needs_3d=True),
        "hf_grouped_mm": Tokens2D(olmoe_block(layer, "grouped_mm"), needs_3d=True),
    }
    if getattr(args, "compile", False):  # torch.compile (Inductor) of the layer and of the dense MLP, same weights
        compiled_layer = MoELayer(cfg); compiled_layer.load_state_dict(layer.state_dict())
        dense_twin = SwiGLU(args.d_model, args.top_k * args.d_ff); dense_twin.load_state_dict(variants["dense"].state_dict())
        variants["moebook_compiled"] = torch.compile(Tokens2D(compiled_layer))
        variants["dense_compiled"] = torch.compile(dense_twin)
    if args.only: variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    return {k: v.to(device=device, dtype=dtype) for k, v in variants.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=128, help="hidden width of each expert")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu", action="store_true", help="GPU shape: d 2048, 64 experts, top-8, FFN 1024, bf16, 16k tokens, cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated subset of variants")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants (moebook_compiled, dense_compiled; compiled during warm-up)")
    p.add_argument("--out", default="benchmarks/results/moe_layer_cpu.json")
    args = p.parse_args(argv)
    if args.gpu:
        args.tokens, args.d_model, args.experts, args.top_k, args.d_ff, args.dtype, args.device = 16384, 2048, 64, 8, 1024, "bf16", "cuda"
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()[0]
    variants = build_variants(args, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(args.tokens, args.d_model, generator=g).to(device, dtype)
    dy = torch.randn(args.tokens, args.d_model, generator=g).to(device, dtype)

    def step(m):
        x = x0.detach().requires_grad_()
        sync(); t, c = time.perf_counter(), time.process_time()
        m(x).backward(dy)
        sync(); return time.perf_counter() - t, time.process_time() - c

    times = {k: [] for k in variants}; cpu_times = {k: [] for k in variants}
    for it in range(args.warmup + args.repeats):
        for name, m in variants.items():
            m.zero_grad(set_to_none=True)
            wall, cpu = step(m)
            if it >= args.warmup: times[name].append(wall * 1e3); cpu_times[name].append(cpu * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    flops = 3 * 2 * 3 * args.tokens * args.d_model * args.top_k * args.d_ff  # fwd+bwd of the expert matmuls
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "shape": {"tokens": args.tokens, "d_model": args.d_model, "experts": args.experts, "top_k": args.top_k,
                  "d_ff_expert": args.d_ff, "dense_d_ff": args.top_k * args.d_ff, "dtype": args.dtype},
        "repeats": args.repeats, "warmup": args.warmup,
        "median_ms": med, "min_ms": {k: min(v) for k, v in times.items()}, "all_ms": times,
        "median_process_cpu_ms": cpu_med, "all_process_cpu_ms": cpu_times,
        "expert_gflops_per_s": {k: flops / (v * 1e-3) / 1e9 for k, v in med.items()},
    }
    if "dense_compiled" in med and "moebook_compiled" in med:
        result["compiled"] = {"moebook_compiled_over_dense_compiled": med["moebook_compiled"] / med["dense_compiled"],
                              "moebook_compiled_over_dense": med["moebook_compiled"] / med["dense"] if "dense" in med else None}
    if "dense" in med and "moebook" in med:
        hf = [med[k] for k in ("hf_eager", "hf_grouped_mm") if k in med]
        hf_cpu = [cpu_med[k] for k in ("hf_eager", "hf_grouped_mm") if k in cpu_med]
        result["target"] = {"moebook_over_dense": med["moebook"] / med["dense"],
                            "within_1.1x_of_dense": med["moebook"] <= 1.1 * med["dense"],
                            "faster_than_best_transformers": bool(hf) and med["moebook"] < min(hf),
                            "cpu_time_moebook_over_dense": cpu_med["moebook"] / cpu_med["dense"],
                            "cpu_time_faster_than_best_transformers": bool(hf_cpu) and cpu_med["moebook"] < min(hf_cpu)}
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, med))
    for k in sorted(med, key=med.get):
        print(f"{k:{width}s} wall {med[k]:8.1f} ms (min {min(times[k]):7.1f})   process CPU {cpu_med[k]:8.1f} ms")
    if "target" in result: print(json.dumps(result["target"]))
    if "compiled" in result: print(json.dumps(result["compiled"]))
    print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f} -> {out}")
    return result


if __name__ == "__main__":
    main()
