"""Data: CLIP image preprocessing, the built-in synthetic "shapes" dataset, caption and VQA datasets
read from files, and batching.

    image (PIL, any mode) --clip_preprocess--> pixels (3, S, S), CLIP mean/std
    caption (str) --tokenizer--> ids + [eos], right-padded --collate--> input_ids (B, T), text_mask (B, T)

Every dataset here is map-style (`len` + `__getitem__`), so a `DistributedSampler` shards it, and
yields dicts {"image": PIL image or pixels (3, S, S), "caption": str, "skipped": [paths]}. "caption"
is the text the model learns to write after the image: a caption, or a "Q: ... A: ..." pair.

A missing or corrupt image never ends an epoch quietly: the dataset logs its path, moves on to the
next record, and reports the path in the item's "skipped" list (collate gathers these into the batch,
so train.py counts them even when DataLoader workers did the reading). With strict=True it raises
ImageError naming the file instead.
"""
import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

logger = logging.getLogger("magma.data")

# ----------------------------------------------------------------------------------------------------
# CLIP preprocessing (Radford et al., 2021): resize the shorter side with bicubic filtering, crop the
# centre square, scale to [0, 1], normalise with the mean/std of CLIP's training images. The geometry
# follows torchvision's Resize(size, BICUBIC) + CenterCrop(size) on PIL images, which is what CLIP's
# own `preprocess` runs, so that public CLIP weights see exactly the inputs they were trained on (for
# RGB and greyscale images; other modes are converted to RGB first, transparency over white, where
# CLIP converts after cropping).

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image):
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparent images (RGBA, LA, PA, P with transparency) are composited over white, since the colour
    hidden under a transparent pixel is arbitrary. 16-bit integer images are rescaled to 8 bits (a
    value v becomes round(v / 257)) instead of being clipped at 255 as PIL's own convert would; 32-bit
    "I" images are read the same way, as 16-bit data (values above 65535 saturate), and taken as 8-bit
    when all their values fit in 8 bits. Float ("F") images
    are taken as [0, 1] when their maximum is at most 1, else as [0, 255].
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        a = np.asarray(image, dtype=np.float64)  # "I;16*" and "I" and "F" all read as one channel
        if mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 65535 -> 255
        gray = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = (image.convert("LA") if mode == "La" else image).convert("RGBA")  # La: Pillow needs a hop
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    try:
        return image.convert("RGB")  # "1", "L", "CMYK", "YCbCr", ... : PIL's own conversion
    except ValueError:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB") from None


def resized_size(width, height, size):
    """torchvision's rule for Resize(int): the shorter side becomes `size`, the longer keeps the ratio
    (truncated toward zero). Returns (new_width, new_height)."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def clip_preprocess(image, size):
    """A PIL image of any mode -> float32 tensor (3, size, size): CLIP's resize, crop and normalisation."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"clip_preprocess expects a PIL image, got {type(image).__name__}")
    image = to_rgb(image)
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"clip_preprocess: image has zero size {image.size}")
    new_w, new_h = resized_size(w, h, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)  # (S, S, 3)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, S, S)


