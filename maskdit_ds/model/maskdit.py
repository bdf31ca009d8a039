"""MaskDiT: a DiT encoder over visible tokens plus a small DiT decoder over all tokens (Zheng et al., TMLR 2024)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .align import Tap
from .layers import DiTBlock, FixedSinCos, LabelEmbedder, ModulatedLinear, PatchEmbed, TimestepEmbedder, unpatchify
from .masking import MaskRecord, gather_tokens
from .registry import Backbone, ModelSize, register_backbone


class MaskDiT(nn.Module):
    """F(x_in, c_noise, y_onehot[, record]) -> (N, C, H, W). Pure torch; drops the tokens a record removes."""

    def __init__(self, size: ModelSize, input_size: int, in_channels: int, num_classes: int):
        super().__init__()
        p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
        if input_size % p:
            raise ValueError(f"input size {input_size} is not divisible by patch size {p}")
        self.size, self.input_size, self.in_channels, self.num_classes = size, input_size, in_channels, num_classes
        self.grid = input_size // p
        self.num_tokens = self.grid**2

        self.x_embedder = PatchEmbed(p, in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d)
        self.pos_embed = FixedSinCos(d, self.grid)
        self.blocks = nn.ModuleList([DiTBlock(d, size.num_heads, size.mlp_ratio, d) for _ in range(size.depth)])
        self.decoder_layer = ModulatedLinear(d, dd, cond_dim=d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = FixedSinCos(dd, self.grid)
        self.decoder_blocks = nn.ModuleList(
            [DiTBlock(dd, size.decoder_heads, size.mlp_ratio, d) for _ in range(size.decoder_depth)]
        )
        self.final_layer = ModulatedLinear(dd, p * p * in_channels, cond_dim=d)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        # adaLN-Zero: every modulation, the encoder->decoder map and the output start at zero, so F = 0 at step 0.
        for block in [*self.blocks, *self.decoder_blocks, self.decoder_layer, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.decoder_layer.linear, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c_noise, y_onehot, record: MaskRecord | None = None, tap: Tap | None = None) -> torch.Tensor:
        """x (N, C, H, W), c_noise (N,), y_onehot (N, classes), record: the training mask (None: all tokens)
        -> (N, C, H, W). tap: receives the encoder tokens after block tap.depth (representation alignment)."""
        tokens = self.pos_embed(self.x_embedder(x))  # (N, L, D)
        c = self.t_embedder(c_noise) + self.y_embedder(y_onehot.to(tokens.dtype))  # (N, D)
        if record is not None:
            tokens = gather_tokens(tokens, record.ids_keep)  # (N, L_keep, D): dropped tokens never enter
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c)
            if tap is not None and depth == tap.depth:
                tap.tokens = tokens  # (N, L_keep, D)
        tokens = self.decoder_layer(tokens, c)  # (N, L_keep, Dd)
        if record is not None:
            fill = self.mask_token.to(tokens.dtype).expand(tokens.shape[0], self.num_tokens - record.num_keep, -1)
            tokens = gather_tokens(torch.cat([tokens, fill], dim=1), record.ids_restore)  # (N, L, Dd), raster order
        tokens = self.decoder_pos_embed(tokens)
        for block in self.decoder_blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), self.grid, self.size.patch_size, self.in_channels)


def dit_block_flops(tokens: int, dim: int, cond_dim: int, mlp_ratio: float) -> float:
    # qkv 6Td^2 + proj 2Td^2 + mlp 4*ratio*Td^2, attention 4T^2 d, adaLN 12 d cond (once per sample).
    return (8 + 4 * mlp_ratio) * tokens * dim**2 + 4 * tokens**2 * dim + 12 * dim * cond_dim


def maskdit_forward_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None) -> float:
    """The encoder sees `kept` tokens, the decoder all of them."""
    p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
    tokens = (input_size // p) ** 2
    kept = tokens if kept is None else kept
    flops = 2 * tokens * p * p * in_channels * d  # patch embed (all tokens, before dropping)
    flops += 2 * (256 * d + d * d)  # timestep MLP
    flops += size.depth * dit_block_flops(kept, d, d, size.mlp_ratio)
    flops += 2 * kept * d * dd + 4 * d * d  # encoder -> decoder
    flops += size.decoder_depth * dit_block_flops(tokens, dd, d, size.mlp_ratio)
    flops += 2 * tokens * dd * p * p * in_channels + 4 * d * dd  # final layer
    return float(flops)


_PAPER = {  # name: (encoder depth, width, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),  # 730,541,200 params at 256 px, 731,819,152 at 512 px
    "H": (32, 1280, 16),
}
SIZES = {f"MaskDiT-{name}/{patch}": ModelSize(depth, width, heads, patch)
         for name, (depth, width, heads) in _PAPER.items() for patch in (2, 4, 8)}
# Small sizes for tests, the built-in example and CPU benchmarks (not from the paper).
SIZES["MaskDiT-T/2"] = ModelSize(2, 64, 4, 2, decoder_depth=1, decoder_hidden=32, decoder_heads=4)
SIZES["MaskDiT-Digits/2"] = ModelSize(4, 128, 4, 2, decoder_depth=2, decoder_hidden=64, decoder_heads=4)  # 1.5M

register_backbone("maskdit", Backbone(network=MaskDiT, forward_flops=maskdit_forward_flops, compile_units=(DiTBlock,),
                                      position_tables=("pos_embed", "decoder_pos_embed"), sizes=SIZES))
