"The benchmark compares like with like: its MoE variants compute the same layer, and the script runs end to end."
import importlib.util, json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_layer_bench", ROOT / "benchmarks" / "moe_layer.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


TINY = ["--tokens", "64", "--d-model", "32", "--experts", "4", "--top-k", "2", "--d-ff", "16"]


def test_moe_variants_compute_the_same_layer(bench):
    args = bench.argparse.Namespace(tokens=64, d_model=32, experts=4, top_k=2, d_ff=16, only="")
    variants = bench.build_variants(args, torch.float32, torch.device("cpu"))
    x = torch.randn(64, 32)
    ref = variants["moebook"](x)
    for name in ("moebook_grouped_mm", "moebook_loop", "naive_sort_grouped_mm", "hf_eager", "hf_grouped_mm"):
        torch.testing.assert_close(variants[name](x), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert variants["dense"](x).shape == x.shape


def test_matmul_floor_variants_do_the_flops_of_their_layer(bench):
    "Rows x weights each row meets: equal for the dense floor (T rows, all weights) and the grouped one (k*T rows, one expert each)."
    args = bench.argparse.Namespace(tokens=64, d_model=32, experts=4, top_k=2, d_ff=16, only="matmuls_dense,matmuls_grouped")
    v = bench.build_variants(args, torch.float32, torch.device("cpu"))
    def work(m, groups): return m.xs.shape[0] * (m.w1.numel() + m.w2.numel()) // groups
    assert v["matmuls_grouped"].xs.shape[0] == 2 * v["matmuls_dense"].xs.shape[0]
    assert work(v["matmuls_dense"], 1) == work(v["matmuls_grouped"], 4) == 64 * 3 * 32 * 2 * 16
    x = torch.randn(64, 32, requires_grad=True)
    for m in v.values():
        m(x).sum().backward()
        assert m.w1.grad.shape == m.w1.shape and m.w2.grad.shape == m.w2.shape


@pytest.mark.slow
def test_script_writes_its_json(bench, tmp_path):
    out = tmp_path / "r.json"
    bench.main([*TINY, "--repeats", "1", "--warmup", "0", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["median_ms"]) >= {"dense", "moebook", "matmuls_dense", "matmuls_grouped", "hf_grouped_mm"}
    assert r["shape"]["tokens"] == 64 and isinstance(r["target"]["within_1.1x_of_dense"], bool)


@pytest.mark.slow
def test_compiled_variants_compute_the_same_layer(bench):
    args = bench.argparse.Namespace(tokens=64, d_model=32, experts=4, top_k=2, d_ff=16, compile=True,
                                    only="moebook,dense,moebook_compiled,dense_compiled")
    v = bench.build_variants(args, torch.float32, torch.device("cpu"))
    x = torch.randn(64, 32)
    torch.testing.assert_close(v["moebook_compiled"](x), v["moebook"](x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v["dense_compiled"](x), v["dense"](x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_generate_script_cached_equals_uncached_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_bench", ROOT / "benchmarks" / "generate.py")
    gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
    out = tmp_path / "g.json"
    r = gen.main(["--d-model", "32", "--layers", "1", "--experts", "2", "--vocab", "64", "--prompt", "8",
                  "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["new_tokens"] == 4 and set(r["tokens_per_s"]) == {"cached", "uncached"}