def unnormalize(pixels):
    """Inverse of the normalisation: pixels (..., 3, S, S) -> values in [0, 1], for drawing."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels * std + mean).clamp(0, 1)


class ImageError(Exception):
    """An image file that could not be read; the message names the file."""


def load_image(path):
    """Open and fully decode an image file (any mode), raising ImageError that names the file."""
    if os.path.isdir(path):
        raise ImageError(f"image {path} is a folder, not an image file")
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside a batch
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# The built-in synthetic dataset: one or two shapes on a dark background, each described by size,
# colour, shape and position, with a template caption and question-answer pairs. Every scene is a pure
# function of (seed, split, index), so runs repeat exactly and DDP ranks agree. Train and validation
# never share a scene description: a description goes to validation when its hash says so, so the
# held-out captions describe whole scenes never seen in training (each object in them does occur in
# training scenes: what is new is the combination).

SIZES = {"small": 0.13, "large": 0.21}  # radius as a fraction of the image side
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {  # name -> centre as fractions of (width, height); listed in reading order
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
ATTRIBUTES = ("size", "colour", "shape", "position")
NUMBERS = {1: "one", 2: "two"}


@dataclass(frozen=True)
class ShapeObject:
    size: str
    colour: str
    shape: str
    position: str


def describe(obj):
    """"a small red circle in the top left"."""
    return f"a {obj.size} {obj.colour} {obj.shape} in the {obj.position}"


def scene_caption(scene):
    """The caption of a scene (a tuple of objects in reading order)."""
    return " and ".join(describe(o) for o in scene)


def parse_object(text):
    """Invert describe: "a small red circle in the top left" -> ShapeObject, or None if it is not one."""
    words = text.split(" ")
    if len(words) < 7 or words[0] != "a" or words[4:6] != ["in", "the"]:
        return None
    obj = ShapeObject(words[1], words[2], words[3], " ".join(words[6:]))
    if obj.size not in SIZES or obj.colour not in COLOURS or obj.shape not in SHAPES or obj.position not in POSITIONS:
        return None
    return obj


def parse_caption(text):
    """Invert scene_caption: the tuple of objects a caption describes, or None if it is not one."""
    objects = tuple(parse_object(part) for part in text.strip().split(" and "))
    return None if None in objects else objects


def scene_questions(scene):
    """All question-answer pairs a scene answers unambiguously: [(question, answer, kind)]."""
    qa = [("how many shapes are there?", NUMBERS[len(scene)], "count")]
    for o in scene:
        qa.append((f"what shape is in the {o.position}?", o.shape, "shape"))
        if sum(p.shape == o.shape for p in scene) == 1:
            qa.append((f"what colour is the {o.shape}?", o.colour, "colour"))
            qa.append((f"is the {o.shape} small or large?", o.size, "size"))
        if sum((p.colour, p.shape) == (o.colour, o.shape) for p in scene) == 1:
            qa.append((f"where is the {o.colour} {o.shape}?", o.position, "position"))
    return qa


def qa_prompt(question):
    """The prompt of a question; the model continues it with " " + answer."""
    return f"Q: {question} A:"


def qa_text(question, answer):
    return f"{qa_prompt(question)} {answer}"


def sample_scene(rng, max_objects=2):
    """A random scene: 1..max_objects objects at distinct positions, in reading order."""
    n = rng.randint(1, max_objects)
    positions = sorted(rng.sample(range(len(POSITIONS)), n))
    names = list(POSITIONS)
    return tuple(ShapeObject(rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES),
                             names[p]) for p in positions)


def shape_polygon(shape, cx, cy, r):
    """Vertices of a shape centred at (cx, cy) with circumradius r (circles are drawn as ellipses)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":  # five points alternating with five inner corners at 0.45 r
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + rk * math.cos(-math.pi / 2 + k * math.pi / 5), cy + rk * math.sin(-math.pi / 2 + k * math.pi / 5))
                for k, rk in enumerate(radii)]
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_scene(scene, image_size, rng, supersample=None):
    """Draw a scene with Pillow: jittered centres, radii and colours, antialiased by drawing at
    `supersample` times the size (default: about 128 px) and averaging down."""
    supersample = supersample or max(1, 128 // image_size)
    S = image_size * supersample
    background = tuple(rng.randint(0, 40) for _ in range(3))
    im = Image.new("RGB", (S, S), background)
    draw = ImageDraw.Draw(im)
    for o in scene:
        fx, fy = POSITIONS[o.position]
        cx, cy = (fx + rng.uniform(-0.025, 0.025)) * S, (fy + rng.uniform(-0.025, 0.025)) * S
        r = SIZES[o.size] * S * rng.uniform(0.9, 1.1)
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[o.colour])
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(shape_polygon(o.shape, cx, cy, r), fill=colour)
    return im.resize((image_size, image_size), Image.Resampling.BOX) if supersample > 1 else im


