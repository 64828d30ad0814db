"""Generated image-classification tasks for the built-in demo benchmark.

The default demo (config/config.yaml, docs/demo.md) uses the CLIP-like set at the end of this
module: θ0 pretrained on five attributes of every image at once (:data:`ATTRIBUTES_TASK`), and
six downstream tasks that are domain shifts of those attributes (:data:`CLIP_TASKS`), one of
them the real handwritten digits. The first set below (:data:`TASKS`, :data:`PRETRAIN_TASK`)
serves the tiny test workflow.

Eight tasks stand in for the paper's eight datasets. Each asks a different question
of a small image (which shape, which stripe orientation, which hue, which digit, how
many blobs, which quadrant, how fine the stripes, how large), so the fine-tuned
encoders move in different directions and interfere when merged. A ninth, generic
task (:data:`PRETRAIN_TASK`) is used to pretrain θ0: seven-segment letters,
polygons and textures, labelled by symbol and by which half of the image holds it.
They are built from the same parts as the eight tasks' images (strokes, corners,
curves, blobs, periodic patterns) but none is one of their classes, so θ0 learns
useful features without solving any of the eight tasks, as CLIP's pretraining data
is not its evaluation datasets.

Every image is drawn with whole-batch tensor operations: per-image parameters have
shape [N, 1, 1, 1] and broadcast against a pixel grid [1, 1, H, W]. Shapes are
signed distance functions (negative inside) turned into anti-aliased masks, so
sizes and positions are continuous. Nuisance variation shared by all tasks: a
tinted background with a random gradient, random foreground colours with a
minimum contrast, random positions and sizes, and Gaussian pixel noise.

Geometry is specified in pixels of a 32×32 image and scaled with ``image_size``.
Images are rendered in [0, 1] and, by default, standardised per image (zero mean,
unit std: see :func:`standardize_images`), shape [N, 3, H, W]; labels are int64
in [0, C).
Generation is deterministic in (task, split, seed, n, image_size) and uses no disk
(a larger ``n`` is not a superset of a smaller one).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTES_TASK",
    "CLIP_TASKS",
    "PRETRAIN_TASK",
    "SPLITS",
    "TASKS",
    "attribute_class_counts",
    "class_names",
    "decode_attributes",
    "make_split",
    "num_classes",
    "split_seed",
    "standardize_images",
    "zeroshot_rows",
]

TASKS: tuple[str, ...] = (
    "shapes",
    "orientation",
    "colour",
    "glyphs",
    "counting",
    "position",
    "frequency",
    "size",
)
"""The eight demo tasks, in the order used for tables."""

PRETRAIN_TASK = "generic"
"""The task θ0 is pretrained on; not one of :data:`TASKS`."""

SPLITS: tuple[str, ...] = ("train", "test")

_CHUNK = 256  # images generated per batch of tensor operations (see make_split)

# Pixel sizes below are for a 32-pixel image; every generator multiplies them by
# image_size / 32 so that other resolutions draw the same pictures.
_REFERENCE_SIZE = 32


# --------------------------------------------------------------------------- #
# Sampling helpers: all take a torch.Generator so results depend on it alone.
# --------------------------------------------------------------------------- #
def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """Uniform samples in [low, high), shape [n, 1, 1, 1] to broadcast over pixels."""
    return (low + (high - low) * torch.rand(n, generator=gen)).view(n, 1, 1, 1)


def _randint(gen: torch.Generator, n: int, high: int) -> Tensor:
    """Integers in [0, high), shape [n]."""
    return torch.randint(0, high, (n,), generator=gen)


def _balanced_labels(gen: torch.Generator, n: int, n_classes: int) -> Tensor:
    """Labels [n] int64 with class counts differing by at most one, in random order."""
    labels = torch.arange(n, dtype=torch.int64) % n_classes
    return labels[torch.randperm(n, generator=gen)]


def _pixel_grid(image_size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (x, y), each [1, 1, H, W], in pixels."""
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x.view(1, 1, image_size, image_size), y.view(1, 1, image_size, image_size)


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """HSV in [0, 1] (each [N]) to RGB [N, 3] in [0, 1]."""
    # Standard closed form: channel c gets v - v*s*clamp(min(k, 4-k), 0, 1).
    offsets = torch.tensor([5.0, 3.0, 1.0])
    k = (offsets.view(1, 3) + hue.view(-1, 1) * 6.0) % 6.0
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return value.view(-1, 1) * (1.0 - saturation.view(-1, 1) * ramp)


