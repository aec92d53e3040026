"""Solvent masks: where the molecule may have density, so that solvent noise is not fitted.

The likelihood alone lets a map put density anywhere in the box, and with few, noisy, partly
junk particles it does: density at the box edge and solvent noise around a blob. Both RELION
and cryoSPARC multiply the map by a soft mask in every iteration. Ab initio the support is
unknown, so the mask starts as a sphere of the particle's diameter and then follows the map
(cryoSPARC's dynamic mask): threshold the low-passed map at a fraction of its maximum, grow the
region by a margin, and give it a soft cosine edge.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def dynamic_mask(volume: Tensor, sphere: Tensor, *, threshold_fraction: float = 0.15,
                 dilate_px: float = 3.0, edge_px: float = 4.0) -> Tensor:
    """A soft mask (N, N, N) following `volume` (N, N, N), inside `sphere` (N, N, N).

    Voxels above `threshold_fraction` of the maximum (of the map inside the sphere) are kept,
    only the connected region holding the largest value (solvent specks do not count), grown
    by `dilate_px` and given a raised-cosine edge `edge_px` wide. Falls back to `sphere` when
    the map has no positive density.
    """
    values = (volume.detach().double() * sphere.double()).cpu().numpy()
    peak = values.max()
    if not peak > 0:
        return sphere.clone()
    core = values >= threshold_fraction * peak
    labels, count = ndimage.label(core)
    if count > 1:
        core = labels == labels[np.unravel_index(np.argmax(values), values.shape)]
    distance = ndimage.distance_transform_edt(~core)  # 0 inside, px to the region outside
    ramp = np.clip((distance - dilate_px) / edge_px, 0, 1)
    soft = torch.from_numpy(0.5 + 0.5 * np.cos(np.pi * ramp))
    return (soft.to(sphere.device, sphere.dtype) * sphere).contiguous()


def mask_fraction(mask: Tensor) -> float:
    """Share of the box the mask keeps (its mean), for the log."""
    return float(mask.double().mean())
