"""Random-resized crops split in two: the region cut on the CPU, the resize batched on the device.

torchvision's ``RandomResizedCrop`` (the PIL path's op) cuts the region and resizes it with Pillow's
antialiased bilinear filter; at 224 px those two resizes were most of the batched backend's CPU side
(issue 22). Swapping the CPU resizer does not help here: torch's uint8 ``interpolate(antialias=True)``
measured ~5x slower than Pillow on this AVX2 CPU, and JPEG draft decoding needs the undecoded file,
which the datasets do not hand the views (they decode before the transform). So the worker samples the
region with torchvision's own ``RandomResizedCrop.get_params`` (same scale and ratio distributions, same
random numbers) and copies it to the top left of a fixed uint8 canvas of 2x the output size; the device
resizes the whole batch with Pillow's filter written as two batched matrix products per view (as DALI
pipelines decode the crop's region and leave ``fn.resize`` to the GPU). No library resizes a batch with
per-sample sizes under Pillow's filter (torch's antialiased ``interpolate`` takes one size per call;
``roi_align`` averages bilinear samples, up to 25 grey levels off Pillow on a detailed image), hence
:func:`filter_weights`.
A region longer than the canvas (~3 in 100 crops of a 500x375 photo at 224 px, 72 in 100 at 1000x750)
is resized on the CPU by the PIL op itself and placed at the output size, where the device's resize is
the identity.

Against the PIL op on the same region: within 1 grey level (Pillow rounds to 8 bits between its two
passes; tests/test_batched_views.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import resized_crop


def canvas_size(output: int) -> int:
    """Side of the uint8 canvas: regions up to 2x the output."""
    return 2 * output


def cut_region(
    image: Image.Image, box: tuple[int, int, int, int], output: int
) -> tuple[np.ndarray, int, int]:
    """The region ``box`` = (top, left, height, width) of an RGB image on a canvas -> (canvas HxWx3, w, h),
    w and h its extent there. A region longer than the canvas is resized on the CPU with torchvision's
    ``resized_crop`` (the PIL path's op) and placed at the output size: the device's resize is then the
    identity."""
    top, left, height, width = box
    side = canvas_size(output)
    if max(height, width) > side:
        part, width, height = resized_crop(image, top, left, height, width, [output, output]), output, output
    else:
        part = image.crop((left, top, left + width, top + height))
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:height, :width] = np.asarray(part)
    return canvas, width, height


def filter_weights(extents: torch.Tensor, length: int, output: int) -> torch.Tensor:
    """PIL's antialiased bilinear resampling along one axis as matrices (N, output, length): output pixel
    o of a region of extent e (pixels 0..ceil(e)-1) weighs input pixel x by the triangle
    1 - |x + 0.5 - (o + 0.5) e / output| / s, s = max(e / output, 1), normalised over the region
    (Pillow's ``ImagingResample`` precompute_coeffs, without its 8-bit fixed point)."""
    scale = (extents / output).view(-1, 1, 1)
    support = scale.clamp(min=1.0)
    centres = (torch.arange(output, device=extents.device, dtype=extents.dtype).view(1, -1, 1) + 0.5) * scale
    pixels = torch.arange(length, device=extents.device, dtype=extents.dtype).view(1, 1, -1)
    weights = (1 - (pixels + 0.5 - centres).abs() / support).clamp(min=0)
    weights = weights * (pixels < extents.view(-1, 1, 1))  # only the region's pixels
    return weights / weights.sum(-1, keepdim=True)


def resize_regions(canvases: torch.Tensor, extents: torch.Tensor, output: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 canvases and their (w, h) extents -> (N, 3, output, output) float in [0, 255]:
    rows then columns, each a batched matrix product (separable, as Pillow resamples)."""
    x = canvases.permute(0, 3, 1, 2).float()
    extents = extents.float()
    rows = filter_weights(extents[:, 1], x.shape[-2], output).unsqueeze(1)  # (N, 1, output, H)
    cols = filter_weights(extents[:, 0], x.shape[-1], output).unsqueeze(1)  # (N, 1, output, W)
    return rows @ x @ cols.transpose(-1, -2)
