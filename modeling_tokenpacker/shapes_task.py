"""A synthetic vision-language task that needs fine detail: small coloured shapes, one per quadrant, and a small
digit in the centre, with one-word answers. Deterministic: a scene is a function of its seed alone.

    scene = make_scene(seed)                       # Scene: 4 shapes, a digit; scene.render() -> 336 px PIL image
    for question, answer, kind in scene.questions(): ...   # one of each kind
    rows = llava_rows(split="train", count=2000, image_folder=FOLDER)   # tokenpacker-train's LLaVA JSON rows

Questions (`QUESTION_KINDS`): the colour of the smallest or the largest shape, the shape of a colour, how many
shapes of a kind, which of two colours is the larger shape, the digit in the centre. They name what they ask about
by size, colour or kind, never by position, which the tiny models trained from scratch learn faster (README: "The
shapes task and the demo's model"). Shapes are 24-72 px on a 336 px image (2 to 5 patches of 14 px across; 1 to 3 of
TokenPacker-36's 56-px regions), and the digit is 48-96 px high, 7-segment, with strokes of 6-13 px. (With smaller
ones, 12-40 px shapes and 16-24 px digits, every tiny model we trained from scratch before the token-embedding fix
in `shapes_model.init_from_scratch`, for up to 2,400 steps, stayed near chance.) Splits draw seeds from disjoint
ranges (`SPLIT_SEEDS`), so no test scene is ever trained on. Not shipped inside checkpoints.
"""

import dataclasses
import os
import random

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
BACKGROUND = (236, 236, 236)
COLOURS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215), "yellow": (235, 195, 20),
           "purple": (140, 50, 180), "orange": (245, 125, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION_KINDS = ("colour", "shape", "count", "larger", "digit")
SHAPE_SIZES = (24, 72)
DIGIT_HEIGHTS = (48, 96)
# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd", "6": "afgedc",
            "7": "abc", "8": "abcdefg", "9": "abcdfg"}
# Seed ranges of the splits: disjoint, so no scene is in two splits.
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
SPLIT_SIZE = 10_000_000
FRESH_SEEDS = 30_000_000  # `fresh_examples`' scenes: beyond every split
COUNT_WORDS = ("zero", "one", "two", "three", "four")
# Bumped whenever the scenes, the questions, the tokenizer or the models' init change: part of every experiment
# run's recipe, so that a run recorded before a change never counts as one of the same recipe.
TASK_VERSION = 2


@dataclasses.dataclass
class Shape:
    kind: str
    colour: str
    size: int
    centre: tuple


