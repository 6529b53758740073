"""Pass-pipeline benchmark: wall time, conv/BN counts before → after, and output equivalence.

    .venv/bin/python tools/bench_passes.py            # every zoo model + the re-param nets

Random BN statistics are used for the re-param nets without trained weights (so folding is
exercised); zoo models with weights use them. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantflow.ir import capture
from quantflow.passes import optimize
from quantflow.testing import max_rel_err
from quantflow.zoo import (
    MODELS,
    get_model,
    reparam,
)

EXTRA = {"acnet_fmnist": reparam.acnet_fmnist, "dbb_fmnist": reparam.dbb_fmnist,
         "mobileone_fmnist": reparam.mobileone_fmnist}


def _randomize_bn(m: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=[*MODELS, *EXTRA])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | convs before → after | BN before → after | passes s | max|Δ|/max|y| |")
    print("|---|---|---|---|---|")
    for name in args.models:
        if name in EXTRA:
            model = EXTRA[name]().eval()
            _randomize_bn(model)
            shape = (1, 28, 28)
        else:
            entry = MODELS[name]
            try:
                model = get_model(name)
            except FileNotFoundError:  # untrained: random weights + random BN stats still prove it
                model = entry.factory().eval()
                _randomize_bn(model)
            shape = entry.input_shape
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
        gm = capture(model, (x[:1],))
        with torch.no_grad():
            ref = gm(x)
        t0 = time.perf_counter()
        rep = optimize(gm)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            err = max_rel_err(gm(x), ref)
        b, a = rep.before, rep.after
        print(f"| {name} | {b['conv']} → {a['conv']} | {b['batch_norm']} → {a['batch_norm']} | "
              f"{dt:.2f} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
