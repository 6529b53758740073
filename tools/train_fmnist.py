"""Train the Fashion-MNIST zoo models and write their weights and metadata.

Usage::

    .venv/bin/python tools/train_fmnist.py                    # every fashion-mnist model
    .venv/bin/python tools/train_fmnist.py resnet_fmnist --epochs 8 --seed 0

For each model this writes ``quantflow/zoo/weights/<name>.pt`` (float32 state dict,
contiguous tensors) and ``<name>.json`` (test accuracy on the full 10k test split,
epochs, seed, date, wall time). Training is SGD + Nesterov momentum with a linear
warm-up then cosine decay, and light augmentation (random crop with 2-pixel padding,
horizontal flip). It is sized for a 2-core CPU: a few minutes per model.

Normalization comes from ``quantflow.data`` so training, calibration and evaluation
can never disagree.
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
from typing import Any

# On a shared CPU, OpenMP's default spin-waiting makes 2 threads ~10x slower than 1 when
# other processes compete for the cores; passive waiting removes that cliff. It must be
# set before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantflow.data import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist
from quantflow.zoo import MODELS, WEIGHTS_DIR

#: Epochs per model, chosen to fit ~6-7 minutes each on 2 CPU cores.
DEFAULT_EPOCHS: dict[str, int] = {
    "resnet_fmnist": 6,
    "mobilenetv2_fmnist": 6,
    "repvgg_fmnist": 6,
    "unireplknet_fmnist": 4,
    "kan_fmnist": 3,
}
#: The test suite re-checks accuracy on this many leading test images (fast, deterministic).
SUBSET = 2500
PAD_VALUE = (0.0 - FMNIST_MEAN) / FMNIST_STD  # a black pixel after normalization


def fmnist_models() -> list[str]:
    """Registered fashion-mnist entries that have weights to produce."""
    return [n for n, e in MODELS.items() if e.dataset == "fashion-mnist" and e.weights]


def augment(x: Tensor, gen: torch.Generator, pad: int = 2) -> Tensor:
    """Random crop with ``pad`` pixels of black padding plus a random horizontal flip.

    Vectorised by grouping samples per crop offset: (2*pad+1)^2 slices per batch.
    """
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), value=PAD_VALUE)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    codes = offsets[:, 0] * (2 * pad + 1) + offsets[:, 1]
    for code in codes.unique().tolist():
        idx = (codes == code).nonzero(as_tuple=True)[0]
        dy, dx = divmod(int(code), 2 * pad + 1)
        out[idx] = padded[idx, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
        correct += int((model(xb).argmax(1) == y[i : i + batch]).sum())
    return 100.0 * correct / x.shape[0]


def train_one(
    name: str,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    wd: float,
    out_dir: Path = WEIGHTS_DIR,
) -> dict[str, Any]:
    """Train zoo model ``name`` from scratch, save its weights, return its metadata."""
    entry = MODELS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    model = entry.factory()
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # untyped kwarg
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = x_train.shape[0] // batch_size  # drop the ragged last batch
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch // 2, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    print(f"[{name}] {n_params:,} params, {epochs} epochs x {steps_per_epoch} steps", flush=True)
    start, cpu_start = time.time(), time.process_time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        running = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        acc = evaluate(model, x_test, y_test)
        print(
            f"[{name}] epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.4f} "
            f"test acc {acc:.2f}% ({time.time() - start:.0f}s)",
            flush=True,
        )
    train_seconds = time.time() - start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    # num_batches_tracked stays int64 as in torchvision; everything else is float32.
    state = {k: (v.long() if k.endswith("num_batches_tracked") else v) for k, v in state.items()}
    weights_path = _weights_path(name, out_dir)
    torch.save(state, weights_path)
    meta: dict[str, Any] = {
        "model": name,
        "dataset": "fashion-mnist",
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": wd,
        "params": n_params,
        "train_seconds": round(train_seconds, 1),
        # Wall time depends on who else uses the CPU; CPU time does not (much).
        "train_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD},
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
    }
    return write_metadata(name, meta, out_dir)


def _weights_path(name: str, out_dir: Path = WEIGHTS_DIR) -> Path:
    weights = MODELS[name].weights
    if weights is None:
        raise ValueError(f"zoo entry {name!r} has no weights file to train")
    return out_dir / weights


def write_metadata(name: str, meta: dict[str, Any], out_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Measure the saved weights (loaded as ``get_model`` does) and write ``<name>.json``.

    Records accuracy on the full 10k test split and on its first :data:`SUBSET` images;
    the test suite re-checks the subset figure, which keeps it fast.
    """
    weights_path = _weights_path(name, out_dir)
    model = MODELS[name].factory()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    x_test, y_test = load_fashion_mnist("test")
    acc = evaluate(model, x_test, y_test)
    sub = evaluate(model, x_test[:SUBSET], y_test[:SUBSET])
    meta = {
        **meta,
        "test_accuracy": round(acc, 2),
        "test_images": int(x_test.shape[0]),
        "subset_accuracy": {"first_n": SUBSET, "accuracy": round(sub, 2)},
        "weights_bytes": weights_path.stat().st_size,
    }
    weights_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    size_kb = meta["weights_bytes"] / 1024
    print(
        f"[{name}] test acc {acc:.2f}% (first {SUBSET}: {sub:.2f}%) -> {weights_path} ({size_kb:.0f} KB)"
    )
    return meta


def refresh_metadata(name: str, out_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Re-measure existing weights and update their JSON, keeping the training record."""
    meta_path = _weights_path(name, out_dir).with_suffix(".json")
    old: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return write_metadata(name, old, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", help=f"default: all of {fmnist_models()}")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {DEFAULT_EPOCHS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR, help=f"default: {WEIGHTS_DIR}")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="re-measure existing weights and update their .json instead of training",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models or fmnist_models()
    unknown = [n for n in names if n not in fmnist_models()]
    if unknown:
        parser.error(
            f"not trainable fashion-mnist models: {unknown}; choose from {fmnist_models()}"
        )
    for name in names:
        if args.eval_only:
            refresh_metadata(name, args.out_dir)
            continue
        epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS.get(name, 6)
        train_one(
            name, epochs, args.seed, args.batch_size, args.lr, args.weight_decay, args.out_dir
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
