"""Train the (2+1)-D zoo model `r2plus1d_fmnist` on Fashion-MNIST clips (quantflow.zoo.volumetric).

    .venv/bin/python tools/train_volumetric.py [--epochs 5] [--train 20000] [--seed 0]

Writes quantflow/zoo/weights/r2plus1d_fmnist.pt (float32 state dict) and .json (accuracy on
the 10k test clips, epochs, seed, date, wall time). Adam with cosine decay; sized for a 2-core
CPU (about 6 minutes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_fmnist.py

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantflow.data import fmnist_clips
from quantflow.zoo import WEIGHTS_DIR
from quantflow.zoo.volumetric import r2plus1d_fmnist

NAME = "r2plus1d_fmnist"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                   for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train", type=int, default=20000, help="training clips used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    x, y = fmnist_clips("train", limit=args.train)
    xt, yt = fmnist_clips("test")
    model = r2plus1d_fmnist()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch):
            b = perm[i:i + args.batch]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, {time.time() - t0:.0f} s", flush=True)
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, WEIGHTS_DIR / f"{NAME}.pt")
    acc = accuracy(model, xt, yt)
    meta = {"model": NAME, "test_accuracy": round(acc, 2), "epochs": args.epochs,
            "train_clips": len(x), "seed": args.seed, "date": dt.date.today().isoformat(),
            "seconds": round(time.time() - t0, 1)}
    (WEIGHTS_DIR / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(meta)


if __name__ == "__main__":
    main()
