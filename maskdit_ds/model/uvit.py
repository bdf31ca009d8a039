"""U-ViT backbone for masked pixel-space pre-training (MaskDM, Lei et al. 2023; U-ViT, Bao et al. CVPR 2023).

Everything is a token: the noise level and the class label are two extra tokens in front of the patch tokens,
and long skip connections join each shallow block to its mirror-image deep block (concat, then Linear 2D -> D).
No adaLN: conditioning reaches the patches only through attention to the two extra tokens.

Masking (training only, as in MaskDM's mask_uvit): masked patch tokens are dropped before the trunk, so the
whole U-ViT (skips included) runs on the visible tokens plus the two extras. A light decoder then re-inserts a
learned mask token at every removed position (MAE style) and runs `decoder_depth` plain blocks of width
`decoder_hidden` over all tokens. We chose a decoder rather than mask tokens re-inserted before the last trunk
blocks because it keeps every trunk block at the masked cost, matches MaskDiT's encoder/decoder split (so the
loss, FLOP counting and fine-tuning treat both backbones alike) and matches MaskDM. Like MaskDiT's, the decoder
is kept at inference and then sees all tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .align import Tap
from .layers import Attention, FixedSinCos, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, unpatchify
from .masking import MaskRecord, gather_tokens
from .registry import Backbone, ModelSize, register_backbone

EXTRA_TOKENS = 2  # [time, label] in front of the patch tokens


class UViTBlock(nn.Module):
    """Pre-LN transformer block; a deep block first merges its shallow partner through concat + Linear(2D, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        # x, skip: (N, T, D)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """F(x_in, c_noise, y_onehot[, record]) -> (N, C, H, W), the same contract as MaskDiT.

    size.depth blocks in all: depth // 2 shallow ("in") blocks, depth % 2 middle block, depth // 2 deep ("out")
    blocks with long skips; then decoder_depth blocks of width decoder_hidden (the MAE-style decoder).
    """

    def __init__(self, size: ModelSize, input_size: int, in_channels: int, num_classes: int):
        super().__init__()
        p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
        if input_size % p:
            raise ValueError(f"input size {input_size} is not divisible by patch size {p}")
        if size.depth < 1 or size.decoder_depth < 1:
            raise ValueError(f"U-ViT needs depth >= 1 and decoder_depth >= 1, got {size.depth}, {size.decoder_depth}")
        self.size, self.input_size, self.in_channels, self.num_classes = size, input_size, in_channels, num_classes
        self.grid = input_size // p
        self.num_tokens = self.grid**2

        self.x_embedder = PatchEmbed(p, in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d)  # bias-free: the all-zero row embeds to exactly 0
        self.extras_embed = nn.Parameter(torch.zeros(1, EXTRA_TOKENS, d))  # learned role of the time/label token
        self.pos_embed = FixedSinCos(d, self.grid)
        half, mlp = size.depth // 2, size.mlp_ratio
        self.in_blocks = nn.ModuleList([UViTBlock(d, size.num_heads, mlp) for _ in range(half)])
        self.mid_blocks = nn.ModuleList([UViTBlock(d, size.num_heads, mlp) for _ in range(size.depth % 2)])
        self.out_blocks = nn.ModuleList([UViTBlock(d, size.num_heads, mlp, skip=True) for _ in range(half)])
        self.norm = nn.LayerNorm(d)

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = FixedSinCos(dd, self.grid)
        self.decoder_blocks = nn.ModuleList(
            [UViTBlock(dd, size.decoder_heads, mlp) for _ in range(size.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd)
        self.final_layer = nn.Linear(dd, p * p * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # U-ViT's init: truncated normal (0.02) linears with zero bias; the output starts at zero so F = 0.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for param in (self.extras_embed, self.mask_token):
            nn.init.normal_(param, std=0.02)
        nn.init.zeros_(self.final_layer.weight)
        nn.init.zeros_(self.final_layer.bias)

    def trunk(self, tokens: torch.Tensor, tap: Tap | None = None) -> torch.Tensor:
        """(N, T, D) -> (N, T, D): shallow blocks, middle, deep blocks each fed its mirror's output. tap: receives
        the patch tokens (N, T - 2, D) after trunk block tap.depth, counted in the order the blocks run."""
        skips, depth = [], 0

        def tapped(x):
            nonlocal depth
            depth += 1
            if tap is not None and depth == tap.depth:
                tap.tokens = x[:, EXTRA_TOKENS:]
            return x

        for block in self.in_blocks:
            tokens = tapped(block(tokens))
            skips.append(tokens)
        for block in self.mid_blocks:
            tokens = tapped(block(tokens))
        for block in self.out_blocks:
            tokens = tapped(block(tokens, skips.pop()))
        return self.norm(tokens)

    def forward(self, x, c_noise, y_onehot, record: MaskRecord | None = None, tap: Tap | None = None) -> torch.Tensor:
        """x (N, C, H, W), c_noise (N,), y_onehot (N, classes), record: the training mask (None: all tokens)
        -> (N, C, H, W)."""
        n = x.shape[0]
        patches = self.pos_embed(self.x_embedder(x))  # (N, L, D)
        t_tok = self.t_embedder(c_noise).to(patches.dtype)  # (N, D)
        y_tok = self.y_embedder(y_onehot.to(patches.dtype))  # (N, D); zero for the unconditional label
        extras = torch.stack([t_tok, y_tok], dim=1) + self.extras_embed.to(patches.dtype)  # (N, 2, D)
        if record is not None:
            patches = gather_tokens(patches, record.ids_keep)  # (N, L_keep, D): dropped tokens never enter
        tokens = self.decoder_embed(self.trunk(torch.cat([extras, patches], dim=1), tap))  # (N, 2 + L_keep, Dd)
        extras, patches = tokens[:, :EXTRA_TOKENS], tokens[:, EXTRA_TOKENS:]
        if record is not None:
            fill = self.mask_token.to(patches.dtype).expand(n, self.num_tokens - record.num_keep, -1)
            patches = gather_tokens(torch.cat([patches, fill], dim=1), record.ids_restore)  # (N, L, Dd), raster
        tokens = torch.cat([extras, self.decoder_pos_embed(patches)], dim=1)  # (N, 2 + L, Dd)
        for block in self.decoder_blocks:
            tokens = block(tokens)
        out = self.final_layer(self.decoder_norm(tokens[:, EXTRA_TOKENS:]))  # (N, L, p*p*C)
        return unpatchify(out, self.grid, self.size.patch_size, self.in_channels)


def uvit_block_flops(tokens: int, dim: int, mlp_ratio: float, skip: bool) -> float:
    # qkv 6Td^2 + proj 2Td^2 + mlp 4*ratio*Td^2 + attention 4T^2 d (+ skip Linear(2d, d): 4Td^2)
    return (8 + 4 * mlp_ratio + (4 if skip else 0)) * tokens * dim**2 + 4 * tokens**2 * dim


def uvit_forward_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None) -> float:
    """The trunk sees `kept` patch tokens plus the time and label tokens; the decoder all of them."""
    p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
    length = (input_size // p) ** 2
    trunk = (length if kept is None else kept) + EXTRA_TOKENS
    flops = 2 * length * p * p * in_channels * d + 2 * (256 * d + d * d)  # patch embed + time MLP
    half = size.depth // 2
    flops += (half + size.depth % 2) * uvit_block_flops(trunk, d, size.mlp_ratio, False)
    flops += half * uvit_block_flops(trunk, d, size.mlp_ratio, True)
    flops += 2 * trunk * d * dd  # decoder_embed
    flops += size.decoder_depth * uvit_block_flops(length + EXTRA_TOKENS, dd, size.mlp_ratio, False)
    flops += 2 * length * dd * p * p * in_channels  # final layer
    return float(flops)


# U-ViT's own sizes (Bao et al. 2023: S 13x512, M 17x768, L 21x1024) with the same light MAE-style decoder as
# MaskDiT, plus tiny sizes for tests and the digits demo.
_UVIT = {"S": (13, 512, 8), "M": (17, 768, 12), "L": (21, 1024, 16)}
SIZES = {f"UViT-{name}/{patch}": ModelSize(depth, width, heads, patch)
         for name, (depth, width, heads) in _UVIT.items() for patch in (2, 4, 8)}
SIZES["UViT-T/2"] = ModelSize(3, 64, 4, 2, decoder_depth=1, decoder_hidden=32, decoder_heads=4)
SIZES["UViT-Digits/2"] = ModelSize(4, 128, 4, 2, decoder_depth=2, decoder_hidden=64, decoder_heads=4)

register_backbone("uvit", Backbone(network=UViT, forward_flops=uvit_forward_flops, compile_units=(UViTBlock,),
                                   position_tables=("pos_embed", "decoder_pos_embed"), sizes=SIZES))