def _fill(sdf: Tensor) -> Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels (negative inside)."""
    return torch.clamp(0.5 - sdf, 0.0, 1.0)


# --------------------------------------------------------------------------- #
# Shapes as signed distance functions of pixel offsets from the shape centre.
# --------------------------------------------------------------------------- #
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "bar")


def _rotate(dx: Tensor, dy: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets expressed in a frame rotated by ``angle`` (radians, [N, 1, 1, 1])."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _shape_sdf(kind: Tensor, dx: Tensor, dy: Tensor, radius: Tensor, angle: Tensor) -> Tensor:
    """Signed distance [N, 1, H, W] to a shape of each image's ``kind``.

    Args:
        kind: [N] int64 index into :data:`SHAPE_KINDS`.
        dx, dy: [N, 1, H, W] pixel offsets from the shape centre.
        radius: [N, 1, 1, 1] half-extent in pixels; the kinds are scaled so their
            areas are roughly comparable, so that area alone does not give the kind.
        angle: [N, 1, 1, 1] rotation in radians.
    """
    u, v = _rotate(dx, dy, angle)
    dist = torch.sqrt(u * u + v * v)
    circle = dist - radius
    square = torch.maximum(u.abs(), v.abs()) - 0.9 * radius
    # Equilateral triangle: the largest of three half-plane distances; inradius 0.65 r.
    triangle = (
        torch.stack(
            [
                u * math.cos(a) + v * math.sin(a)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        ).amax(dim=0)
        - 0.65 * radius
    )
    arm = 0.35 * radius
    cross = torch.minimum(
        torch.maximum(u.abs() - 1.15 * radius, v.abs() - arm),
        torch.maximum(u.abs() - arm, v.abs() - 1.15 * radius),
    )
    ring = (dist - 0.95 * radius).abs() - 0.3 * radius
    bar = torch.maximum(u.abs() - 1.5 * radius, v.abs() - 0.4 * radius)
    all_kinds = torch.stack([circle, square, triangle, cross, ring, bar], dim=1)  # [N, K, 1, H, W]
    index = kind.view(-1, 1, 1, 1, 1).expand(-1, 1, *all_kinds.shape[2:])
    return all_kinds.gather(1, index).squeeze(1)


# --------------------------------------------------------------------------- #
# Backgrounds, colours and composition.
# --------------------------------------------------------------------------- #
@dataclass
class _Canvas:
    """A batch of backgrounds and the per-image brightness they were drawn at."""

    images: Tensor  # [N, 3, H, W]
    level: Tensor  # [N] grey level of the background, used to pick contrasting colours


def _background(gen: torch.Generator, n: int, image_size: int) -> _Canvas:
    """Grey backgrounds with a small random tint and a random linear gradient."""
    level = 0.15 + 0.7 * torch.rand(n, generator=gen)
    tint = 0.08 * (2.0 * torch.rand(n, 3, generator=gen) - 1.0)
    x, y = _pixel_grid(image_size)
    direction = 2.0 * math.pi * torch.rand(n, generator=gen).view(n, 1, 1, 1)
    amplitude = _uniform(gen, n, 0.0, 0.15)
    ramp = (torch.cos(direction) * x + torch.sin(direction) * y) / image_size - 0.5
    base = (level.view(n, 1) + tint).view(n, 3, 1, 1)
    return _Canvas(images=base + amplitude * ramp, level=level)


def _contrasting_colour(
    gen: torch.Generator, level: Tensor, hue: Tensor | None = None, min_contrast: float = 0.35
) -> Tensor:
    """Foreground RGB [N, 3] whose brightness differs from ``level`` [N] by ≥ min_contrast.

    ``hue`` [N] in [0, 1] fixes the hue (the colour task); otherwise it is random.
    """
    n = level.shape[0]
    if hue is None:
        hue = torch.rand(n, generator=gen)
    saturation = 0.35 + 0.65 * torch.rand(n, generator=gen)
    # Bright objects on dark backgrounds and dark ones on bright backgrounds.
    spread = torch.rand(n, generator=gen)
    brighter = level + min_contrast + spread * (1.0 - level - min_contrast).clamp(min=0.0)
    darker = spread * (level - min_contrast).clamp(min=0.0)
    value = torch.where(level < 0.5, brighter.clamp(max=1.0), darker)
    return _hsv_to_rgb(hue, saturation, value)


def _paint(images: Tensor, mask: Tensor, colour: Tensor) -> Tensor:
    """Alpha-blend ``colour`` [N, 3] over ``images`` [N, 3, H, W] with ``mask`` [N, 1, H, W]."""
    return images * (1.0 - mask) + colour.view(-1, 3, 1, 1) * mask


def _finish(gen: torch.Generator, images: Tensor) -> Tensor:
    """Add Gaussian pixel noise of a random strength and clip to [0, 1]."""
    n = images.shape[0]
    sigma = _uniform(gen, n, 0.02, 0.08)
    noise = torch.randn(images.shape, generator=gen)
    return (images + sigma * noise).clamp_(0.0, 1.0).contiguous()


def _random_centre(
    gen: torch.Generator, n: int, image_size: int, margin: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Centres [N, 1, 1, 1] uniform in the image shrunk by ``margin`` pixels on each side."""
    span = image_size - 2.0 * margin
    cx = margin + span * torch.rand(n, generator=gen).view(n, 1, 1, 1)
    cy = margin + span * torch.rand(n, generator=gen).view(n, 1, 1, 1)
    return cx, cy


def _centre_x_in_half(gen: torch.Generator, side: Tensor, size: int, margin: Tensor) -> Tensor:
    """Centre x [N, 1, 1, 1] in the left (side 0) or right (side 1) half, ``margin`` from the edge.

    A 1-pixel gap around the midline keeps the half unambiguous.
    """
    n = side.shape[0]
    low = torch.where(side.view(n, 1, 1, 1) == 0, margin, size / 2 + 1.0)
    high = torch.where(side.view(n, 1, 1, 1) == 0, size / 2 - 1.0, size - margin)
    return low + (high - low).clamp(min=0.0) * torch.rand(n, generator=gen).view(n, 1, 1, 1)


def _draw_shape(
    gen: torch.Generator,
    canvas: _Canvas,
    kind: Tensor,
    radius: Tensor,
    cx: Tensor,
    cy: Tensor,
    angle: Tensor | None = None,
    colour: Tensor | None = None,
) -> Tensor:
    """Paint one shape per image onto ``canvas.images`` and return the new images."""
    n, _, size, _ = canvas.images.shape
    x, y = _pixel_grid(size)
    if angle is None:
        angle = _uniform(gen, n, 0.0, 2.0 * math.pi)
    if colour is None:
        colour = _contrasting_colour(gen, canvas.level)
    mask = _fill(_shape_sdf(kind, x - cx, y - cy, radius, angle))
    return _paint(canvas.images, mask, colour)


def _grating(
    gen: torch.Generator, n: int, image_size: int, angle: Tensor, period: Tensor
) -> Tensor:
    """Sinusoidal stripes in [0, 1], [N, 1, H, W]; ``angle`` is the stripe normal, period in px."""
    x, y = _pixel_grid(image_size)
    phase = _uniform(gen, n, 0.0, 2.0 * math.pi)
    along_normal = torch.cos(angle) * x + torch.sin(angle) * y
    return 0.5 + 0.5 * torch.sin(2.0 * math.pi * along_normal / period + phase)


def _draw_grating(gen: torch.Generator, canvas: _Canvas, angle: Tensor, period: Tensor) -> Tensor:
    """Blend a stripe pattern of a random colour and contrast over the whole image."""
    n, _, size, _ = canvas.images.shape
    stripes = _grating(gen, n, size, angle, period)
    contrast = _uniform(gen, n, 0.4, 0.9)
    colour = _contrasting_colour(gen, canvas.level, min_contrast=0.3)
    return _paint(canvas.images, contrast * stripes, colour)


