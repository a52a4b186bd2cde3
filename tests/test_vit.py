"""vit.py: parity with Hugging Face CLIP and OpenAI's clip/model.py, position interpolation, loader errors."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

import vit
from vit import PRESETS, ViT, ViTConfig

TOL = 1e-4
# Building the TorchScript reference archive uses torch.jit, which now warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


def perturb_(model, scale=0.1):
    """Move every parameter off its default init (LayerNorm ones/zeros, zero biases), so that a
    misplaced bias or norm weight cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# Hugging Face format


def tiny_clip_config(hidden_act="quick_gelu"):
    from transformers import CLIPConfig
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny random CLIPModel, saved as model.safetensors and (in a second directory) pytorch_model.bin."""
    from transformers import CLIPModel
    torch.manual_seed(0)
    ref = perturb_(CLIPModel(tiny_clip_config())).eval()
    st_dir = tmp_path_factory.mktemp("hf_clip_safetensors")
    ref.save_pretrained(st_dir)
    bin_dir = tmp_path_factory.mktemp("hf_clip_bin")
    ref.config.to_json_file(bin_dir / "config.json")
    sd = dict(ref.state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old files carry it: ignored
    torch.save(sd, bin_dir / "pytorch_model.bin")
    return ref, {"safetensors": st_dir, "bin": bin_dir}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_clip_model_parity(hf_clip, fmt):
    ref, dirs = hf_clip
    ours = ViT.from_pretrained(str(dirs[fmt]))
    assert ours.config.width == 32 and ours.config.layers == 2 and ours.config.heads == 4
    assert ours.config.embed_dim == 16 and ours.config.act == "quick_gelu" and ours.config.hidden == 80
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = ours(pixels)
        want_hidden = ref.vision_model(pixel_values=pixels).last_hidden_state
        embed = ours.encode_image(pixels)
        out = ref.get_image_features(pixel_values=pixels)
        want_embed = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert hidden.shape == (2, 1 + 16, 32) and embed.shape == (2, 16)
    print(f"hf-clip-{fmt}: max abs diff hidden {max_diff(hidden, want_hidden):.2e}, "
          f"image features {max_diff(embed, want_embed):.2e}")
    assert max_diff(hidden, want_hidden) <= TOL
    assert max_diff(embed, want_embed) <= TOL


def test_hf_clip_vision_model_loads(tmp_path):
    """CLIPVisionModel (no projection, here with exact GELU): hidden states match, encode_image refuses.
    transformers 5 saves it without the "vision_model." prefix; older files (the .bin here) have it."""
    from transformers import CLIPVisionModel
    torch.manual_seed(1)
    ref = perturb_(CLIPVisionModel(tiny_clip_config(hidden_act="gelu").vision_config)).eval()
    ref.save_pretrained(tmp_path / "new")
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
    sd = {"vision_model." + k.removeprefix("vision_model."): v for k, v in ref.state_dict().items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, tmp_path / "old" / "pytorch_model.bin")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=pixels).last_hidden_state
    for layout in ("new", "old"):
        ours = ViT.from_pretrained(str(tmp_path / layout))
        assert ours.proj is None and ours.config.embed_dim is None and ours.config.act == "gelu"
        with torch.no_grad():
            assert max_diff(ours(pixels), want) <= TOL, layout
        with pytest.raises(ValueError, match="no projection"):
            ours.encode_image(pixels)


# ----------------------------------------------------------------------------------------------------
# OpenAI format, against OpenAI's own model definition


def openai_clip_module():
    spec = importlib.util.find_spec("clip")  # clip-anytorch; its __init__ imports torchvision, so load by path
    file = os.path.join(spec.submodule_search_locations[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model_for_tests", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    """A tiny random OpenAI CLIP (vision width 128 -> 2 heads, as build_model infers), saved as a plain
    fp16 state dict (like the released weights) and as a TorchScript archive (like the released .pt)."""
    clip_model = openai_clip_module()
    torch.manual_seed(0)
    ref = clip_model.CLIP(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=128,
                          vision_patch_size=8, context_length=8, vocab_size=50, transformer_width=64,
                          transformer_heads=1, transformer_layers=1)
    perturb_(ref)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())  # values exactly representable in fp16, so both files hold the same model
    ref.eval()
    d = tmp_path_factory.mktemp("openai_clip")
    sd = {k: v.half() for k, v in ref.state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(8), vocab_size=torch.tensor(50))
    torch.save(sd, d / "plain.pt")
    traced = torch.jit.trace_module(ref, {"encode_image": (torch.randn(1, 3, 32, 32),)})
    traced.save(str(d / "torchscript.pt"))
    return ref, {"plain": d / "plain.pt", "torchscript": d / "torchscript.pt"}


@pytest.mark.parametrize("fmt", ["plain", "torchscript"])
def test_openai_parity(openai_clip, fmt):
    ref, files = openai_clip
    ours = ViT.from_pretrained(str(files[fmt]))
    c = ours.config
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.embed_dim) == (32, 8, 128, 2, 2, 16)
    assert ours.conv1.weight.dtype == torch.float32  # fp16 weights load as fp32 by default
    pixels = torch.randn(2, 3, 32, 32)
    captured = {}
    hook = ref.visual.transformer.register_forward_hook(lambda m, i, o: captured.update(h=o.permute(1, 0, 2)))
    with torch.no_grad():
        want_embed = ref.encode_image(pixels)
        embed, hidden = ours.encode_image(pixels), ours(pixels)
    hook.remove()
    print(f"openai-clip-{fmt}: max abs diff hidden {max_diff(hidden, captured['h']):.2e}, "
          f"image features {max_diff(embed, want_embed):.2e}")
    assert max_diff(embed, want_embed) <= TOL
    assert max_diff(hidden, captured["h"]) <= TOL


def test_openai_dtype_argument(openai_clip):
    ours = ViT.from_pretrained(str(openai_clip[1]["plain"]), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in ours.parameters())


# ----------------------------------------------------------------------------------------------------
# Position embedding interpolation


def test_interpolation_matches_hf(hf_clip):
    """At 48 px the 4x4 grid becomes 6x6, bicubic, class position kept: equal to HF's own interpolation."""
    ref, dirs = hf_clip
    base = ViT.from_pretrained(str(dirs["safetensors"]))
    big = ViT.from_pretrained(str(dirs["safetensors"]), image_size=48)
    assert big.config.image_size == 48 and big.positional_embedding.shape == (1 + 36, 32)
    assert torch.equal(big.positional_embedding[0], base.positional_embedding[0])
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        assert max_diff(big(pixels), want) <= TOL
    same = ViT.from_pretrained(str(dirs["safetensors"]), image_size=32)
    assert torch.equal(same.positional_embedding, base.positional_embedding)


