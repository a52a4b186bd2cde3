"""Tests for data.py: CLIP preprocessing parity, the synthetic shapes dataset, file datasets with
missing/corrupt images, and batching.

Preprocessing reference. The definition is CLIP's own `preprocess`: torchvision
Resize(size, BICUBIC) -> CenterCrop(size) -> convert("RGB") -> ToTensor -> Normalize(CLIP mean/std).
torchvision cannot be installed normally here (its wheel pins a CUDA build of torch, and its compiled
extension will not load against the CPU torch), but its transforms on PIL images are pure Python.
So, when a torchvision wheel is found (env TORCHVISION_WHEEL, or .whl/torchvision-*.whl, fetched with
`pip download --no-deps torchvision==0.28.0 -d .whl`), the tests import torchvision.transforms straight
from the wheel, bypassing torchvision/__init__.py (the part that loads the compiled ops), and use the
real thing. They also always run against `transcribed_clip_preprocess` below: a literal transcription
of torchvision's documented PIL path (Image.resize(BICUBIC) to the computed size, crop box,
np.asarray / 255, (x - mean) / std), itself checked against torchvision when the wheel is there.

Real photographs come from scikit-image's wheel (skimage/data/*.png|jpg, shipped offline); the tests
read the files without importing skimage.
"""
import glob
import importlib.util
import io
import json
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import CLIP_MEAN, CLIP_STD, clip_preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------
# References


def _torchvision_transforms():
    """torchvision.transforms imported from a wheel file, or None when no wheel is at hand."""
    if "torchvision.transforms" in sys.modules:
        return sys.modules["torchvision.transforms"]
    wheels = [os.environ.get("TORCHVISION_WHEEL", "")]
    wheels += sorted(glob.glob(os.path.join(REPO, ".whl", "torchvision-*.whl")))
    wheels = [w for w in wheels if w and os.path.isfile(w)]
    if not wheels:
        return None
    if "torchvision" not in sys.modules:
        pkg = types.ModuleType("torchvision")  # a bare package: skip __init__ (it loads the C++ ops)
        pkg.__path__ = [os.path.join(wheels[-1], "torchvision")]  # zipimport reads inside the wheel
        sys.modules["torchvision"] = pkg
    import torchvision.transforms as T
    return T


@pytest.fixture(autouse=True, scope="module")
def forget_planted_torchvision():
    """The bare torchvision package planted above must not outlive this file: to later tests (and to
    transformers' checks for an installed torchvision) it would look like a real installation."""
    def planted():
        return {name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")}
    before = planted()
    yield
    for name in planted() - before:
        del sys.modules[name]


def torchvision_clip_preprocess(size):
    """CLIP's own preprocess (clip/clip.py `_transform`), built from torchvision's transforms."""
    T = _torchvision_transforms()
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def transcribed_clip_preprocess(size):
    """torchvision's PIL path written out: Resize(int) keeps the ratio, shorter side -> size, longer
    -> int(size * long / short); resize is skipped when the size is unchanged; CenterCrop's top/left
    are int(round((h - size) / 2.0)); ToTensor divides uint8 by 255 in float32; Normalize computes
    (x - mean) / std."""
    def f(im):
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
        if new != (w, h):
            im = im.resize(new, Image.BICUBIC)
        top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
        im = im.crop((left, top, left + size, top + size)).convert("RGB")
        x = torch.from_numpy(np.array(im, np.uint8)).permute(2, 0, 1).float().div(255)
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        return (x - mean) / std
    return f


REFERENCES = {"torchvision": torchvision_clip_preprocess, "transcribed": transcribed_clip_preprocess}


def reference(name, size):
    if name == "torchvision" and _torchvision_transforms() is None:
        pytest.skip("no torchvision wheel: pip download --no-deps torchvision==0.28.0 -d .whl")
    return REFERENCES[name](size)


def _photo_dir():
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]