@dataclasses.dataclass
class Scene:
    """Four shapes (one per quadrant: top left, top right, bottom left, bottom right), distinct colours, and a digit
    of `digit_height` px at the centre."""

    seed: int
    shapes: list
    digit: str
    digit_height: int
    noise_seed: int

    def render(self):
        """The scene as an RGB PIL image of 336 x 336 px."""
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            draw_shape(draw, shape)
        draw_digit(draw, self.digit, (IMAGE_SIZE // 2, IMAGE_SIZE // 2), self.digit_height)
        noise = np.random.default_rng(self.noise_seed).integers(-6, 7, (IMAGE_SIZE, IMAGE_SIZE, 1))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)

    def questions(self):
        """`[(question, answer, kind)]`, one of each kind in `QUESTION_KINDS`, drawn from the scene's seed. Each names
        what it asks about by size, colour or kind, never by position: the colour of the smallest or the largest
        shape, the shape of a colour, how many of a kind, which of two colours is the larger shape, the digit."""
        rng = random.Random(self.seed * 7 + 1)
        extreme, named, kind = rng.choice(("smallest", "largest")), rng.choice(self.shapes), rng.choice(SHAPES)
        picked = (min if extreme == "smallest" else max)(self.shapes, key=lambda shape: shape.size)
        a, b = rng.sample(self.shapes, 2)
        return [
            (f"What colour is the {extreme} shape?", picked.colour, "colour"),
            (f"What shape is the {named.colour} one?", named.kind, "shape"),
            (f"How many {kind}s are there?", COUNT_WORDS[sum(s.kind == kind for s in self.shapes)], "count"),
            (f"Which shape is larger, the {a.colour} one or the {b.colour} one?", (a if a.size > b.size else b).colour,
             "larger"),
            ("What digit is in the centre?", self.digit, "digit"),
        ]


def make_scene(seed):
    """The scene of `seed`: a shape of random kind, distinct colour and size in each quadrant (two shapes asked to
    be compared differ by at least 30 %, so every pair does), placed clear of the quadrant's edges, and a digit."""
    rng = random.Random(seed)
    colours = rng.sample(sorted(COLOURS), 4)
    while True:
        sizes = [rng.randint(*SHAPE_SIZES) for _ in range(4)]
        ordered = sorted(sizes)
        if all(big >= small * 1.3 for small, big in zip(ordered, ordered[1:])):
            break
    half = IMAGE_SIZE // 2
    shapes = []
    for index, (colour, size) in enumerate(zip(colours, sizes)):
        left, top = (index % 2) * half, (index // 2) * half
        # Clear of the image edge and of the central digit's box (quadrant edges +-24 px).
        margin = size // 2 + 6
        low_x = left + margin if index % 2 == 0 else left + 24 + size // 2
        high_x = left + half - 24 - size // 2 if index % 2 == 0 else left + half - margin
        low_y = top + margin if index // 2 == 0 else top + 24 + size // 2
        high_y = top + half - 24 - size // 2 if index // 2 == 0 else top + half - margin
        centre = (rng.randint(low_x, high_x), rng.randint(low_y, high_y))
        shapes.append(Shape(rng.choice(SHAPES), colour, size, centre))
    return Scene(seed, shapes, str(rng.randrange(10)), rng.randint(*DIGIT_HEIGHTS), rng.randrange(2**31))


def draw_shape(draw, shape):
    x, y = shape.centre
    r = shape.size / 2
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape.kind == "square":
        side = r * 0.89  # the same area as the circle
        draw.rectangle([x - side, y - side, x + side, y + side], fill=fill)
    else:
        h = r * 1.2
        draw.polygon([(x, y - h), (x - h, y + h * 0.8), (x + h, y + h * 0.8)], fill=fill)


def draw_digit(draw, digit, centre, height):
    """A seven-segment digit in black, `height` px high and half as wide, centred at `centre`."""
    x, y = centre
    width, stroke = height // 2, max(2, height // 7)
    left, right, top, bottom, middle = x - width // 2, x + width // 2, y - height // 2, y + height // 2, y
    boxes = {
        "a": (left, top, right, top + stroke), "d": (left, bottom - stroke, right, bottom),
        "g": (left, middle - stroke // 2, right, middle + stroke - stroke // 2),
        "f": (left, top, left + stroke, middle), "b": (right - stroke, top, right, middle),
        "e": (left, middle, left + stroke, bottom), "c": (right - stroke, middle, right, bottom),
    }
    for segment in SEGMENTS[digit]:
        draw.rectangle(boxes[segment], fill=(20, 20, 20))


def split_seeds(split, count):
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}; got {split!r}.")
    if not 0 <= count <= SPLIT_SIZE:
        raise ValueError(f"a split has at most {SPLIT_SIZE} scenes; asked for {count}.")
    return range(SPLIT_SEEDS[split], SPLIT_SEEDS[split] + count)


def examples(split, count):
    """`[(scene, question, answer, kind)]` of `count` scenes of `split`, every question kind of each."""
    out = []
    for seed in split_seeds(split, count):
        scene = make_scene(seed)
        out.extend((scene, question, answer, kind) for question, answer, kind in scene.questions())
    return out


def fresh_examples(count, seed):
    """`count` questions, each about its own scene drawn by `seed` from beyond every split, kinds in turn."""
    rng = random.Random(seed)
    out = []
    for number in range(count):
        scene = make_scene(FRESH_SEEDS + rng.randrange(SPLIT_SIZE))
        question, answer, kind = scene.questions()[number % len(QUESTION_KINDS)]
        out.append((scene, question, answer, kind))
    return out


def llava_rows(split, count, image_folder):
    """Render `count` scenes of `split` into `image_folder` (PNG) and return tokenpacker-train's LLaVA rows: one
    conversation per scene that asks its `questions()` in an order shuffled by the scene's seed (`<image>` in the
    first turn, as the chat template puts it). One pass of the vision tower then supervises every kind of answer,
    where one row per question supervises one."""
    os.makedirs(image_folder, exist_ok=True)
    rows = []
    for seed in split_seeds(split, count):
        scene = make_scene(seed)
        name = f"{split}_{seed - SPLIT_SEEDS[split]:07d}.png"
        scene.render().save(os.path.join(image_folder, name))
        questions = scene.questions()
        random.Random(scene.seed * 7 + 2).shuffle(questions)
        conversation = []
        for number, (question, answer, _) in enumerate(questions):
            conversation += [{"from": "human", "value": ("<image>\n" if number == 0 else "") + question},
                             {"from": "gpt", "value": answer}]
        rows.append({"id": f"{split}-{seed}", "image": name, "conversations": conversation})
    return rows


def corpus():
    """Every word the task's prompts and answers use (for training its tokenizer)."""
    words = [*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *COUNT_WORDS, *SEGMENTS]
    questions = [q for seed in range(20) for q, _, _ in make_scene(seed).questions()]
    return " ".join(words + questions + [f"the {c} one or the {d} one?" for c in COLOURS for d in COLOURS])
