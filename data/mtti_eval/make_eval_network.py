"Makes data/mtti_eval/ (the committed evaluation network of nbs/04_mtti_ensad): PYTHONPATH=. python data/mtti_eval/make_eval_network.py"
import sys, time, torch
from moebook.evidence import provenance
from moebook.mtti import EVAL_DATA_SEED, attribute_accuracy, eval_dir, make_dataset, save_eval_network, train_eval_network
torch.set_num_threads(1)
N, STEPS = 8000, 1500
t = time.time()
clf, losses = train_eval_network(N, STEPS, seed=0)
held = make_dataset(2000, EVAL_DATA_SEED + 1)
acc = attribute_accuracy(clf, held.images, held.scenes)
cmd = "PYTHONPATH=. python data/mtti_eval/make_eval_network.py"
info = {"command": cmd, **provenance(), "data_seed": EVAL_DATA_SEED, "n_images": N, "steps": STEPS, "batch": 128, "seed": 0, "torch_threads": 1,
        "torch": torch.__version__, "final_loss_mean_last_50": sum(losses[-50:]) / 50,
        "heldout": {"data_seed": EVAL_DATA_SEED + 1, "n": 2000, "accuracy": {k: round(v, 4) for k, v in acc.items()}},
        "train_seconds": round(time.time() - t, 1)}
save_eval_network(clf, eval_dir(), info)
print(info)
