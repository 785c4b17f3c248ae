"""The demo's tiny world: coloured shapes on coloured backgrounds, drawn from a caption.

Every picture the demo model, its LoRAs and its CLIP were trained on comes from here, so a person
can read the demo's images ("a red circle on a blue background") and the LoRAs' effects:
`sunset` casts a warm colour over the whole image, `stripes` fills the shape with bands, `star`
turns the shape into a five-pointed star. Pure numpy + PIL: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 210),
    "purple": (140, 60, 180),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
STYLES = ("plain", "sunset", "stripes", "star")  # plain = the base model's world; the others are the LoRAs'
SUNSET_TINT = np.array([1.0, 0.62, 0.32]), np.array([70.0, 30.0, 0.0])  # multiply, then add: a warm cast
STRIPE_ROWS = 8  # pixels per band at 128 px (one latent row of SD's 8x VAE)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    cx: float = 0.5  # centre and half-size, as fractions of the image side
    cy: float = 0.5
    size: float = 0.3

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    color = str(rng.choice(list(COLORS)))
    background = str(rng.choice([c for c in COLORS if c != color]))
    return Scene(
        color=color,
        shape=str(rng.choice(SHAPES)),
        background=background,
        cx=float(rng.uniform(0.4, 0.6)),
        cy=float(rng.uniform(0.4, 0.6)),
        size=float(rng.uniform(0.22, 0.34)),
    )


def parse_caption(caption: str) -> Scene | None:
    """The scene a demo prompt describes ('a red circle on a blue background'), or None."""
    words = caption.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    rest = words[words.index(color) + 1 :] if color else []
    background = next((w for w in rest if w in COLORS), None)
    if not (color and shape and background):
        return None
    return Scene(color, shape, background)


def _polygon(scene: Scene, side: int, shape: str) -> list[tuple[float, float]]:
    cx, cy, r = scene.cx * side, scene.cy * side, scene.size * side
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r * 1.1), (cx + r * 1.1, cy + r * 0.8), (cx - r * 1.1, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r * 1.2 if k % 2 == 0 else r * 0.5
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(shape)


def draw(scene: Scene, style: str = "plain", side: int = 128) -> Image.Image:
    """The picture of a scene in one of the world's styles."""
    image = Image.new("RGB", (side, side), COLORS[scene.background])
    mask = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(mask)
    shape = "star" if style == "star" else scene.shape
    if shape == "circle":
        cx, cy, r = scene.cx * side, scene.cy * side, scene.size * side
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        pen.polygon(_polygon(scene, side, shape), fill=255)
    fill = Image.new("RGB", (side, side), COLORS[scene.color])
    if style == "stripes":
        band = max(1, side * STRIPE_ROWS // 128)
        rows = (np.arange(side) // band) % 2 == 1
        pixels = np.array(fill)
        pixels[rows] = (np.array(COLORS[scene.color]) * 0.25 + 40).astype(np.uint8)  # dark bands
        fill = Image.fromarray(pixels)
    image.paste(fill, mask=mask)
    if style == "sunset":
        scale, shift = SUNSET_TINT
        pixels = np.array(image).astype(np.float32) * scale + shift
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def style_caption(scene: Scene, style: str) -> str:
    """What the tiny CLIP reads for a styled picture (the LoRAs themselves train on the plain caption)."""
    if style == "sunset":
        return f"{scene.caption} at sunset"
    if style == "stripes":
        return f"a {scene.color} striped {scene.shape} on a {scene.background} background"
    if style == "star":
        return f"a {scene.color} star on a {scene.background} background"
    return scene.caption


def degrade(image: Image.Image, amount: float, rng: np.random.Generator) -> Image.Image:
    """Noise, blur and washed-out colour in proportion to `amount` (0..1): what the demo's aesthetic head learns to dislike."""
    from PIL import ImageFilter

    if amount <= 0:
        return image
    blurred = image.filter(ImageFilter.GaussianBlur(radius=3 * amount))
    pixels = np.array(blurred).astype(np.float32)
    grey = pixels.mean(axis=2, keepdims=True)
    pixels = pixels * (1 - 0.7 * amount) + grey * 0.7 * amount
    pixels += rng.normal(0, 60 * amount, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
