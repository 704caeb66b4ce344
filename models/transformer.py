"""The DETR encoder-decoder transformer.

Differences from ``torch.nn.Transformer`` that matter for DETR: positional encodings are added to the
queries and keys of every attention layer (not only to the input), the decoder returns the output of
every layer (for the auxiliary losses), and the decoder's layer norm is applied to each of them.
"""
import contextlib
import copy
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Transformer(nn.Module):
    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False,
                 return_intermediate_dec: bool = False, pos_at_input: bool = False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)

        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        decoder_norm = nn.LayerNorm(d_model)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, decoder_norm,
                                          return_intermediate=return_intermediate_dec)
        self.d_model = d_model
        self.nhead = nhead
        # Convergence aid (not in the original): also add the positional encoding to the encoder input.
        self.pos_at_input = pos_at_input
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                cross_attn_bias: Optional[Tensor] = None, query_attn_mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
        """
        src: [B, C, H, W] projected features; mask: [B, H, W] True on padding;
        query_embed: [Q, C] learned queries; pos_embed: [B, C, H, W];
        cross_attn_bias: optional [B, Q, H*W] added to every decoder cross-attention logit;
        query_attn_mask: optional [Q, Q] bool, True where a query may not attend to another (decoder self-attention).
        Returns hs [num_dec_layers (or 1), B, Q, C] and memory [B, C, H, W].
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, C]
        mask = mask.flatten(1)  # [B, HW]
        if self.pos_at_input:
            src = src + pos_embed
        memory_mask: Optional[Tensor] = None
        memory_key_padding_mask = mask
        if cross_attn_bias is not None:  # -> [B * nhead, Q, HW], the layout nn.MultiheadAttention expects
            memory_mask = cross_attn_bias.repeat_interleave(self.nhead, dim=0)
            # an additive float mask too, as MultiheadAttention wants both masks of one type
            memory_key_padding_mask = torch.zeros_like(mask, dtype=cross_attn_bias.dtype).masked_fill(
                mask, float("-inf"))

        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, tgt_mask=query_attn_mask, memory_mask=memory_mask,
                          memory_key_padding_mask=memory_key_padding_mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """Returns [num_layers, Q, B, C] if return_intermediate, else [1, Q, B, C]."""
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.norm(output) if self.norm is not None else output)
        if self.norm is not None:
            output = self.norm(output)
        if self.return_intermediate:
            return torch.stack(intermediate)
        return output.unsqueeze(0)


def _with_pos(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, post-norm by default (``normalize_before`` for pre-norm)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        # In eval mode attention runs through scaled_dot_product_attention (fused, no weights) unless weights are
        # asked for (capture_attention). Training keeps the original's explicit softmax: the fused CPU kernel's
        # backward loses precision when attention logits get large, and diverged where the explicit one trains.
        self.need_weights = False

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            src2 = self.norm1(src)
            q = k = _with_pos(src2, pos)
            src = src + self.dropout1(self.self_attn(q, k, value=src2, attn_mask=src_mask,
                                                     key_padding_mask=src_key_padding_mask,
                                                     need_weights=self.need_weights or self.training)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                              need_weights=self.need_weights or self.training)[0]
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the encoder memory, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        # In eval mode attention runs through scaled_dot_product_attention (fused, no weights) unless weights are
        # asked for (capture_attention). Training keeps the original's explicit softmax: the fused CPU kernel's
        # backward loses precision when attention logits get large, and diverged where the explicit one trains.
        self.need_weights = False

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            tgt2 = self.norm1(tgt)
            q = k = _with_pos(tgt2, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, value=tgt2, attn_mask=tgt_mask,
                                                     key_padding_mask=tgt_key_padding_mask,
                                                     need_weights=self.need_weights or self.training)[0])
            tgt2 = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(
                query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos), value=memory,
                attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                need_weights=self.need_weights or self.training)[0])
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                              need_weights=self.need_weights or self.training)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                                   need_weights=self.need_weights or self.training)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


@contextlib.contextmanager
def capture_attention(transformer: "Transformer") -> Iterator[Dict[str, Tensor]]:
    """Record the attention weights (averaged over heads) of every attention layer while the block runs.

        with capture_attention(model.transformer) as attention:
            outputs = model(images)
        cross = attention["decoder.5.cross_attn"]  # [B, num_queries, H*W] of the feature map

    Keys: 'encoder.{i}.self_attn' [B, HW, HW], 'decoder.{i}.self_attn' [B, Q, Q], 'decoder.{i}.cross_attn'
    [B, Q, HW]; each row sums to 1 over the keys (padding gets 0). Outside the block the layers go back to the
    fused attention, which computes no weights.
    """
    recorded: Dict[str, Tensor] = {}
    handles = []
    layers = [(f"encoder.{i}", layer) for i, layer in enumerate(transformer.encoder.layers)]
    layers += [(f"decoder.{i}", layer) for i, layer in enumerate(transformer.decoder.layers)]

    def keep(key: str):
        def hook(module, inputs, output):
            recorded[key] = output[1].detach()
        return hook

    for name, layer in layers:
        layer.need_weights = True
        handles.append(layer.self_attn.register_forward_hook(keep(f"{name}.self_attn")))
        if hasattr(layer, "multihead_attn"):
            handles.append(layer.multihead_attn.register_forward_hook(keep(f"{name}.cross_attn")))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        for _, layer in layers:
            layer.need_weights = False


def _get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _get_activation_fn(activation: str):
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if activation == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {activation}")


def build_transformer(args) -> Transformer:
    return Transformer(
        d_model=args.hidden_dim,
        dropout=args.dropout,
        nhead=args.nheads,
        dim_feedforward=args.dim_feedforward,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        normalize_before=args.pre_norm,
        return_intermediate_dec=True,
        pos_at_input=getattr(args, "pos_at_input", False),
    )