# --------------------------------------------------------------------------- #
# The tasks. Each generator maps (generator, labels [N], image_size) to images.
# --------------------------------------------------------------------------- #
def _gen_shapes(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Which of six shapes; random colour, size, position and rotation."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    radius = _uniform(gen, n, 7.0, 11.0) * scale
    cx, cy = _random_centre(gen, n, size, 0.9 * radius)
    return _finish(gen, _draw_shape(gen, canvas, labels, radius, cx, cy))


ORIENTATION_STEPS = 8


def _gen_orientation(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Stripe orientation in eight steps of 22.5°; random period, phase and colours."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    step = math.pi / ORIENTATION_STEPS
    angle = labels.view(n, 1, 1, 1).float() * step + _uniform(gen, n, -0.2, 0.2) * step
    period = _uniform(gen, n, 4.0, 9.0) * scale
    return _finish(gen, _draw_grating(gen, canvas, angle, period))


HUE_STEPS = 8


def _gen_colour(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Hue of the object in eight bins; the object's shape, size and brightness vary."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    hue = (labels.float() + 0.6 * (torch.rand(n, generator=gen) - 0.5)) / HUE_STEPS % 1.0
    colour = _contrasting_colour(gen, canvas.level, hue=hue, min_contrast=0.25)
    # Keep saturation high enough that hue is defined, by re-deriving it at s ≥ 0.6.
    value = colour.amax(dim=1)
    saturation = 0.6 + 0.4 * torch.rand(n, generator=gen)
    colour = _hsv_to_rgb(hue, saturation, value.clamp(min=0.35))
    kind = _randint(gen, n, len(SHAPE_KINDS))
    radius = _uniform(gen, n, 3.0, 7.0) * scale
    cx, cy = _random_centre(gen, n, size, 1.2 * radius)
    return _finish(gen, _draw_shape(gen, canvas, kind, radius, cx, cy, colour=colour))


# Seven-segment layout: segments a..g as (centre u, centre v, half-width, half-height)
# in glyph units where the glyph is 1 wide and 2 tall, centred on the origin.
_SEGMENTS = torch.tensor(
    [
        [0.0, -1.0, 0.5, 0.0],  # a: top
        [0.5, -0.5, 0.0, 0.5],  # b: top right
        [0.5, 0.5, 0.0, 0.5],  # c: bottom right
        [0.0, 1.0, 0.5, 0.0],  # d: bottom
        [-0.5, 0.5, 0.0, 0.5],  # e: bottom left
        [-0.5, -0.5, 0.0, 0.5],  # f: top left
        [0.0, 0.0, 0.5, 0.0],  # g: middle
    ]
)
_DIGIT_SEGMENTS = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 0],  # 0
        [0, 1, 1, 0, 0, 0, 0],  # 1
        [1, 1, 0, 1, 1, 0, 1],  # 2
        [1, 1, 1, 1, 0, 0, 1],  # 3
        [0, 1, 1, 0, 0, 1, 1],  # 4
        [1, 0, 1, 1, 0, 1, 1],  # 5
        [1, 0, 1, 1, 1, 1, 1],  # 6
        [1, 1, 1, 0, 0, 0, 0],  # 7
        [1, 1, 1, 1, 1, 1, 1],  # 8
        [1, 1, 1, 1, 0, 1, 1],  # 9
    ],
    dtype=torch.float32,
)


def _seven_segment_mask(
    gen: torch.Generator, lit: Tensor, size: int, side: Tensor | None = None
) -> Tensor:
    """Coverage [N, 1, H, W] of seven-segment symbols with segments ``lit`` [N, 7] (0/1).

    Size, slant, stroke width and position are random per image; ``side`` [N]
    (0 left, 1 right), if given, puts the symbol's centre in that half.
    """
    n, scale = lit.shape[0], size / _REFERENCE_SIZE
    unit = _uniform(gen, n, 7.0, 10.0) * scale  # px per glyph unit: glyph is 1 × 2 units
    stroke = _uniform(gen, n, 1.0, 1.8) * scale  # half stroke width in px
    slant = _uniform(gen, n, -0.25, 0.25)
    # Half width 0.5 unit, plus up to 0.25 unit of slant at the top and bottom.
    margin_x = 0.75 * unit + stroke
    cx, _ = _random_centre(gen, n, size, margin_x)
    _, cy = _random_centre(gen, n, size, unit + stroke)
    if side is not None:
        cx = _centre_x_in_half(gen, side, size, margin_x)
    return _glyph_coverage(lit, cx, cy, unit, stroke, slant, size)


def _glyph_coverage(
    lit: Tensor, cx: Tensor, cy: Tensor, unit: Tensor, stroke: Tensor, slant: Tensor, size: int
) -> Tensor:
    """Coverage [N, 1, H, W] of seven-segment symbols ``lit`` [N, 7] centred at (cx, cy).

    ``unit`` is pixels per glyph unit (the glyph is 1 × 2 units), ``stroke`` the half
    stroke width in pixels and ``slant`` the horizontal shear; all [N, 1, 1, 1].
    """
    n = lit.shape[0]
    x, y = _pixel_grid(size)
    # Glyph-frame coordinates [N, 1, H, W]: un-slant, then divide by the glyph unit.
    v = (y - cy) / unit
    u = (x - cx - slant * (y - cy)) / unit
    seg = _SEGMENTS.view(1, 7, 4, 1, 1)
    # Distance to each segment rectangle in px, [N, 7, H, W].
    du = (u - seg[:, :, 0]).abs() - seg[:, :, 2]
    dv = (v - seg[:, :, 1]).abs() - seg[:, :, 3]
    outside = torch.sqrt(du.clamp(min=0) ** 2 + dv.clamp(min=0) ** 2)
    coverage = _fill(outside * unit - stroke)  # [N, 7, H, W]
    # Unlit segments cover nothing.
    return (coverage * lit.view(n, 7, 1, 1)).amax(dim=1, keepdim=True)