def photo(name):
    d = _photo_dir()
    if d is None or not os.path.isfile(os.path.join(d, name)):
        pytest.skip("scikit-image (which ships the test photographs) is not installed")
    with Image.open(os.path.join(d, name)) as im:
        im.load()
        return im


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# Preprocessing parity


@pytest.mark.parametrize("ref", ["torchvision", "transcribed"])
@pytest.mark.parametrize("name", PHOTOS)
def test_preprocess_matches_clip_on_photographs(ref, name):
    im = photo(name)
    assert im.mode == "RGB"
    for size in (224, 32, 77):
        out = clip_preprocess(im, size)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert max_diff(out, reference(ref, size)(im)) <= 1e-6


def test_transcription_equals_torchvision():
    """The transcribed reference is torchvision's PIL path (odd sizes exercise the rounding)."""
    if _torchvision_transforms() is None:
        pytest.skip("no torchvision wheel: pip download --no-deps torchvision==0.28.0 -d .whl")
    rng = np.random.default_rng(0)
    for w, h, size in [(33, 47, 32), (47, 33, 32), (100, 61, 37), (64, 64, 64), (65, 300, 224)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert max_diff(transcribed_clip_preprocess(size)(im), torchvision_clip_preprocess(size)(im)) == 0.0


def test_preprocess_geometry_on_odd_sizes():
    """Non-square, odd-sized, upscaled inputs: the resize rule and crop rounding match the reference."""
    rng = np.random.default_rng(1)
    for w, h, size in [(33, 47, 32), (47, 33, 32), (100, 61, 37), (31, 17, 48), (300, 65, 224)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert max_diff(clip_preprocess(im, size), transcribed_clip_preprocess(size)(im)) <= 1e-6


def _gray(im):
    return im.convert("L")


def _with_hidden_region(rgb, mode):
    """(image of `mode` whose alpha hides a garbage region, the RGB image a viewer would see)."""
    a = np.array(rgb)
    h, w = a.shape[:2]
    alpha = np.full((h, w), 255, np.uint8)
    alpha[h // 4: h // 2, w // 3: 2 * w // 3] = 0
    garbage = a.copy()
    garbage[alpha == 0] = np.random.default_rng(0).integers(0, 256, (int((alpha == 0).sum()), 3))
    seen = a.copy()
    seen[alpha == 0] = 255  # composited over white
    if mode == "RGBA":
        return Image.fromarray(np.dstack([garbage, alpha]), "RGBA"), Image.fromarray(seen)
    g = np.array(Image.fromarray(garbage).convert("L"))
    g_seen = np.array(Image.fromarray(a).convert("L"))
    g_seen[alpha == 0] = 255
    return Image.fromarray(np.dstack([g, alpha]), "LA"), Image.fromarray(g_seen).convert("RGB")


def _sixteen_bit(rgb, how):
    """(16-bit image holding the gray photo times 257, the 8-bit gray photo as RGB)."""
    g = np.array(rgb.convert("L"))
    g16 = g.astype(np.uint16) * 257
    expected = Image.fromarray(g).convert("RGB")
    if how == "I;16":
        return Image.fromarray(g16), expected
    if how == "I":
        return Image.fromarray(g16.astype(np.int32), "I"), expected
    buf = io.BytesIO()  # a real 16-bit grayscale PNG, as Pillow opens it from disk
    Image.fromarray(g16).save(buf, format="PNG")
    buf.seek(0)
    im = Image.open(buf)
    im.load()
    assert im.mode in ("I", "I;16"), im.mode
    return im, expected


def _palette(rgb, transparent):
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if not transparent:
        return p, p.convert("RGB")
    a = np.array(p)
    index = int(a[0, 0])
    p.info["transparency"] = index
    seen = np.array(p.convert("RGB"))
    seen[a == index] = 255
    return p, Image.fromarray(seen)


MODES = {  # mode -> (image in that mode, RGB image it should be treated as)
    "RGB": lambda im: (im, im),
    "L": lambda im: (_gray(im), _gray(im).convert("RGB")),
    "1": lambda im: (im.convert("1"), im.convert("1").convert("L").convert("RGB")),
    "P": lambda im: _palette(im, False),
    "P+transparency": lambda im: _palette(im, True),
    "RGBA": lambda im: _with_hidden_region(im, "RGBA"),
    "LA": lambda im: _with_hidden_region(im, "LA"),
    "CMYK": lambda im: (im.convert("CMYK"), im.convert("CMYK").convert("RGB")),
    "I;16": lambda im: _sixteen_bit(im, "I;16"),
    "I": lambda im: _sixteen_bit(im, "I"),
    "16-bit PNG": lambda im: _sixteen_bit(im, "png"),
}


@pytest.mark.parametrize("ref", ["torchvision", "transcribed"])
@pytest.mark.parametrize("mode", list(MODES))
def test_preprocess_modes(mode, ref):
    """Each input mode equals CLIP's preprocessing of the RGB picture it shows."""
    im, as_rgb = MODES[mode](photo("chelsea.png"))
    assert as_rgb.mode == "RGB"
    for size in (224, 45):
        assert max_diff(clip_preprocess(im, size), reference(ref, size)(as_rgb)) <= 1e-6


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    out = data.to_rgb(img)
    a = np.array(out)[..., 0].astype(int)
    assert a.min() == 0 and a.max() == 255 and len(np.unique(a)) > 200  # clipping would give ~all 255
    assert np.abs(a - np.round(ramp / 257.0)).max() == 0


def test_preprocess_errors():
    with pytest.raises(TypeError, match="PIL image"):
        clip_preprocess(np.zeros((4, 4, 3)), 4)
    with pytest.raises(ValueError, match="zero size"):
        clip_preprocess(Image.new("RGB", (0, 8)), 4)
    assert clip_preprocess(Image.new("La", (8, 8)), 4).shape == (3, 4, 4)


# ----------------------------------------------------------------------------------------------------
# Synthetic shapes dataset


def test_shapes_deterministic_and_seeded():
    a, b = data.ShapesDataset("train", 8, 32, seed=3), data.ShapesDataset("train", 8, 32, seed=3)
    c = data.ShapesDataset("train", 8, 32, seed=4)
    for i in range(8):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"]
        assert np.array_equal(np.array(x["image"]), np.array(y["image"]))
        assert x["image"].size == (32, 32) and x["image"].mode == "RGB"
    assert [a.text(i) for i in range(8)] != [c.text(i) for i in range(8)]


def test_shapes_splits_never_overlap():
    train = {data.scene_caption(data.ShapesDataset("train", 3000).scene(i)) for i in range(3000)}
    val = {data.scene_caption(data.ShapesDataset("val", 300).scene(i)) for i in range(300)}
    assert len(train) > 1000 and len(val) > 50
    assert not train & val


def test_shapes_captions_questions_and_scores():
    ds = data.ShapesDataset("train", 200, qa_fraction=0.5)
    texts = [ds.text(i) for i in range(200)]
    assert 50 < sum(t.startswith("Q: ") for t in texts) < 150
    for i in range(50):
        ex = ds.example(i)
        scene = ex["scene"]
        assert data.parse_caption(ex["caption"]) == scene
        assert 1 <= len(scene) <= 2 and ex["caption"].startswith("a ")
        for q, a, kind in ex["questions"]:
            if kind == "colour":
                shape = q.split()[-1].rstrip("?")
                assert [o.colour for o in scene if o.shape == shape] == [a]
    assert data.parse_caption("a small red blob in the top left") is None
    scenes = [ds.scene(i) for i in range(20)]
    truth = [data.scene_caption(s) for s in scenes]
    assert data.caption_scores(truth, scenes) == {k: 1.0 for k in ("exact", "count") + data.ATTRIBUTES}
    wrong = [t.replace(s[0].colour, "white" if s[0].colour != "white" else "red", 1) for t, s in zip(truth, scenes)]
    scores = data.caption_scores(wrong, scenes)
    assert scores["exact"] == 0.0 and scores["shape"] == 1.0 and scores["colour"] < 1.0
    assert data.answer_scores(["red", "two"], ["red", "one"], ["colour", "count"]) == \
        {"exact": 0.5, "colour": 1.0, "count": 0.0}


def test_shape_renderings_differ():
    """Each shape draws differently (a renderer bug that drew everything as a circle would pass the
    caption tests)."""
    rng = lambda: __import__("random").Random(0)  # noqa: E731
    imgs = {s: np.array(data.render_scene((data.ShapeObject("large", "red", s, "top left"),), 32, rng()), float)
            for s in data.SHAPES}
    for s in data.SHAPES:
        for t in data.SHAPES:
            if s < t:
                assert np.abs(imgs[s] - imgs[t]).mean() > 1.0, (s, t)


# ----------------------------------------------------------------------------------------------------
# File datasets


def _write_image(path, colour=(200, 30, 30), size=(20, 14)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_jsonl_coco_vqa_magma(tmp_path):
    root = str(tmp_path)
    _write_image(f"{root}/img/a.png")
    _write_image(f"{root}/img/b.jpg", (0, 0, 255))
    with open(f"{root}/d.jsonl", "w") as f:
        f.write(json.dumps({"image": "img/a.png", "caption": "a red box"}) + "\n\n")
        f.write(json.dumps({"image": "img/b.jpg", "caption": ["blue", " a blue box\n"]}) + "\n")  # stripped
    ds = data.open_dataset(f"{root}/d.jsonl")
    assert len(ds) == 3 and [ds[i]["caption"] for i in range(3)] == ["a red box", "blue", "a blue box"]
    assert ds[0]["image"].mode == "RGB" and ds[0]["skipped"] == []

    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 9, "id": 1, "caption": " Blue. "},
                            {"image_id": 7, "id": 2, "caption": "Red."}]}
    json.dump(coco, open(f"{root}/coco.json", "w"))
    ds = data.open_dataset(f"coco:{root}/coco.json,{root}/img")
    assert [ds[i]["caption"] for i in range(2)] == ["Blue.", "Red."]
    assert np.array(ds[0]["image"])[0, 0, 2] > 200  # b.jpg is blue

    _write_image(f"{root}/val2014/COCO_val2014_000000000042.jpg")
    qs = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "What colour?", "question_id": 5}]}
    ans = {"annotations": [{"question_id": 5, "image_id": 42, "multiple_choice_answer": "red",
                            "answers": [{"answer": "red", "answer_id": 1}]}]}
    json.dump(qs, open(f"{root}/q.json", "w"))
    json.dump(ans, open(f"{root}/a.json", "w"))
    ds = data.open_dataset(f"vqa:{root}/q.json,{root}/a.json,{root}/val2014")
    assert ds[0]["caption"] == "Q: What colour? A: red"

    os.makedirs(f"{root}/magma/image_data/0")
    _write_image(f"{root}/magma/images/0/x.png")
    json.dump({"image_path": "images/0/x.png", "captions": ["one", "two"], "metadata": {}},
              open(f"{root}/magma/image_data/0/0.json", "w"))
    ds = data.open_dataset(f"{root}/magma")
    assert [ds[i]["caption"] for i in range(2)] == ["one", "two"]

    with pytest.raises(ValueError, match="formats"):
        data.open_dataset(f"{root}/nothing.txt")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.open_dataset(f"{root}/missing.jsonl")
    with open(f"{root}/bad.jsonl", "w") as f:
        f.write('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        data.open_dataset(f"{root}/bad.jsonl")


def test_malformed_files_and_arguments_name_the_problem(tmp_path):
    root = str(tmp_path)
    _write_image(f"{root}/img/a.png")

    def fails(exc, match, spec):
        with pytest.raises(exc, match=match):
            data.open_dataset(spec)

    with open(f"{root}/num.jsonl", "w") as f:
        f.write(json.dumps({"image": 5, "caption": "x"}) + "\n")
    fails(ValueError, r"num.jsonl:1: the image must be a path string", f"{root}/num.jsonl")
    with open(f"{root}/latin1.jsonl", "wb") as f:
        f.write('{"image": "a.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    fails(ValueError, "latin1.jsonl: not UTF-8", f"{root}/latin1.jsonl")

    coco = {"images": [{"id": 7, "file_name": "a.png"}], "annotations": [{"image_id": 8, "caption": "x"}]}
    json.dump(coco, open(f"{root}/coco.json", "w"))
    fails(ValueError, "annotation #0 refers to image_id 8", f"coco:{root}/coco.json,{root}/img")
    fails(FileNotFoundError, "image folder not found", f"coco:{root}/coco.json,{root}/no_such_dir")
    coco["annotations"] = [{"image_id": 7, "caption": None}]
    json.dump(coco, open(f"{root}/coco.json", "w"))
    fails(ValueError, "annotation #0: the caption must be a string", f"coco:{root}/coco.json,{root}/img")

    json.dump({"questions": [{"image_id": 1, "question": "Q?", "question_id": 3}]}, open(f"{root}/q.json", "w"))
    json.dump({"annotations": [{"question_id": 4, "multiple_choice_answer": "y"}]}, open(f"{root}/a.json", "w"))
    fails(ValueError, "question_id 3 has no annotation", f"vqa:{root}/q.json,{root}/a.json,{root}/img")

    # MAGMA's layout with a symlinked shard folder, as its own glob would find it
    os.makedirs(f"{root}/shard/0")
    json.dump({"image_path": "img/a.png", "captions": ["linked"]}, open(f"{root}/shard/0/0.json", "w"))
    os.makedirs(f"{root}/magma/image_data")
    os.symlink(f"{root}/shard/0", f"{root}/magma/image_data/0")
    os.symlink(f"{root}/img", f"{root}/magma/img")
    assert data.open_dataset(f"{root}/magma")[0]["caption"] == "linked"

    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            data.ShapesDataset("val", 4, val_fraction=bad)
    with pytest.raises(ValueError, match="max_len"):
        data.collate([{"image": Image.new("RGB", (8, 8)), "caption": "ab"}], ByteTok(), 8, max_len=0)


def test_caption_scores_judge_each_object():
    scene = (data.ShapeObject("small", "red", "circle", "top left"),
             data.ShapeObject("large", "blue", "star", "bottom right"))
    one_bad = "a small red circle in the top left and a large blue blob in the bottom right"
    scores = data.caption_scores([one_bad], [scene])
    assert scores["exact"] == 0 and scores["count"] == 1
    # the first object is judged on its own; the unparsable second one is wrong in every attribute
    assert [scores[a] for a in ("size", "colour", "shape", "position")] == [0.5, 0.5, 0.5, 0.5]
    assert data.parse_caption(one_bad) is None  # the caption as a whole is still not one
    with pytest.raises(ValueError, match="1 predictions for 2 scenes"):
        data.caption_scores([one_bad], [scene, scene])

def _broken_dataset(root, strict=False):
    _write_image(f"{root}/ok1.png")
    _write_image(f"{root}/ok2.png")
    with open(f"{root}/corrupt.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    with open(f"{root}/truncated.jpg", "wb") as f:
        f.write(good.getvalue()[: len(good.getvalue()) // 2])
    rows = [("ok1.png", "first"), ("missing.png", "gone"), ("corrupt.png", "bad"), ("truncated.jpg", "cut"),
            ("ok2.png", "second")]
    with open(f"{root}/d.jsonl", "w") as f:
        for image, caption in rows:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
    return data.jsonl_dataset(f"{root}/d.jsonl", strict=strict)


def test_missing_and_corrupt_images_are_skipped_counted_logged(tmp_path, caplog):
    from PIL import ImageFile
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    ds = _broken_dataset(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="magma.data"):
        items = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]  # the bad files are known now: no second warning
    warnings = caplog.text
    captions = [it["caption"] for it in items]
    assert captions[0] == "first" and captions[4] == "second" and set(captions[1:4]) <= {"first", "second"}
    # A stand-in is drawn by idx alone: the same in a fresh process (a fresh dataset object) and on every pass.
    assert [it["caption"] for it in again] == captions
    assert [_broken_dataset(str(tmp_path))[i]["caption"] for i in range(len(ds))] == captions
    for idx, name in [(1, "missing.png"), (2, "corrupt.png"), (3, "truncated.jpg")]:
        assert os.path.basename(items[idx]["skipped"][0]) == name  # its own file first
        assert {os.path.basename(p) for p in items[idx]["skipped"]} <= {"missing.png", "corrupt.png", "truncated.jpg"}
        # warned once per process, however often it is drawn
        assert sum("/" + name in line for line in warnings.splitlines()) == 1
    assert items[0]["skipped"] == [] and items[4]["skipped"] == []
    assert ds.num_skipped == 2 * sum(len(it["skipped"]) for it in items)
    with pytest.raises(IndexError):
        ds[len(ds)]
    # batches carry the skipped paths, also out of DataLoader worker processes
    tok = ByteTok()
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1,
                                         collate_fn=lambda b: data.collate(b, tok, 8))
    batch = next(iter(loader))
    assert len(batch["skipped"]) == sum(len(it["skipped"]) for it in items) and batch["pixels"].shape == (5, 3, 8, 8)


def test_strict_stops_with_the_path(tmp_path):
    ds = _broken_dataset(str(tmp_path), strict=True)
    assert ds[0]["caption"] == "first"
    with pytest.raises(data.ImageError, match="missing.png"):
        ds[1]
    with pytest.raises(data.ImageError, match="corrupt.png"):
        ds[2]
    with pytest.raises(data.ImageError, match="truncated.jpg"):
        ds[3]


def test_load_image_names_a_folder(tmp_path):
    with pytest.raises(data.ImageError, match="is a folder, not an image file"):
        data.load_image(str(tmp_path))
    with pytest.raises(data.ImageError, match="image not found: .*missing.png"):
        data.load_image(str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------------------------------
# Batching


class ByteTok:
    """The ByteTokenizer interface (ids 0..255 bytes, eos 256), so these tests need no other file."""
    eos_id, vocab_size = 256, 257

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_collate():
    tok = ByteTok()
    pil = Image.new("RGB", (40, 30), (255, 0, 0))
    pixels = clip_preprocess(Image.new("RGB", (16, 16), (0, 0, 255)), 16)
    items = [{"image": pil, "caption": "ab"}, {"image": pixels, "caption": "abcd", "skipped": ["x"]}]
    batch = data.collate(items, tok, 16)
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["pixels"].dtype == torch.float32
    assert torch.equal(batch["pixels"][1], pixels)
    assert batch["input_ids"].tolist() == [[97, 98, 256, 256, 256], [97, 98, 99, 100, 256]]
    assert batch["text_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch["captions"] == ["ab", "abcd"] and batch["skipped"] == ["x"]
    short = data.collate([{"image": pil, "caption": "abcdef"}], tok, 16, max_len=4)
    assert short["input_ids"].tolist() == [[97, 98, 99, 256]]
    with pytest.raises(ValueError, match="pixels of shape"):
        data.collate([{"image": torch.zeros(3, 8, 8), "caption": "a"}], tok, 16)


def test_distributed_sampler_shards_the_dataset():
    tok = ByteTok()
    ds = data.ShapesDataset("train", 10, 16)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler,
                                             collate_fn=lambda b: data.collate(b, tok, 16))
        for batch in loader:
            assert batch["pixels"].shape == (5, 3, 16, 16)
            seen += batch["captions"]
    assert sorted(seen) == sorted(ds.text(i) for i in range(10))
