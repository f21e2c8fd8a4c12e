"""Greedy generation speed of `MoeLM` with and without the KV cache (tokens per second).

Command that produced the result in benchmarks/results/ (from the repository root):

    python benchmarks/generate.py --threads 2 --repeats 5 --out benchmarks/results/generate_cpu.json

A `MoeLM` of the `deepseek` family (fine-grained routed experts + a shared expert; random weights: speed does not
depend on what the weights know) generates `--new-tokens` tokens greedily after a `--prompt`-token prompt, once
with `use_cache=True` (each step feeds only the new token and reads keys / values from the cache) and once
with `use_cache=False` (each step re-reads the whole prefix). The two runs must produce the same tokens (the
script stops otherwise). Both run in the same process, interleaved, median over `--repeats` after one warm-up.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moebook.moe import MoeLM, MoeLMConfig  # noqa: E402
from moe_layer import machine_info  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="deepseek")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="n_experts of the family preset (deepseek: 4x-1 routed)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/generate_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    cfg = MoeLMConfig.from_family(args.family, d_ff=4 * args.d_model, n_experts=args.experts, vocab_size=args.vocab,
                                  d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    model = MoeLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def run(use_cache):
        t = time.perf_counter()
        with torch.no_grad(): out = model.generate(ids, use_cache=use_cache, **gen)
        return time.perf_counter() - t, out

    times = {"cached": [], "uncached": []}
    for it in range(1 + args.repeats):
        (tc, out_c), (tu, out_u) = run(True), run(False)
        if not torch.equal(out_c, out_u): raise SystemExit("cached and uncached greedy generation differ")
        if it: times["cached"].append(tc); times["uncached"].append(tu)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = args.batch * args.new_tokens
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(torch.device("cpu")),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "model": {"family": args.family, "d_model": args.d_model, "layers": args.layers, "n_experts": cfg.n_experts,
                  "top_k": cfg.num_experts_per_tok, "vocab": args.vocab, "parameters": sum(p.numel() for p in model.parameters())},
        "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "median_s": med, "all_s": times,
        "tokens_per_s": {k: tok / v for k, v in med.items()},
        "speedup_cached_over_uncached": med["uncached"] / med["cached"],
    }
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k in ("cached", "uncached"): print(f"{k:9s} {med[k]:7.2f} s  {result['tokens_per_s'][k]:8.1f} tokens/s")
    print(f"speed-up {result['speedup_cached_over_uncached']:.2f}x; load average before/after: "
          f"{load_before:.2f}/{os.getloadavg()[0]:.2f} -> {out}")
    return result


if __name__ == "__main__":
    main()
