"""An independent MAE implementation used to verify converted models.

Assembled from timm's ``PatchEmbed`` and ViT ``Block`` (the modules Meta's MAE code uses) and
following the paper's reference code step by step: patch embedding + fixed 2-D sin-cos positions,
per-sample random masking by ``argsort`` of uniform noise (keep the smallest), a ViT encoder, a
light decoder that re-inserts mask tokens, and MSE on the masked patches only (optionally on
per-patch normalised pixels). Its ``state_dict`` keys are exactly the original MAE checkpoint's.
It shares no code with transformers' ViTMAE, which is what makes the comparison meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


@dataclass
class MAEOutput:
    latent: torch.Tensor  # (N, 1 + kept, D) encoder output after the final norm
    pred: torch.Tensor | None  # (N, L, P*P*C) decoder prediction, CLS removed
    mask: torch.Tensor  # (N, L), 1 = masked
    loss: torch.Tensor | None


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """The MAE 2-D sin-cos table: half the channels encode the column, half the row (float64)."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in MAE

    def encode_1d(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode_1d(embed_dim // 2, grid_w), encode_1d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, embed_dim]), table], axis=0)
    return table


class ReferenceMAE(nn.Module):
    """Masked autoencoder with ViT backbone, in the original MAE module layout."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden: int = 3072,
        decoder_embed_dim: int | None = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_hidden: int = 2048,
        norm_pix_loss: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=eps)
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        block = partial(Block, qkv_bias=True, norm_layer=norm_layer)
        self.blocks = nn.ModuleList(block(embed_dim, num_heads, mlp_ratio=mlp_hidden / embed_dim) for _ in range(depth))
        self.norm = norm_layer(embed_dim)
        self.has_decoder = decoder_embed_dim is not None
        if self.has_decoder:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(
                torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
            )
            self.decoder_blocks = nn.ModuleList(
                block(decoder_embed_dim, decoder_num_heads, mlp_ratio=decoder_mlp_hidden / decoder_embed_dim)
                for _ in range(decoder_depth)
            )
            self.decoder_norm = norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self._init_weights_like_mae()

    @classmethod
    def from_hf_config_kwargs(cls, kwargs: dict, encoder_only: bool = False) -> ReferenceMAE:
        """Build from ``ViTMAEConfig``-style keyword arguments (or ``config.to_dict()``)."""
        return cls(
            img_size=kwargs["image_size"],
            patch_size=kwargs["patch_size"],
            in_chans=kwargs.get("num_channels", 3),
            embed_dim=kwargs["hidden_size"],
            depth=kwargs["num_hidden_layers"],
            num_heads=kwargs["num_attention_heads"],
            mlp_hidden=kwargs["intermediate_size"],
            decoder_embed_dim=None if encoder_only else kwargs["decoder_hidden_size"],
            decoder_depth=kwargs.get("decoder_num_hidden_layers", 0),
            decoder_num_heads=kwargs.get("decoder_num_attention_heads", 1),
            decoder_mlp_hidden=kwargs.get("decoder_intermediate_size", 0),
            norm_pix_loss=kwargs.get("norm_pix_loss", False),
            eps=kwargs.get("layer_norm_eps", 1e-6),
        )

    def _init_weights_like_mae(self) -> None:
        grid = int(self.patch_embed.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.has_decoder:
            table = sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid)
            self.decoder_pos_embed.data.copy_(torch.from_numpy(table).unsqueeze(0))
            nn.init.normal_(self.mask_token, std=0.02)
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, P*P*C) in (h, w, p, q, c) order."""
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None) -> MAEOutput:
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.patch_embed.num_patches, device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if not self.has_decoder:
            return MAEOutput(latent, None, mask, None)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask) if mask.sum() > 0 else None
        return MAEOutput(latent, pred, mask, loss)