def stable_hash(text):
    """A hash of a string that is the same in every process and run (unlike Python's hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def scene_split(scene, val_fraction=0.1):
    """"val" or "train", decided by the hash of the scene's description."""
    return "val" if stable_hash(scene_caption(scene)) % 1000 < val_fraction * 1000 else "train"


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic scenes of shapes with captions and questions (see the section comment above).

    Item idx of a split is always the same scene and image. With probability `qa_fraction` the
    item's "caption" is a question-answer text "Q: what colour is the circle? A: red" instead of the
    scene's caption (decided once per item, by its seed: the same in every epoch). `example(idx)` gives everything about one scene, for evaluation.
    """

    def __init__(self, split="train", size=20000, image_size=48, seed=0, qa_fraction=0.0,
                 max_objects=2, val_fraction=0.1):
        if split not in ("train", "val"):
            raise ValueError(f"ShapesDataset split must be 'train' or 'val', got {split!r}")
        if not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.qa_fraction, self.max_objects, self.val_fraction = qa_fraction, max_objects, val_fraction

    def __len__(self):
        return self.size

    def _rng(self, idx, what):
        return random.Random(f"shapes/{self.seed}/{self.split}/{idx}/{what}")

    def scene(self, idx):
        """The idx-th scene of this split (rejection sampling on the split hash)."""
        if not 0 <= idx < self.size:
            raise IndexError(f"index {idx} out of range for ShapesDataset of size {self.size}")
        rng = self._rng(idx, "scene")
        while True:
            scene = sample_scene(rng, self.max_objects)
            if scene_split(scene, self.val_fraction) == self.split:
                return scene

    def text(self, idx):
        """The training text of item idx (caption or QA), without drawing the image."""
        scene = self.scene(idx)
        rng = self._rng(idx, "text")
        if rng.random() < self.qa_fraction:
            question, answer, _ = rng.choice(scene_questions(scene))
            return qa_text(question, answer)
        return scene_caption(scene)

    def example(self, idx):
        """{"image", "caption", "questions": [(q, a, kind)], "scene"} for scene idx."""
        scene = self.scene(idx)
        return {"image": render_scene(scene, self.image_size, self._rng(idx, "render")),
                "caption": scene_caption(scene), "questions": scene_questions(scene), "scene": scene}

    def __getitem__(self, idx):
        scene = self.scene(idx)
        return {"image": render_scene(scene, self.image_size, self._rng(idx, "render")),
                "caption": self.text(idx), "skipped": []}


def caption_scores(predictions, scenes):
    """Exact match of predicted captions and per-attribute accuracy.

    Objects are matched slot by slot (both lists are in reading order); a missing or unparsable
    object counts as wrong in every attribute. Returns {"exact", "count", "size", "colour", "shape",
    "position"}, each a fraction in [0, 1].
    """
    if len(predictions) != len(scenes):
        raise ValueError(f"caption_scores: {len(predictions)} predictions for {len(scenes)} scenes")
    n = len(scenes)
    exact = sum(p.strip() == scene_caption(s) for p, s in zip(predictions, scenes))
    count = 0
    attr = {a: 0 for a in ATTRIBUTES}
    slots = sum(len(s) for s in scenes)
    for p, s in zip(predictions, scenes):
        parsed = [parse_object(part) for part in p.strip().split(" and ")]  # None: an unparsable object
        count += len(parsed) == len(s)
        for i, truth in enumerate(s):
            guess = parsed[i] if i < len(parsed) else None
            for a in ATTRIBUTES:
                attr[a] += guess is not None and getattr(guess, a) == getattr(truth, a)
    out = {"exact": exact / max(n, 1), "count": count / max(n, 1)}
    out.update({a: v / max(slots, 1) for a, v in attr.items()})
    return out


def answer_scores(predictions, answers, kinds):
    """Exact match of predicted answers, overall and per question kind."""
    if not len(predictions) == len(answers) == len(kinds):
        raise ValueError(f"answer_scores: {len(predictions)} predictions, {len(answers)} answers, {len(kinds)} kinds")
    right = {}
    total = {}
    for p, a, k in zip(predictions, answers, kinds):
        total[k] = total.get(k, 0) + 1
        right[k] = right.get(k, 0) + (p.strip() == a)
    out = {"exact": sum(right.values()) / max(sum(total.values()), 1)}
    out.update({k: right[k] / total[k] for k in sorted(total)})
    return out


# ----------------------------------------------------------------------------------------------------
# Datasets read from files. Each becomes a list of (image path, text) records; an image with several
# captions gives one record per caption, so an epoch sees every caption once, deterministically.


class ImageTextDataset(torch.utils.data.Dataset):
    """(image path, text) records; unreadable images are skipped (or raise, with strict=True)."""

    def __init__(self, records, strict=False, name="dataset"):
        if not records:
            raise ValueError(f"{name}: no image-text records found")
        self.records, self.strict, self.name = records, strict, name
        self.num_skipped = 0  # counted in this process; train.py counts the batches' "skipped" lists
        self.unreadable = set()  # record indices known bad in this process: warned about once

    def __len__(self):
        return len(self.records)

    def __getitem__(self, idx):
        """Record idx; if its image cannot be read, the first readable one of a sequence of records
        drawn at random (seeded by idx, so the same every time and in every process), spread over
        the whole dataset rather than piling onto the neighbours of a bad stretch."""
        if not 0 <= idx < len(self.records):
            raise IndexError(f"index {idx} out of range for {self.name} ({len(self.records)} records)")
        skipped, draw, candidate = [], random.Random(f"stand-in/{idx}"), idx
        for _ in range(max(100, 2 * len(self.records))):
            path, text = self.records[candidate]
            if candidate not in self.unreadable:
                try:
                    return {"image": load_image(path), "caption": text, "skipped": skipped}
                except ImageError as e:
                    if self.strict:
                        raise
                    self.unreadable.add(candidate)
                    logger.warning("skipping %s", e)
            self.num_skipped += 1
            skipped.append(path)
            candidate = draw.randrange(len(self.records))
        raise ImageError(f"{self.name}: no readable image found among {len(self.unreadable)} tried "
                         f"(first: {self.records[min(self.unreadable)][0]}); is the image folder right?")


def _read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _image_path(value, where):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: the image must be a path string, got {value!r}")
    return value


def _check_folder(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")


def _captions(value, where):
    """The captions of one image, stripped of surrounding whitespace (as COCO's are below): every
    caption of an image is a record of its own (MAGMA's loader draws one of them per visit instead)."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return [c.strip() for c in value]
    raise ValueError(f"{where}: caption(s) must be a string or a non-empty list of strings, got {value!r}")


def jsonl_dataset(path, image_root=None, strict=False):
    """JSON Lines, one {"image": path, "caption": str or [str]} per line; relative image paths are
    taken from `image_root` (default: the folder of the .jsonl file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSON Lines file not found: {path}")
    root = image_root or os.path.dirname(os.path.abspath(path))
    _check_folder(root)
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], row["caption"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"image\": ..., \"caption\": ...}} ({e!r})") from None
        for c in _captions(caption, f"{path}:{n}"):
            records.append((os.path.join(root, _image_path(image, f"{path}:{n}")), c))
    return ImageTextDataset(records, strict, name=path)


def coco_captions(annotations, image_dir, strict=False):
    """COCO captions: annotations JSON ({"images": [{id, file_name}], "annotations": [{image_id,
    caption}]}) plus the folder of images."""
    data = _read_json(annotations, "COCO annotations file")
    _check_folder(image_dir)
    try:
        files = {im["id"]: _image_path(im["file_name"], annotations) for im in data["images"]}
        records = []
        for i, a in enumerate(data["annotations"]):
            if a["image_id"] not in files:
                raise ValueError(f"{annotations}: annotation #{i} refers to image_id {a['image_id']!r}, "
                                 f"which is not in its \"images\" list")
            if not isinstance(a["caption"], str):
                raise ValueError(f"{annotations}: annotation #{i}: the caption must be a string, got {a['caption']!r}")
            records.append((os.path.join(image_dir, files[a["image_id"]]), a["caption"].strip()))
    except KeyError as e:
        raise ValueError(f"{annotations}: not a COCO captions file (missing {e})") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{annotations}: not a COCO captions file ({e})") from None
    return ImageTextDataset(records, strict, name=annotations)


def vqa_dataset(questions, annotations, image_dir, strict=False):
    """VQA v2: questions JSON + annotations JSON + COCO image folder; each question becomes the text
    "Q: <question> A: <most common answer>". Images are COCO_<subtype>_<12-digit id>.jpg (the VQA
    naming) or <12-digit id>.jpg."""
    qs = _read_json(questions, "VQA questions file")
    ans = _read_json(annotations, "VQA annotations file")
    _check_folder(image_dir)
    try:
        answer = {a["question_id"]: a["multiple_choice_answer"] for a in ans["annotations"]}
        subtype = qs.get("data_subtype", "")
        records = []
        for q in qs["questions"]:
            if q["question_id"] not in answer:
                raise ValueError(f"{questions}: question_id {q['question_id']!r} has no annotation in {annotations} "
                                 "(are they the same split?)")
            image_id = int(q["image_id"])
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
            if not os.path.isfile(os.path.join(image_dir, name)):
                name = f"{image_id:012d}.jpg"
            records.append((os.path.join(image_dir, name), qa_text(q["question"].strip(), answer[q["question_id"]])))
    except KeyError as e:
        raise ValueError(f"{questions} / {annotations}: not a VQA v2 questions/annotations pair "
                         f"(missing {e})") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{questions} / {annotations}: not a VQA v2 questions/annotations pair ({e})") from None
    return ImageTextDataset(records, strict, name=questions)


def magma_dataset(data_dir, strict=False):
    """MAGMA's on-disk layout: data_dir/image_data/**/*.json, each {"image_path": path relative to
    data_dir, "captions": [str, ...], "metadata": {...}}."""
    index_dir = os.path.join(data_dir, "image_data")
    if not os.path.isdir(index_dir):
        raise FileNotFoundError(f"{data_dir}: no image_data/ folder (MAGMA dataset layout)")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(index_dir, followlinks=True)
                   for f in fs if f.endswith(".json"))
    records = []
    for file in files:
        item = _read_json(file, "MAGMA image data file")
        if not isinstance(item, dict) or "image_path" not in item or "captions" not in item:
            raise ValueError(f"{file}: expected {{\"image_path\": ..., \"captions\": [...]}}")
        for c in _captions(item["captions"], file):
            records.append((os.path.join(data_dir, _image_path(item["image_path"], file)), c))
    return ImageTextDataset(records, strict, name=data_dir)


DATA_FORMATS = """\
  shapes                          the built-in synthetic scenes
  FILE.jsonl                      JSON Lines of {"image": path, "caption": str or [str]}
  DIR (with image_data/)          MAGMA's layout: image_data/**/*.json with image_path and captions
  coco:ANNOTATIONS.json,IMAGE_DIR COCO captions
  vqa:QUESTIONS.json,ANNOTATIONS.json,IMAGE_DIR  VQA v2, as "Q: ... A: ..." texts"""


def open_dataset(spec, strict=False):
    """A file dataset from a --data value (formats in DATA_FORMATS)."""
    kind, _, rest = spec.partition(":") if spec.startswith(("coco:", "vqa:")) else ("", "", spec)
    parts = rest.split(",")
    if kind == "coco" and len(parts) == 2:
        return coco_captions(parts[0], parts[1], strict)
    if kind == "vqa" and len(parts) == 3:
        return vqa_dataset(parts[0], parts[1], parts[2], strict)
    if not kind and spec.endswith(".jsonl"):
        return jsonl_dataset(spec, strict=strict)
    if not kind and os.path.isdir(os.path.join(spec, "image_data")):
        return magma_dataset(spec, strict)
    raise ValueError(f"--data={spec!r} is not a dataset this script reads; formats:\n{DATA_FORMATS}")


# ----------------------------------------------------------------------------------------------------
# Batching


def collate(batch, tokenizer, image_size, max_len=None):
    """A list of dataset items -> {"pixels" (B, 3, S, S), "input_ids" (B, T) long, "text_mask" (B, T)
    bool, "captions" [str], "skipped" [paths]}.

    input_ids hold each text's tokens followed by eos, right-padded (with eos; pads are never attended
    to or predicted); text_mask is True on the real tokens including the eos. max_len counts the eos:
    a text of max_len tokens or more keeps its first max_len - 1, then eos.
    """
    pixels = []
    for item in batch:
        image = item["image"]
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) != (3, image_size, image_size):
                raise ValueError(f"collate: pixels of shape {tuple(image.shape)}, expected "
                                 f"{(3, image_size, image_size)}")
            pixels.append(image.float())
        else:
            pixels.append(clip_preprocess(image, image_size))
    ids = []
    for item in batch:
        tokens = tokenizer.encode(item["caption"])
        if max_len is not None:
            if max_len < 1:
                raise ValueError(f"collate: max_len must be >= 1, got {max_len}")
            tokens = tokens[:max_len - 1]
        ids.append(tokens + [tokenizer.eos_id])
    T = max(len(t) for t in ids)
    input_ids = torch.full((len(batch), T), tokenizer.eos_id, dtype=torch.long)
    text_mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, t in enumerate(ids):
        input_ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        text_mask[i, :len(t)] = True
    return {"pixels": torch.stack(pixels),  # (B, 3, S, S)
            "input_ids": input_ids, "text_mask": text_mask,  # (B, T)
            "captions": [item["caption"] for item in batch],
            "skipped": [p for item in batch for p in item.get("skipped", [])]}