def _gen_glyphs(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Seven-segment digits 0-9 with random size, slant, stroke width and position."""
    canvas = _background(gen, labels.shape[0], size)
    mask = _seven_segment_mask(gen, _DIGIT_SEGMENTS[labels], size)
    colour = _contrasting_colour(gen, canvas.level)
    return _finish(gen, _paint(canvas.images, mask, colour))


MAX_COUNT = 6
_COUNT_GRID = 5  # candidate blob cells per side; distinct cells keep blobs apart


def _gen_counting(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Number of blobs, 1..6 (label = count - 1), on a jittered grid so blobs never merge."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    x, y = _pixel_grid(size)
    cell = size / _COUNT_GRID
    # A random choice of MAX_COUNT distinct cells per image: argsort of uniform noise.
    cells = torch.rand(n, _COUNT_GRID**2, generator=gen).argsort(dim=1)[:, :MAX_COUNT]
    jitter = 0.08 * cell * (2.0 * torch.rand(n, MAX_COUNT, 2, generator=gen) - 1.0)
    centre_x = ((cells % _COUNT_GRID).float() + 0.5) * cell + jitter[..., 0]
    centre_y = ((cells // _COUNT_GRID).float() + 0.5) * cell + jitter[..., 1]
    radius = (1.8 + 0.8 * torch.rand(n, MAX_COUNT, generator=gen)) * scale
    dist = torch.sqrt(
        (x - centre_x.view(n, MAX_COUNT, 1, 1)) ** 2 + (y - centre_y.view(n, MAX_COUNT, 1, 1)) ** 2
    ) - radius.view(n, MAX_COUNT, 1, 1)  # [N, MAX_COUNT, H, W]
    present = torch.arange(MAX_COUNT).view(1, MAX_COUNT) <= labels.view(n, 1)
    coverage = (_fill(dist) * present.view(n, MAX_COUNT, 1, 1)).amax(dim=1, keepdim=True)
    colour = _contrasting_colour(gen, canvas.level)
    return _finish(gen, _paint(canvas.images, coverage, colour))


# Quadrants. A 3×3 grid was too hard to learn from θ0 in the demo's fine-tuning
# budget (θ0 keeps only coarse left/right layout, from the generic task).
POSITION_GRID = 2


def _gen_position(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Which quadrant holds the object's centre; shape, size, colour and offset vary."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    cell = size / POSITION_GRID
    row = (labels // POSITION_GRID).float().view(n, 1, 1, 1)
    col = (labels % POSITION_GRID).float().view(n, 1, 1, 1)
    cx = (col + _uniform(gen, n, 0.15, 0.85)) * cell
    cy = (row + _uniform(gen, n, 0.15, 0.85)) * cell
    kind = _randint(gen, n, len(SHAPE_KINDS))
    radius = _uniform(gen, n, 3.5, 5.5) * scale
    return _finish(gen, _draw_shape(gen, canvas, kind, radius, cx, cy))


# Stripe periods in px, geometric so neighbouring classes differ by the same ratio.
FREQUENCY_PERIODS: tuple[float, ...] = tuple(3.2 * 1.45**i for i in range(6))


def _gen_frequency(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Stripe period in six geometric steps; random orientation, phase and colours."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    periods = torch.tensor(FREQUENCY_PERIODS)[labels].view(n, 1, 1, 1)
    period = periods * torch.exp(_uniform(gen, n, -0.08, 0.08)) * scale
    angle = _uniform(gen, n, 0.0, math.pi)
    return _finish(gen, _draw_grating(gen, canvas, angle, period))


SIZE_RADII: tuple[float, ...] = (2.0, 3.2, 4.8, 7.0, 10.0)


def _gen_size(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Object size in five bins; shape, rotation, position and colour vary."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    base = torch.tensor(SIZE_RADII)[labels].view(n, 1, 1, 1)
    radius = base * torch.exp(_uniform(gen, n, -0.1, 0.1)) * scale
    # Only compact shapes: a bar's length would make size ambiguous.
    kind = _randint(gen, n, 3)  # circle, square, triangle
    cx, cy = _random_centre(gen, n, size, torch.clamp(radius, max=size / 2 - 1))
    return _finish(gen, _draw_shape(gen, canvas, kind, radius, cx, cy))


# The generic pretraining task: 18 symbols and textures that are none of the eight
# tasks' classes but are made of the same parts (strokes, corners, curves, blobs,
# periodic patterns), the way CLIP's pretraining data is not the eval datasets.
_LETTER_SEGMENTS = {  # seven-segment letters, segments a..g as in _SEGMENTS
    "A": (1, 1, 1, 0, 1, 1, 1),
    "b": (0, 0, 1, 1, 1, 1, 1),
    "C": (1, 0, 0, 1, 1, 1, 0),
    "d": (0, 1, 1, 1, 1, 0, 1),
    "E": (1, 0, 0, 1, 1, 1, 1),
    "F": (1, 0, 0, 0, 1, 1, 1),
    "H": (0, 1, 1, 0, 1, 1, 1),
    "L": (0, 0, 0, 1, 1, 1, 0),
    "P": (1, 1, 0, 0, 1, 1, 1),
    "U": (0, 1, 1, 1, 1, 1, 0),
}
_LETTER_TABLE = torch.tensor(list(_LETTER_SEGMENTS.values()), dtype=torch.float32)
GENERIC_POLYGONS: tuple[str, ...] = ("hexagon", "semicircle", "tee", "corner")
GENERIC_TEXTURES: tuple[str, ...] = ("checkerboard", "plaid", "rings", "dot lattice")
GENERIC_KINDS: tuple[str, ...] = (
    *(f"letter {c}" for c in _LETTER_SEGMENTS),
    *GENERIC_POLYGONS,
    *GENERIC_TEXTURES,
)
# The coarse side (which half holds the symbol) is part of the label: without it θ0
# learns to discard position entirely, and fine-tuning cannot bring it back within
# the demo budget. CLIP's features keep coarse layout too.
GENERIC_SIDES: tuple[str, ...] = ("left", "right")
GENERIC_CLASSES: tuple[str, ...] = tuple(
    f"{kind}, {side}" for kind in GENERIC_KINDS for side in GENERIC_SIDES
)


def _box(u: Tensor, v: Tensor, cu: Tensor, cv: Tensor, hu: Tensor, hv: Tensor) -> Tensor:
    """Approximate signed distance to an axis-aligned box centred (cu, cv), half-sizes (hu, hv)."""
    return torch.maximum((u - cu).abs() - hu, (v - cv).abs() - hv)


def _polygon_mask(gen: torch.Generator, kind: Tensor, side: Tensor, size: int) -> Tensor:
    """Coverage [N, 1, H, W] of the generic polygons (index into GENERIC_POLYGONS),
    centred in the left (``side`` 0) or right (1) half."""
    n, scale = kind.shape[0], size / _REFERENCE_SIZE
    x, y = _pixel_grid(size)
    r = _uniform(gen, n, 5.0, 8.0) * scale
    _, cy = _random_centre(gen, n, size, 0.9 * r)
    cx = _centre_x_in_half(gen, side, size, 0.9 * r)
    u, v = _rotate(x - cx, y - cy, _uniform(gen, n, 0.0, 2.0 * math.pi))
    c60, s60 = 0.5, math.sqrt(3.0) / 2.0
    hexagon = (
        torch.maximum(u.abs(), torch.maximum((c60 * u + s60 * v).abs(), (c60 * u - s60 * v).abs()))
        - 0.85 * r
    )
    semicircle = torch.maximum(torch.sqrt(u * u + (v - 0.4 * r) ** 2) - 1.1 * r, v - 0.4 * r)
    zero = torch.zeros_like(r)
    tee = torch.minimum(
        _box(u, v, zero, -0.65 * r, r, 0.3 * r), _box(u, v, zero, 0.2 * r, 0.3 * r, 0.85 * r)
    )
    corner = torch.minimum(
        _box(u, v, -0.45 * r, zero, 0.3 * r, r), _box(u, v, zero, 0.7 * r, 0.75 * r, 0.3 * r)
    )
    sdf = torch.stack([hexagon, semicircle, tee, corner], dim=1)  # [N, 4, 1, H, W]
    index = kind.view(n, 1, 1, 1, 1).expand(-1, 1, *sdf.shape[2:])
    return _fill(sdf.gather(1, index).squeeze(1))


def _texture_mask(gen: torch.Generator, kind: Tensor, side: Tensor, size: int) -> Tensor:
    """Intensity [N, 1, H, W] in [0, 1] of the generic textures (index into GENERIC_TEXTURES),
    filling the left (``side`` 0) or right (1) half."""
    n, scale = kind.shape[0], size / _REFERENCE_SIZE
    x, _ = _pixel_grid(size)
    period = _uniform(gen, n, 5.0, 10.0) * scale
    pattern = _texture_pattern(gen, kind, size, period)  # draws centre, then rotation
    # Signed distance to the chosen half: negative inside it.
    half = torch.where(side.view(n, 1, 1, 1) == 0, x - size / 2, size / 2 - x)
    return pattern * _fill(half) * _uniform(gen, n, 0.5, 1.0)


def _gen_generic(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Pretraining images: a letter, polygon or texture in the left or right half.

    The label is (symbol kind in GENERIC_KINDS) × (side in GENERIC_SIDES). None of
    the kinds is a class of the eight tasks, but recognising them needs the same
    parts (strokes, corners, curvature, blobs, periodic patterns), so θ0's
    features are useful for every task without solving any: exact position,
    size, orientation, period and colour are nuisances here, left to fine-tuning.
    """
    n = labels.shape[0]
    canvas = _background(gen, n, size)
    side = labels % len(GENERIC_SIDES)
    kind = labels // len(GENERIC_SIDES)  # index into GENERIC_KINDS
    n_letters, n_polygons = len(_LETTER_SEGMENTS), len(GENERIC_POLYGONS)
    mask = torch.zeros(n, 1, size, size)
    # Draw each family on its own sub-batch (a different drawing routine per family).
    letters = (kind < n_letters).nonzero().flatten()
    polygons = ((kind >= n_letters) & (kind < n_letters + n_polygons)).nonzero().flatten()
    textures = (kind >= n_letters + n_polygons).nonzero().flatten()
    mask[letters] = _seven_segment_mask(gen, _LETTER_TABLE[kind[letters]], size, side[letters])
    mask[polygons] = _polygon_mask(gen, kind[polygons] - n_letters, side[polygons], size)
    mask[textures] = _texture_mask(
        gen, kind[textures] - n_letters - n_polygons, side[textures], size
    )
    colour = _contrasting_colour(gen, canvas.level)
    return _finish(gen, _paint(canvas.images, mask, colour))


# --------------------------------------------------------------------------- #
# The CLIP-like regime: θ0 pretrained on many attributes at once, downstream
# tasks as domain shifts of the pretraining concepts, and one real data set.
# --------------------------------------------------------------------------- #
ATTRIBUTES_TASK = "attributes"
"""The multi-attribute pretraining task of the demo's θ0 (config/config.yaml, docs/demo.md)."""

QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
ATTRIBUTE_SIZES: tuple[str, ...] = ("small", "medium", "large")
# px at 32 px, per size class: the smallest symbols span more than one 8-pixel patch
_ATTRIBUTE_RADII = ((4.5, 6.0), (6.5, 8.0), (9.0, 10.5))
DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "symbol": (*SHAPE_KINDS, *(f"digit {d}" for d in DIGIT_NAMES)),
    "hue": ("red", "orange", "yellow-green", "green", "cyan", "blue", "violet", "magenta"),
    "size": ATTRIBUTE_SIZES,
    "texture": GENERIC_TEXTURES,
    "quadrant": QUADRANTS,
}
"""What every pretraining image is labelled with at once, in mixed-radix order (the
first attribute is the most significant digit of the ``attributes`` label)."""