def test_interpolation_openai_and_errors(openai_clip):
    path = str(openai_clip[1]["plain"])
    base = ViT.from_pretrained(path)
    small = ViT.from_pretrained(path, image_size=16)
    assert small.positional_embedding.shape == (1 + 4, 128)
    assert torch.equal(small.positional_embedding[0], base.positional_embedding[0])
    # a constant position grid stays constant, whatever the interpolation
    pos = torch.cat([torch.zeros(1, 3), torch.ones(16, 3)])
    assert torch.allclose(vit.resize_positional_embedding(pos, 7)[1:], torch.ones(49, 3), atol=1e-6)
    with pytest.raises(ValueError, match="patch_size 8"):
        ViT.from_pretrained(path, image_size=36)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        base(torch.randn(1, 3, 48, 48))


# ----------------------------------------------------------------------------------------------------
# Loader errors: each names the tensor (or the thing) and the file


def hf_variant(hf_clip, tmp_path, edit):
    """A copy of the tiny CLIPModel directory as pytorch_model.bin, with its state dict edited."""
    ref, dirs = hf_clip
    shutil.copy(dirs["bin"] / "config.json", tmp_path / "config.json")
    sd = dict(ref.state_dict())
    edit(sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    return str(tmp_path)


@pytest.mark.parametrize("edit, message", [  # errors use the file's names, not ours
    (lambda sd: sd.pop("vision_model.post_layernorm.bias"), r"missing.*'vision_model\.post_layernorm\.bias'"),
    (lambda sd: sd.pop("vision_model.encoder.layers.1.self_attn.k_proj.weight"),
     "missing.*vision_model.encoder.layers.1.self_attn.k_proj.weight"),
    (lambda sd: sd.pop("visual_projection.weight"), r"missing.*'visual_projection\.weight'"),
    (lambda sd: sd.update({"vision_model.encoder.layers.0.extra.weight": torch.zeros(3)}),
     "unexpected.*vision_model.encoder.layers.0.extra.weight"),
    (lambda sd: sd.update({"vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(81, 32)}),
     r"'vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape \(81, 32\)"),
    (lambda sd: sd.update({"vision_model.encoder.layers.0.self_attn.q_proj.bias": torch.zeros(31)}),
     r"vision_model.encoder.layers.0.self_attn.q_proj.bias.*\(31,\)"),
])
def test_hf_loader_errors(hf_clip, tmp_path, edit, message):
    path = hf_variant(hf_clip, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        ViT.from_pretrained(path)
    assert "pytorch_model.bin" in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("visual.ln_pre.weight"), r"missing.*'visual\.ln_pre\.weight'"),
    (lambda sd: sd.pop("visual.proj"), "missing.*visual.proj"),
    (lambda sd: sd.update({"visual.extra": torch.zeros(3)}), "unexpected.*visual.extra"),
    (lambda sd: sd.update({"visual.transformer.resblocks.1.attn.in_proj_weight": torch.zeros(384, 127)}),
     r"'visual\.transformer\.resblocks\.1\.attn\.in_proj_weight' has shape \(384, 127\)"),
    (lambda sd: sd.update({"visual.positional_embedding": torch.zeros(18, 128)}), "1 \\+ a square grid"),
    (lambda sd: sd.update({"visual.layer1.0.conv1.weight": torch.zeros(1)}), "ResNet"),
])
def test_openai_loader_errors(openai_clip, tmp_path, edit, message):
    sd = torch.load(openai_clip[1]["plain"], weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=message) as err:
        ViT.from_pretrained(str(tmp_path / "edited.pt"))
    assert "edited.pt" in str(err.value)


def test_unknown_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ViT.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        ViT.from_pretrained(str(tmp_path / "junk.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not an OpenAI CLIP checkpoint"):
        ViT.from_pretrained(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ViT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'.*'clip', 'clip_vision_model'"):
        ViT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        ViT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="act='relu'"):
        ViTConfig(act="relu")


# ----------------------------------------------------------------------------------------------------
# Presets, training, command line


def test_presets_match_openai_sizes():
    """Our parameter count for each preset equals that of OpenAI's VisionTransformer (built on meta)."""
    clip_model = openai_clip_module()
    assert set(PRESETS) == {"ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336"}
    assert PRESETS["ViT-B/32"].width == 768 and PRESETS["ViT-L/14"].layers == 24
    assert PRESETS["ViT-L/14@336"].image_size == 336 and PRESETS["ViT-L/14"].embed_dim == 768
    for name, c in PRESETS.items():
        assert c.heads == c.width // 64, name
        with torch.device("meta"):
            ours = ViT(c)
            ref = clip_model.VisionTransformer(c.image_size, c.patch_size, c.width, c.layers, c.heads, c.embed_dim)
        assert n_params(ours) == n_params(ref), name
        if name == "ViT-B/32":
            assert n_params(ours) == 87_849_216  # the published CLIP ViT-B/32 image tower


def test_every_parameter_gets_a_gradient():
    model = ViT(ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=16))
    model.encode_image(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("which", ["hf", "openai"])
def test_cli_compare(hf_clip, openai_clip, which, capsys, tmp_path):
    """`python vit.py PATH --image photo.jpg --compare`, as a user runs it; user errors are one line."""
    from PIL import Image
    Image.radial_gradient("L").convert("RGB").save(tmp_path / "photo.jpg")
    path = str(hf_clip[1]["safetensors"]) if which == "hf" else str(openai_clip[1]["torchscript"])
    vit.main([path, "--image", str(tmp_path / "photo.jpg"), "--compare"])
    out = capsys.readouterr().out
    assert "parameters:" in out and "image embedding: (16,)" in out
    diffs = [float(line.rsplit(":", 1)[1]) for line in out.splitlines() if line.startswith("max abs diff")]
    assert len(diffs) == 2 and max(diffs) <= TOL, out
    Image.new("L", (64, 64)).save(tmp_path / "huge.png")
    Image.MAX_IMAGE_PIXELS, saved = 100, Image.MAX_IMAGE_PIXELS  # as if huge.png were a decompression bomb
    try:
        with pytest.raises(SystemExit, match="huge.png: DecompressionBombError"):
            vit.main([path, "--image", str(tmp_path / "huge.png")])
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    for argv, name in [([path + "/nowhere"], "nowhere"), ([path, "--image", str(tmp_path / "no.jpg")], "no.jpg")]:
        with pytest.raises(SystemExit, match=name) as exit_info:
            vit.main(argv)
        assert str(exit_info.value).startswith("vit.py: error:") and "\n" not in str(exit_info.value)
