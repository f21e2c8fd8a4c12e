"""Training script for tests/test_train.py: a tiny regressor trained by `moebook.train.train`.

Runs as a plain process or under `torchrun --nproc_per_node N` (gloo on CPU) and writes the
history and final weights of rank 0 to `--out` (JSON).
"""
import argparse, json, time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from moebook.schedules import WarmupCosine
from moebook.train import TrainConfig, batch_rng, close_distributed, train


class TinyRegressor(nn.Module):
    "A two-layer regressor with dropout: (x (B, 4), y (B, 1)) -> output with `.loss` (MSE)."
    def __init__(self, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x, y):  # x: (B, 4), y: (B, 1)
        return SimpleNamespace(loss=nn.functional.mse_loss(self.net(x), y))


def regression_batches(rows=8, seed=0):
    "batches(step, micro) -> {'x': (rows, 4), 'y': (rows, 1)}, a pure function of its arguments."
    def get(step, micro):
        x = torch.randn(rows, 4, generator=batch_rng(seed, step, micro))
        return {"x": x, "y": x.sum(1, keepdim=True).sin()}
    return get


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=8, help="rows of the global batch of each micro-step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step (to be killed mid-run)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyRegressor(args.dropout)
    cfg = TrainConfig(max_steps=args.steps, lr=1e-2, grad_accum=args.grad_accum, ckpt_every=args.ckpt_every,
                      ckpt_dir=args.ckpt_dir, progress=False, device="cpu")
    hooks = [lambda: time.sleep(args.sleep)] if args.sleep else []
    history = train(model, regression_batches(args.rows), cfg, WarmupCosine(1e-2, args.steps, 2, lr_min=1e-3),
                    after_optimizer_step=hooks, resume=args.resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        weights = {k: v.tolist() for k, v in model.state_dict().items()}
        with open(args.out, "w") as f:
            json.dump({"history": history, "weights": weights}, f)
    close_distributed()


if __name__ == "__main__":
    main()