CLIP_TASKS: tuple[str, ...] = (
    "shapes_textured",
    "glyphs_cluttered",
    "digits",
    "hue_pastel",
    "texture_occluded",
    "quadrant_small",
)
"""The downstream tasks of the CLIP-like demo: each asks one pretraining attribute of
images drawn from a shifted domain; ``digits`` is the real UCI handwritten digits."""

# task → (attribute, first row): the task's classes are the attribute's rows
# first_row, first_row + 1, ... (its zero-shot head is those rows of θ0's head).
_ZEROSHOT_ROWS: dict[str, tuple[str, int]] = {
    "shapes_textured": ("symbol", 0),
    "glyphs_cluttered": ("symbol", len(SHAPE_KINDS)),
    "digits": ("symbol", len(SHAPE_KINDS)),
    "hue_pastel": ("hue", 0),
    "texture_occluded": ("texture", 0),
    "quadrant_small": ("quadrant", 0),
}


def attribute_class_counts() -> list[int]:
    """Class count of each attribute of :data:`ATTRIBUTES`, in order."""
    return [len(names) for names in ATTRIBUTES.values()]


def decode_attributes(labels: Tensor, class_counts: list[int]) -> Tensor:
    """Mixed-radix labels [N] → one class index per attribute, [N, A] int64.

    The first attribute is the most significant digit: with counts (c0, c1, ...),
    label = ((a0 · c1 + a1) · c2 + a2) · ...
    """
    digits = []
    rest = labels
    for count in reversed(class_counts):
        digits.append(rest % count)
        rest = rest // count
    return torch.stack(digits[::-1], dim=1)


def zeroshot_rows(task: str) -> tuple[int, list[int]]:
    """(attribute index in :data:`ATTRIBUTES`, rows of that attribute's head) of a CLIP task.

    Row i of the returned list is the pretraining class that the task's class i is.

    Raises:
        ValueError: ``task`` is not one of :data:`CLIP_TASKS`.
    """
    if task not in _ZEROSHOT_ROWS:
        raise ValueError(
            f"task {task!r} has no zero-shot head rows; the tasks of the multi-attribute "
            f"pretraining are {', '.join(CLIP_TASKS)}"
        )
    attribute, first = _ZEROSHOT_ROWS[task]
    rows = list(range(first, first + num_classes(task)))
    return list(ATTRIBUTES).index(attribute), rows


