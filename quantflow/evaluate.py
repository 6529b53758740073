"""Quality metrics of a quantized model against its FP32 original.

With labels: top-1 accuracy of each, and the drop in percentage points. Without: top-1
agreement with FP32, output SQNR (signal-to-quantization-noise ratio, dB), the KL divergence
of the softmax outputs and the mean cosine similarity of each sample's output (for embedding
models) — fidelity measures that need no ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from quantflow.batch import chunks, pad_rows
from quantflow.errors import CaptureError
from quantflow.progress import bar


@dataclass(frozen=True)
class Quality:
    """Metrics of one model's outputs; reference-relative ones are None for the reference."""

    samples: int
    accuracy: float | None = None  # percent, when labels exist
    agreement: float | None = None  # fraction of top-1 equal to the reference's
    sqnr_db: float | None = None
    kl: float | None = None
    #: mean cosine similarity of each sample's output with the reference's (embeddings)
    cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − out‖²), +inf when identical."""
    noise = float((ref.double() - out.double()).pow(2).sum())
    signal = float(ref.double().pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(softmax(ref) ‖ softmax(out)) over the batch."""
    p = torch.log_softmax(ref_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(dim=-1).mean())


def quality(logits: torch.Tensor, labels: torch.Tensor | None = None,
            reference: torch.Tensor | None = None) -> Quality:
    """Metrics of `logits` (N, classes) against labels and/or reference logits."""
    acc = None
    if labels is not None:
        acc = 100.0 * float((logits.argmax(-1) == labels).double().mean())
    if reference is None:
        return Quality(samples=logits.shape[0], accuracy=acc)
    agree = float((logits.argmax(-1) == reference.argmax(-1)).double().mean())
    return Quality(samples=logits.shape[0], accuracy=acc, agreement=agree,
                   sqnr_db=sqnr_db(reference, logits), kl=kl_divergence(reference, logits),
                   cosine=cosine(reference, logits))


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over samples of cos(ref_i, out_i), each sample's output flattened; the fidelity
    measure of embedding models (argmax agreement means nothing for them)."""
    a, b = ref.double().flatten(1), out.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30).mean())


#: elements (samples × per-sample size) a candidate plan is scored on: all 512 Fashion-MNIST
#: calibration images (784 each), 32 of the 80 ImageNet views (150528 each). Scoring the 8
#: calibrator candidates on all 80 ImageNet views was most of the default compile's time.
SCORE_ELEMENTS = 32 * 3 * 224 * 224


def scoring_subset(x: torch.Tensor, max_elements: int = SCORE_ELEMENTS,
                   min_samples: int = 16) -> torch.Tensor:
    """The first samples of `x` that fit `max_elements` (at least `min_samples`): enough to
    rank candidates, cheap enough to score many."""
    per = max(1, int(x[0].numel())) if x.shape[0] else 1
    return x[:max(min_samples, max_elements // per)]


#: small batches keep activations in cache: mobilenetv2_fmnist's INT8 simulation of 1000
#: images takes 1.1 s in batches of 100, 1.6 s of 256, 4.9 s of 1000 (1 core)
PREDICT_BATCH = 100


def predict(fn: Callable[[torch.Tensor], Any], x: torch.Tensor,
            batch_size: int = PREDICT_BATCH, desc: str | None = None) -> torch.Tensor:
    """Run `fn` over `x` in batches and concatenate the (first) outputs, one row per sample.
    With `desc`, a progress bar of that name counts the batches (quantflow.progress).

    A graph with a static batch runs in chunks of it (`quantflow.batch.chunks`). An output
    that does not have one row per input sample cannot be compared sample by sample: that is
    a CaptureError naming the output, not a shape error deep inside the metrics.
    """
    outs = []
    with torch.no_grad():
        for xb in bar(chunks(fn, x, batch_size), desc or "", "batch", disable=desc is None):
            y = fn(xb)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != xb.shape[0]:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise CaptureError(
                    f"the model's first output{_output_name(fn)} is {shape} for a batch of "
                    f"{xb.shape[0]} inputs; quantflow compares outputs sample by sample and "
                    "needs the batch as their first dimension; fix: return (batch, ...) "
                    "outputs, e.g. view(x.shape[0], -1) instead of view(-1) or view(1, -1)")
            outs.append(y)
    return torch.cat(outs)[:x.shape[0]]


def _output_name(fn: object) -> str:
    """` (node NAME)` for a GraphModule's first output, else empty."""
    graph = getattr(fn, "graph", None)
    if graph is None:
        return ""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    args = out.args[0] if out is not None else None
    first = args[0] if isinstance(args, (tuple, list)) and args else args
    name = getattr(first, "name", None)
    return f" (node {name!r})" if name else ""


def predict_runtime(run: Callable[[Sequence[np.ndarray]], list[np.ndarray]], x: torch.Tensor,
                    batch: int, desc: str | None = None) -> torch.Tensor:
    """Run a compiled artifact (fixed batch size `batch`) over `x`, padding the last batch;
    with `desc`, under a progress bar of that name."""
    outs = []
    for i in bar(range(0, x.shape[0], batch), desc or "", "batch", disable=desc is None):
        xb = x[i:i + batch]
        n = xb.shape[0]
        xb = pad_rows(xb, batch)
        outs.append(torch.from_numpy(np.asarray(run([xb.numpy()])[0]))[:n])
    return torch.cat(outs)
