"""Position tables: the authors' per-forward interpolation reproduced bit for bit, and usable by every method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from petlbench.backbones.position import interpolate_official
from petlbench.backbones.vit import BackboneError, create_backbone
from petlbench.core.method import BackboneSpec


def authors_interpolation(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """The formula as the FPT authors' code (after DINO) writes it, for a w x h input."""
    n = pos_embed.shape[1] - 1
    if (w // patch) * (h // patch) == n and w == h:
        return pos_embed
    dim = pos_embed.shape[-1]
    class_pos, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos = F.interpolate(
        patch_pos.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1)


@pytest.mark.parametrize(("g0", "res"), [(24, 512), (24, 384 + 16), (14, 512), (24, 1024), (14, 224)])
def test_official_interpolation_is_bit_exact(g0: int, res: int) -> None:
    torch.manual_seed(0)
    table = torch.randn(1, 1 + g0 * g0, 32)
    ours = interpolate_official(table, res // 16)
    assert ours.shape == (1, 1 + (res // 16) ** 2, 32)
    assert torch.equal(ours, authors_interpolation(table, res, res, 16))


def test_official_and_timm_tables_differ_but_only_slightly() -> None:
    """timm resamples once, antialiased, to exactly the new size: not the same numbers as the authors' rule."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    table = torch.randn(1, 1 + 24 * 24, 16)
    timm_table = resample_abs_pos_embed(table, new_size=(32, 32), old_size=(24, 24), num_prefix_tokens=1)
    official = interpolate_official(table, 32)
    assert not torch.equal(timm_table, official)
    assert (timm_table - official).abs().mean() < 0.2 * table.abs().mean()


def test_official_backbone_keeps_its_table_and_runs_at_any_resolution() -> None:
    torch.manual_seed(0)
    model = create_backbone(BackboneSpec("test_vit", pos_interp="official"), 64, 3)
    native = create_backbone(BackboneSpec("test_vit"), 160, 3)
    assert model.pos_embed.shape == native.pos_embed.shape  # the pre-trained grid, not the run's
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with torch.no_grad():  # at the native size nothing is interpolated: identical to timm's model
        native.load_state_dict(model.state_dict())
        model.patch_embed.img_size = native.patch_embed.img_size
        x = torch.randn(1, 3, 160, 160)
        assert torch.equal(model(x), native(x))
    with pytest.raises(BackboneError, match="pos_interp"):
        create_backbone(BackboneSpec("test_vit", pos_interp="nearest"), 64, 3)