def _hue_colour(
    gen: torch.Generator,
    hue_bin: Tensor,
    s_range: tuple[float, float],
    v_range: tuple[float, float],
) -> Tensor:
    """RGB [N, 3] of hue bin ``hue_bin`` [N] (jittered inside its bin); saturation and
    value uniform in ``s_range`` and ``v_range``."""
    n = hue_bin.shape[0]
    hue = (hue_bin.float() + 0.6 * (torch.rand(n, generator=gen) - 0.5)) / HUE_STEPS % 1.0
    saturation = s_range[0] + (s_range[1] - s_range[0]) * torch.rand(n, generator=gen)
    value = v_range[0] + (v_range[1] - v_range[0]) * torch.rand(n, generator=gen)
    return _hsv_to_rgb(hue, saturation, value)


def _texture_pattern(gen: torch.Generator, kind: Tensor, size: int, period: Tensor) -> Tensor:
    """Intensity [N, 1, H, W] in [0, 1] of textures ``kind`` [N] (index into GENERIC_TEXTURES)
    over the whole image, ``period`` [N, 1, 1, 1] in px, random offset and rotation."""
    n = kind.shape[0]
    x, y = _pixel_grid(size)
    cx, cy = _random_centre(gen, n, size, 0.0)
    u, v = _rotate(x - cx, y - cy, _uniform(gen, n, 0.0, 0.5 * math.pi))
    wave_u, wave_v = torch.sin(2.0 * math.pi * u / period), torch.sin(2.0 * math.pi * v / period)
    checkerboard = 0.5 + 0.5 * torch.tanh(3.0 * wave_u * wave_v)
    plaid = 0.25 * (2.0 + wave_u + wave_v)
    rings = 0.5 + 0.5 * torch.sin(2.0 * math.pi * torch.sqrt(u * u + v * v) / period)
    lattice_u = torch.remainder(u, period) - 0.5 * period
    lattice_v = torch.remainder(v, period) - 0.5 * period
    dots = _fill(torch.sqrt(lattice_u**2 + lattice_v**2) - 0.28 * period)
    masks = torch.stack([checkerboard, plaid, rings, dots], dim=1)  # [N, 4, 1, H, W]
    index = kind.view(n, 1, 1, 1, 1).expand(-1, 1, *masks.shape[2:])
    return masks.gather(1, index).squeeze(1)


def _textured_background(
    gen: torch.Generator,
    n: int,
    size: int,
    kind: Tensor,
    period: Tensor,
    contrast: tuple[float, float],
) -> _Canvas:
    """A tinted background with a texture of ``kind`` [N] painted over it in a contrasting
    colour at a contrast uniform in ``contrast``."""
    canvas = _background(gen, n, size)
    pattern = _texture_pattern(gen, kind, size, period) * _uniform(gen, n, *contrast)
    colour = _contrasting_colour(gen, canvas.level, min_contrast=0.3)
    return _Canvas(images=_paint(canvas.images, pattern, colour), level=canvas.level)


def _symbol_mask(
    gen: torch.Generator, symbol: Tensor, radius: Tensor, cx: Tensor, cy: Tensor, size: int
) -> Tensor:
    """Coverage [N, 1, H, W] of symbols [N] (index into ATTRIBUTES["symbol"]: shapes, then
    seven-segment digits) of half-extent ``radius`` [N, 1, 1, 1] px centred at (cx, cy)."""
    n = symbol.shape[0]
    x, y = _pixel_grid(size)
    n_shapes = len(SHAPE_KINDS)
    angle = _uniform(gen, n, 0.0, 2.0 * math.pi)
    shape = _fill(_shape_sdf(symbol.clamp(max=n_shapes - 1), x - cx, y - cy, radius, angle))
    # A glyph is 2 units tall: a unit of 0.9 radius gives it the shapes' height.
    lit = _DIGIT_SEGMENTS[(symbol - n_shapes).clamp(min=0)]
    stroke = radius * _uniform(gen, n, 0.13, 0.2)
    glyph = _glyph_coverage(lit, cx, cy, 0.9 * radius, stroke, _uniform(gen, n, -0.2, 0.2), size)
    is_shape = (symbol < n_shapes).view(n, 1, 1, 1)
    return torch.where(is_shape, shape, glyph)


def _quadrant_centre(gen: torch.Generator, quadrant: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Centres [N, 1, 1, 1] inside quadrant ``quadrant`` [N] (index into QUADRANTS),
    between 25 % and 75 % of the quadrant's side, so the quadrant is unambiguous."""
    n, half = quadrant.shape[0], size / 2
    row = (quadrant // 2).float().view(n, 1, 1, 1)
    col = (quadrant % 2).float().view(n, 1, 1, 1)
    return (col + _uniform(gen, n, 0.25, 0.75)) * half, (row + _uniform(gen, n, 0.25, 0.75)) * half


def _blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur of images [N, C, H, W] with per-image std ``sigma`` [N] in px (5×5 kernel)."""
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).clamp(min=1e-3)) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # [N, 5]
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    # Separable: rows, then columns, each as a weighted sum of five shifted copies.
    rows = sum(weights[:, i].view(n, 1, 1, 1) * padded[:, :, :, i : i + w] for i in range(5))
    return sum(weights[:, i].view(n, 1, 1, 1) * rows[:, :, i : i + h, :] for i in range(5))


def _gen_attributes(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Pretraining images labelled with every attribute at once (mixed-radix ``labels``):
    a symbol of one size class and hue bin, centred in one quadrant, over a textured background."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    attrs = decode_attributes(labels, attribute_class_counts())  # [N, 5]
    symbol, hue, size_class, texture, quadrant = attrs.unbind(dim=1)
    canvas = _textured_background(
        gen, n, size, texture, _uniform(gen, n, 5.0, 9.0) * scale, contrast=(0.35, 0.7)
    )
    bounds = torch.tensor(_ATTRIBUTE_RADII)[size_class]  # [N, 2]
    radius = bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * torch.rand(n, generator=gen)
    radius = radius.view(n, 1, 1, 1) * scale
    cx, cy = _quadrant_centre(gen, quadrant, size)
    mask = _symbol_mask(gen, symbol, radius, cx, cy, size)
    colour = _hue_colour(gen, hue, (0.6, 1.0), (0.45, 1.0))
    return _finish(gen, _paint(canvas.images, mask, colour))


def _gen_shapes_textured(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Which of six shapes, the shape filled with fine stripes instead of a flat colour."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _textured_background(
        gen,
        n,
        size,
        _randint(gen, n, len(GENERIC_TEXTURES)),
        _uniform(gen, n, 4.0, 10.0) * scale,
        (0.1, 0.3),
    )
    radius = _uniform(gen, n, 7.0, 10.0) * scale
    cx, cy = _random_centre(gen, n, size, 0.8 * radius)
    mask = _symbol_mask(gen, labels, radius, cx, cy, size)
    angle, period = _uniform(gen, n, 0.0, math.pi), _uniform(gen, n, 3.0, 5.0) * scale
    stripes = _grating(gen, n, size, angle, period)
    colour = _contrasting_colour(gen, canvas.level)
    return _finish(gen, _paint(canvas.images, mask * (0.7 + 0.3 * stripes), colour))


def _gen_glyphs_cluttered(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Seven-segment digits beside a random distractor stroke, slightly blurred."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    x, y = _pixel_grid(size)
    clutter = torch.zeros(n, 1, size, size)
    # A short stroke: a box of random orientation, length and place.
    cx, cy = _random_centre(gen, n, size, 0.0)
    u, v = _rotate(x - cx, y - cy, _uniform(gen, n, 0.0, math.pi))
    length, width = _uniform(gen, n, 2.0, 6.0) * scale, _uniform(gen, n, 0.5, 1.2) * scale
    clutter = torch.maximum(clutter, _fill(torch.maximum(u.abs() - length, v.abs() - width)))
    clutter_colour = _contrasting_colour(gen, canvas.level, min_contrast=0.25)
    images = _paint(canvas.images, clutter, clutter_colour)
    radius = _uniform(gen, n, 8.0, 10.0) * scale
    cx, cy = _random_centre(gen, n, size, 0.6 * radius + 1.0)
    mask = _symbol_mask(gen, labels + len(SHAPE_KINDS), radius, cx, cy, size)
    images = _paint(images, mask, _contrasting_colour(gen, canvas.level))
    return _finish(gen, _blur(images, _uniform(gen, n, 0.1, 0.4).flatten()))


DIGITS_TEST_SOURCES = 720
"""Real digit images (of 1,797) whose renderings make the ``digits`` test split; the other
1,077 make the train split, so no test image is a rendering of a training digit."""


@functools.cache
def _digit_pools() -> dict[str, tuple[Tensor, Tensor]]:
    """split → (images [M, 8, 8] float in [0, 1], labels [M]) of the real digits in that pool."""
    from pipeline.data.digits import load_digits

    images, labels = load_digits()
    pool_gen = torch.Generator().manual_seed(split_seed("digits", "pools", 0))
    order = torch.randperm(len(labels), generator=pool_gen)
    pools = {"test": order[:DIGITS_TEST_SOURCES], "train": order[DIGITS_TEST_SOURCES:]}
    return {split: (images[idx].float() / 16.0, labels[idx]) for split, idx in pools.items()}


def _gen_digits(gen: torch.Generator, labels: Tensor, size: int, split: str) -> Tensor:
    """Real handwritten digits (UCI, 8×8) of class ``labels``, drawn from the split's pool of
    source images, scaled to 26–30 px, centred (±1 px) and drawn in dark ink on light paper."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    pool_images, pool_labels = _digit_pools()[split]
    source = torch.empty(n, dtype=torch.int64)
    for digit in range(10):
        chosen = (labels == digit).nonzero().flatten()
        candidates = (pool_labels == digit).nonzero().flatten()
        pick = torch.randint(0, len(candidates), (len(chosen),), generator=gen)
        source[chosen] = candidates[pick]
    canvas = _background(gen, n, size)
    paper = 0.75 + 0.2 * torch.rand(n, generator=gen)  # the background's tint and ramp kept
    images = canvas.images - canvas.level.view(n, 1, 1, 1) + paper.view(n, 1, 1, 1)
    # Sample the 8×8 glyph bilinearly at each pixel: glyph coordinates from the pixel grid.
    x, y = _pixel_grid(size)
    side = _uniform(gen, n, 26.0, 30.0) * scale
    cx = size / 2 + _uniform(gen, n, -1.0, 1.0) * scale
    cy = size / 2 + _uniform(gen, n, -1.0, 1.0) * scale
    gx = ((x - cx) / side * 2.0).expand(n, 1, size, size)  # in [-1, 1] over the glyph
    gy = ((y - cy) / side * 2.0).expand(n, 1, size, size)
    grid = torch.stack([gx, gy], dim=-1).squeeze(1)  # [N, H, W, 2]
    glyph = torch.nn.functional.grid_sample(
        pool_images[source].unsqueeze(1),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N, 1, H, W]
    ink = (0.3 * torch.rand(n, 1, generator=gen)).expand(n, 3)  # grey, near black
    return _finish(gen, _paint(images, glyph.clamp(0.0, 1.0), ink))


def _gen_hue_pastel(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Hue bin of a symbol in a shifted palette: pale, desaturated colours on dark grounds."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    level = 0.1 + 0.25 * torch.rand(n, generator=gen)
    images = canvas.images - canvas.level.view(n, 1, 1, 1) + level.view(n, 1, 1, 1)
    radius = _uniform(gen, n, 4.0, 9.0) * scale
    cx, cy = _random_centre(gen, n, size, 0.8 * radius)
    mask = _symbol_mask(gen, _randint(gen, n, len(ATTRIBUTES["symbol"])), radius, cx, cy, size)
    colour = _hue_colour(gen, labels, (0.3, 0.5), (0.75, 1.0))
    return _finish(gen, _paint(images, mask, colour))


def _gen_texture_occluded(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Texture kind at a finer scale than in pretraining, half hidden by a large object."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    period = _uniform(gen, n, 4.0, 6.0) * scale
    canvas = _textured_background(gen, n, size, labels, period, (0.5, 0.9))
    radius = _uniform(gen, n, 7.0, 10.0) * scale
    cx, cy = _random_centre(gen, n, size, 0.5 * radius)
    mask = _symbol_mask(gen, _randint(gen, n, len(SHAPE_KINDS)), radius, cx, cy, size)
    return _finish(gen, _paint(canvas.images, mask, _contrasting_colour(gen, canvas.level)))


def _gen_quadrant_small(gen: torch.Generator, labels: Tensor, size: int) -> Tensor:
    """Quadrant of a symbol far smaller than any in pretraining, on a plain background."""
    n, scale = labels.shape[0], size / _REFERENCE_SIZE
    canvas = _background(gen, n, size)
    radius = _uniform(gen, n, 1.5, 2.5) * scale
    cx, cy = _quadrant_centre(gen, labels, size)
    mask = _symbol_mask(gen, _randint(gen, n, len(ATTRIBUTES["symbol"])), radius, cx, cy, size)
    return _finish(gen, _paint(canvas.images, mask, _contrasting_colour(gen, canvas.level)))


def _attribute_labels(gen: torch.Generator, n: int) -> Tensor:
    """Mixed-radix labels [n] whose every attribute is balanced on its own (counts differ by
    at most one) and drawn independently of the others: the 6,144 combinations are far more
    than a training set holds, so balancing combinations would leave attributes unbalanced."""
    labels = torch.zeros(n, dtype=torch.int64)
    for count in attribute_class_counts():
        labels = labels * count + _balanced_labels(gen, n, count)
    return labels


def _attribute_class_names() -> tuple[str, ...]:
    """Names of the mixed-radix pretraining classes in label order, e.g.
    "circle, red, small, checkerboard, top-left"."""
    names: list[str] = [""]
    for values in ATTRIBUTES.values():
        names = [f"{prefix}, {v}" if prefix else v for prefix in names for v in values]
    return tuple(names)


@dataclass(frozen=True)
class _TaskSpec:
    classes: tuple[str, ...]
    generate: Callable[..., Tensor]  # (generator, labels [N], image_size[, split]) → images
    uses_split: bool = False  # the generator draws from a per-split pool of real images


_SPECS: dict[str, _TaskSpec] = {
    "shapes": _TaskSpec(SHAPE_KINDS, _gen_shapes),
    "orientation": _TaskSpec(
        tuple(f"{180 * i / ORIENTATION_STEPS:g} deg" for i in range(ORIENTATION_STEPS)),
        _gen_orientation,
    ),
    "colour": _TaskSpec(
        ("red", "orange", "yellow-green", "green", "cyan", "blue", "violet", "magenta"),
        _gen_colour,
    ),
    "glyphs": _TaskSpec(tuple(str(d) for d in range(10)), _gen_glyphs),
    "counting": _TaskSpec(tuple(str(c) for c in range(1, MAX_COUNT + 1)), _gen_counting),
    "position": _TaskSpec(
        tuple(f"{row}-{col}" for row in ("top", "bottom") for col in ("left", "right")),
        _gen_position,
    ),
    "frequency": _TaskSpec(tuple(f"period {p:.1f}px" for p in FREQUENCY_PERIODS), _gen_frequency),
    "size": _TaskSpec(tuple(f"radius {r:g}px" for r in SIZE_RADII), _gen_size),
    PRETRAIN_TASK: _TaskSpec(GENERIC_CLASSES, _gen_generic),
    "shapes_textured": _TaskSpec(SHAPE_KINDS, _gen_shapes_textured),
    "glyphs_cluttered": _TaskSpec(DIGIT_NAMES, _gen_glyphs_cluttered),
    "digits": _TaskSpec(DIGIT_NAMES, _gen_digits, uses_split=True),
    "hue_pastel": _TaskSpec(ATTRIBUTES["hue"], _gen_hue_pastel),
    "texture_occluded": _TaskSpec(GENERIC_TEXTURES, _gen_texture_occluded),
    "quadrant_small": _TaskSpec(QUADRANTS, _gen_quadrant_small),
    ATTRIBUTES_TASK: _TaskSpec(_attribute_class_names(), _gen_attributes),
}


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def _spec(task: str) -> _TaskSpec:
    """The task's spec, or a ValueError that lists the known tasks."""
    try:
        return _SPECS[task]
    except KeyError:
        known = ", ".join([*TASKS, PRETRAIN_TASK, *CLIP_TASKS, ATTRIBUTES_TASK])
        raise ValueError(f"unknown demo task {task!r}; known tasks are: {known}") from None


def num_classes(task: str) -> int:
    """Number of classes of ``task`` (one of :data:`TASKS` or :data:`PRETRAIN_TASK`)."""
    return len(_spec(task).classes)


def class_names(task: str) -> list[str]:
    """Human-readable class names of ``task``, index i naming label i."""
    return list(_spec(task).classes)


def split_seed(task: str, split: str, seed: int) -> int:
    """A 63-bit generator seed from (task, split, seed), stable across processes.

    Python's ``hash`` is salted per process, so a cryptographic digest is used instead.
    """
    digest = hashlib.sha256(f"epimer-demo/{task}/{split}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def standardize_images(images: Tensor, eps: float = 1e-3) -> Tensor:
    """Per-image standardisation: zero mean and unit std over each image's pixels and channels.

    ``images`` is [N, C, H, W]. Removing each image's overall brightness and contrast
    (the strongest nuisance of the generated images: random background level,
    random foreground colour) is what lets the tiny demo ViT start learning shapes
    within its CPU budget; on raw [0, 1] images it sits on a loss plateau for
    hundreds of steps. Colour differences within an image are kept.
    """
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True)
    return (images - mean) / (std + eps)


def make_split(
    task: str,
    split: str,
    n: int,
    seed: int = 0,
    image_size: int = 32,
    *,
    standardize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Generate ``n`` labelled images of a demo task.

    Args:
        task: one of :data:`TASKS` or :data:`PRETRAIN_TASK`.
        split: ``"train"`` or ``"test"``; different splits are different samples.
        n: number of images; classes are balanced (counts differ by at most one).
        seed: together with task and split, fixes every random choice.
        image_size: side length H = W in pixels (geometry scales with it).
        standardize: apply :func:`standardize_images` (what the demo models are
            trained and evaluated on); False gives the raw rendering, for viewing.

    Returns:
        images: [n, 3, H, W] float32; each image has mean 0 and std 1 if
            ``standardize``, else values in [0, 1].
        labels: [n] int64 in [0, num_classes(task)).

    Raises:
        ValueError: unknown task or split, negative ``n``, or ``image_size`` < 8.
    """
    spec = _spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for demo task {task!r}; use one of {SPLITS}")
    if n < 0:
        raise ValueError(f"number of images must be >= 0, got n={n} for demo task {task!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    gen = torch.Generator().manual_seed(split_seed(task, split, seed))
    if task == ATTRIBUTES_TASK:
        labels = _attribute_labels(gen, n)
    else:
        labels = _balanced_labels(gen, n, len(spec.classes))
    if n == 0:
        return torch.zeros(0, 3, image_size, image_size), labels
    # Draw in fixed-size chunks: the per-pixel temporaries ([chunk, 7, H, W] for the
    # glyphs) then stay in cache, which is several times faster than one big batch.
    # The chunk size is a constant, so the random stream and the images depend on
    # (task, split, seed, n, image_size) only.
    generate = functools.partial(spec.generate, split=split) if spec.uses_split else spec.generate
    images = torch.cat(
        [generate(gen, labels[start : start + _CHUNK], image_size) for start in range(0, n, _CHUNK)]
    )
    images = images.to(torch.float32)
    return (standardize_images(images) if standardize else images), labels
