"""vit.py: parity with Hugging Face CLIP, OpenAI's clip/model.py and open_clip; position interpolation;
loader errors."""
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
# open_clip format (OpenAI's names; head width and activation from open_clip_config.json), against open_clip


def open_clip_package():
    """open_clip's model code (open_clip_torch, installed with --no-deps). Its package __init__ builds the
    preprocessing from torchvision, and its utils.py imports one torchvision class (to freeze ResNet
    batch norms): the package is imported without its __init__, with a stand-in for that class, and
    neither the package nor the stand-in is left in sys.modules."""
    import sys
    import types
    import transformers  # noqa: F401  (open_clip imports it; it must look for torchvision before the stand-in)
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open_clip_torch==3.3.0, as .ci/run does)")
    names = ["open_clip", "torchvision", "torchvision.ops", "torchvision.ops.misc"]
    saved, before = {n: sys.modules.get(n) for n in names}, set(sys.modules)
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})  # used only to freeze ResNets
    sys.modules.update({"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                        "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc})
    try:
        package.model = importlib.import_module("open_clip.model")
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("open_clip", "torchvision"):
                del sys.modules[name]
        sys.modules.update({n: m for n, m in saved.items() if m is not None})
    return package


def open_clip_config(quick_gelu):
    """A tiny open_clip ViT whose conventions differ from OpenAI's where the tensors cannot show it:
    heads of width 32 (3 heads; OpenAI's rule, width // 64, would give 1) and, unless quick_gelu, GELU."""
    return {"embed_dim": 16, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32, "patch_size": 8,
                           "mlp_ratio": 2.51},  # 240.96: open_clip's MLP is int() of it wide, 240
            "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}}


OPENAI_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                     "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory):
    """Tiny random open_clip CLIPs saved as the hub lays them out: a folder holding open_clip_config.json
    and the weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)."""
    from safetensors.torch import save_file
    package = open_clip_package()
    out = {}
    for act, quick_gelu in (("gelu", False), ("quick_gelu", True)):
        torch.manual_seed(0)
        cfg = open_clip_config(quick_gelu)
        ref = perturb_(package.model.CLIP(**cfg)).eval()
        sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
        for fmt, name in (("safetensors", "open_clip_model.safetensors"), ("bin", "open_clip_pytorch_model.bin")):
            d = tmp_path_factory.mktemp(f"open_clip_{act}_{fmt}")
            hub_config = {"model_cfg": cfg, "preprocess_cfg": OPENAI_PREPROCESS}
            (d / "open_clip_config.json").write_text(json.dumps(hub_config))
            save_file(sd, str(d / name)) if fmt == "safetensors" else torch.save(sd, d / name)
            out[act, fmt] = d / name
        out[act] = ref
    return package, out


@pytest.mark.parametrize("act,fmt,where", [("gelu", "safetensors", "file"), ("gelu", "bin", "folder"),
                                           ("quick_gelu", "bin", "file")])
def test_open_clip_parity(open_clip_models, act, fmt, where):
    _, models = open_clip_models
    ref, file = models[act], models[act, fmt]
    ours = ViT.from_pretrained(str(file if where == "file" else file.parent))
    c = ours.config
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.hidden, c.embed_dim, c.act) == \
        (32, 8, 96, 2, 3, 240, 16, act)
    pixels = torch.randn(2, 3, 32, 32)
    captured = {}
    hook = ref.visual.transformer.register_forward_hook(lambda m, i, o: captured.update(h=o))  # batch-first
    with torch.no_grad():
        want_embed = ref.encode_image(pixels)
        embed, hidden = ours.encode_image(pixels), ours(pixels)
    hook.remove()
    assert captured["h"].shape == hidden.shape == (2, 17, 96)
    print(f"open_clip-{act}-{fmt}: max abs diff hidden {max_diff(hidden, captured['h']):.2e}, "
          f"image features {max_diff(embed, want_embed):.2e}")
    assert max_diff(embed, want_embed) <= TOL
    assert max_diff(hidden, captured["h"]) <= TOL


def test_open_clip_needs_its_config(open_clip_models, tmp_path):
    """Without the config the same tensors load under OpenAI's conventions, which compute something
    else: so the hub's file name, or open_clip's training checkpoint, without its config is refused."""
    package, models = open_clip_models
    ref, file = models["gelu"], models["gelu", "bin"]
    sd = torch.load(file, weights_only=True)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="open_clip_pytorch_model.bin: an open_clip checkpoint.*open_clip_config.json"):
        ViT.from_pretrained(str(tmp_path / "open_clip_pytorch_model.bin"))
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
               tmp_path / "epoch_3.pt")
    with pytest.raises(ValueError, match="epoch_3.pt: an open_clip checkpoint"):
        ViT.from_pretrained(str(tmp_path / "epoch_3.pt"))
    cfg = open_clip_config(quick_gelu=False)
    cfg["vision_cfg"]["mlp_ratio"] = 4.0  # OpenAI's, so that every tensor fits OpenAI's conventions
    torch.manual_seed(0)
    ref4 = perturb_(package.model.CLIP(**cfg)).eval()
    torch.save(ref4.state_dict(), tmp_path / "renamed.pt")
    as_openai = ViT.from_pretrained(str(tmp_path / "renamed.pt"))
    assert (as_openai.config.heads, as_openai.config.act) == (1, "quick_gelu")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(as_openai.encode_image(pixels), ref4.encode_image(pixels)) > 100 * TOL
        # open_clip's training checkpoint (DDP's "module." prefix) with a bare model config beside it
        (tmp_path / "open_clip_config.json").write_text(json.dumps(open_clip_config(quick_gelu=False)))
        ours = ViT.from_pretrained(str(tmp_path / "epoch_3.pt"))
        assert max_diff(ours.encode_image(pixels), ref.encode_image(pixels)) <= TOL
    # Hub folders with a config.json too: LAION's (a Hugging Face CLIP one; here without its weights)
    # and timm's (of another kind). Both are read as open_clip folders.
    for name, hf_config in (("laion", {"model_type": "clip"}), ("timm", {"architecture": "vit_base_patch16_clip_224"})):
        (tmp_path / name).mkdir()
        for f in (file, file.parent / "open_clip_config.json"):
            shutil.copy(f, tmp_path / name / f.name)
        (tmp_path / name / "config.json").write_text(json.dumps(hf_config))
        with torch.no_grad():
            ours = ViT.from_pretrained(str(tmp_path / name))
            assert max_diff(ours.encode_image(pixels), ref.encode_image(pixels)) <= TOL, name
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="empty: has open_clip_config.json but no weights file"):
        ViT.from_pretrained(str(tmp_path / "empty"))


def test_openai_archive_beside_an_open_clip_config(openai_clip, open_clip_models, tmp_path):
    """OpenAI's files keep OpenAI's conventions even in a folder that holds an open_clip config."""
    ref, files = openai_clip
    shutil.copy(open_clip_models[1]["gelu", "bin"].parent / "open_clip_config.json", tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    for fmt in ("plain", "torchscript"):
        shutil.copy(files[fmt], tmp_path / f"ViT-{fmt}.pt")
        ours = ViT.from_pretrained(str(tmp_path / f"ViT-{fmt}.pt"))
        assert (ours.config.heads, ours.config.act) == (2, "quick_gelu")
        with torch.no_grad():
            assert max_diff(ours.encode_image(pixels), ref.encode_image(pixels)) <= TOL


def vision(**kw):
    return lambda cfg: cfg["model_cfg"]["vision_cfg"].update(kw)


@pytest.mark.parametrize("edit,message", [
    (vision(pool_type="avg"), "pool_type='avg' is not supported"),
    (vision(final_ln_after_pool=True), "final_ln_after_pool=True"),
    (vision(no_ln_pre=True), "no_ln_pre=True"),
    (vision(ls_init_value=1e-4), "ls_init_value=0.0001"),
    (vision(norm_kwargs={"eps": 1e-6}), "norm_kwargs"),
    (vision(timm_model_name="vit_base_patch16_siglip_224"), "a timm image tower"),
    (vision(layers=[3, 4, 6, 3]), "a ResNet image tower"),
    (vision(some_new_option=1), "'some_new_option' is not one this loader knows"),
    (vision(head_width=0), "head_width 0"),
    (vision(image_size=[32, 48]), r"image_size=\[32, 48\]: only square"),
    (vision(image_size=36), "image_size 36 is not a multiple of patch_size 8"),
    (lambda cfg: cfg.update(model_cfg={"text_cfg": {}}), "not an open_clip config"),
])
def test_open_clip_config_errors(open_clip_models, tmp_path, edit, message):
    """Options that change what the tower computes, without changing its tensors, are refused by name."""
    file = open_clip_models[1]["gelu", "bin"]
    shutil.copy(file, tmp_path / file.name)
    cfg = json.loads((file.parent / "open_clip_config.json").read_text())
    edit(cfg)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as err:
        ViT.from_pretrained(str(tmp_path))
    assert "open_clip_config.json" in str(err.value)


@pytest.mark.parametrize("key,value,message", [("mean", [0.5, 0.5, 0.5], r"mean=\[0.5, 0.5, 0.5\]"),
                                               ("resize_mode", "squash", "resize_mode='squash'")])
def test_open_clip_other_preprocessing_warns(open_clip_models, tmp_path, key, value, message):
    """The tower loads exactly; that data.clip_preprocess prepares other pixels than it was trained on is
    said once, at load."""
    _, models = open_clip_models
    file = models["gelu", "bin"]
    shutil.copy(file, tmp_path / file.name)
    cfg = json.loads((file.parent / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"][key] = value
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=message + ".*data.clip_preprocess"):
        ours = ViT.from_pretrained(str(tmp_path))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours.encode_image(pixels), models["gelu"].encode_image(pixels)) <= TOL


def test_open_clip_options_that_change_nothing(open_clip_models, tmp_path):
    """Training-time options and open_clip's spelled-out defaults load (and still match open_clip)."""
    _, models = open_clip_models
    file = models["gelu", "bin"]
    shutil.copy(file, tmp_path / file.name)
    cfg = json.loads((file.parent / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"].update(patch_dropout=0.5, output_tokens=True, pool_type="tok", act_kwargs={},
                                          block_type="default", image_size=[32, 32])
    cfg["preprocess_cfg"] = {**cfg["preprocess_cfg"], "mean": [0.4814547, 0.4578275, 0.4082107]}  # rounded
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    ours, pixels = ViT.from_pretrained(str(tmp_path)), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours.encode_image(pixels), models["gelu"].encode_image(pixels)) <= TOL


def test_open_clip_preprocessing_is_data_py():
    """The preprocessing an open_clip config must ask for is data.clip_preprocess's."""
    import data
    assert tuple(vit.OPEN_CLIP_PREPROCESS["mean"]) == data.CLIP_MEAN
    assert tuple(vit.OPEN_CLIP_PREPROCESS["std"]) == data.CLIP_STD


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


def test_layernorm_returns_its_input_dtype(monkeypatch):
    """vit.LayerNorm with fp32 weights (a trained ViT) on a bf16 input (the patch embedding under
    autocast) returns bf16, with or without autocast: the fp32 computation's numbers to within the
    rounding of the output and of the weights cast to bf16; its weights' gradients stay fp32. An fp32
    input is plain layer_norm, also under autocast. What only CUDA would show (its autocast runs
    layer_norm in fp32; the CPU's leaves it alone) is checked by how the kernel is called: with autocast
    off and the weights in the input's dtype."""
    calls = []
    layer_norm = torch.nn.functional.layer_norm

    def recording(x, shape, weight=None, bias=None, eps=1e-5):
        calls.append((x.dtype, weight.dtype if weight is not None else None, torch.is_autocast_enabled("cpu")))
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", recording)
    torch.manual_seed(0)
    ln = vit.LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.3)
        ln.bias.normal_(0.0, 0.3)
    x = (3 * torch.randn(4, 33, 64) + 1).to(torch.bfloat16)
    norm = torch.nn.functional.layer_norm(x.float(), (64,))  # (x - mean) / std, fp32
    exact = norm * ln.weight + ln.bias
    bound = 2 ** -8 * (norm * ln.weight).abs() + 2 ** -8 * ln.bias.abs() + 2 ** -8 * exact.abs() + 1e-6
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ln(x)
        assert y.dtype == torch.bfloat16
        assert ((y.float() - exact).abs() <= bound).all()
        assert calls.pop() == (torch.bfloat16, torch.bfloat16, False)
    ln.zero_grad()
    ln(x).float().square().sum().backward()
    want = torch.autograd.grad(exact.square().sum(), (ln.weight, ln.bias))
    for got, w in zip((ln.weight.grad, ln.bias.grad), want):
        assert got.dtype == torch.float32 and (got - w).norm() <= 2e-2 * w.norm()
    x32 = x.float().requires_grad_()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ln(x32)
        assert y.dtype == torch.float32 and calls[-1] == (torch.float32, torch.float32, False)
        assert torch.equal(y, layer_norm(x32, (64,), ln.weight, ln.bias, ln.eps))
    # no weights (elementwise_affine=False): normalisation alone, in the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = vit.LayerNorm(64, elementwise_affine=False)(x)
    assert y.dtype == torch.bfloat16 and ((y.float() - norm).abs() <= 2 ** -8 * norm.abs() + 1e-6).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
def test_gpu_residual_stream_stays_bf16_under_cuda_autocast(ops_making):
    """CUDA autocast runs LayerNorm in fp32; a plain nn.LayerNorm would then make the ViT's whole
    residual stream fp32, forward and backward. Ours returns bf16, as OpenAI's CLIP code does: no fp32
    (B, 1+N, width) tensor is made, and the output stays near the fp32 model's."""
    model = perturb_(ViT(ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=None)))
    model = model.cuda()
    pixels = torch.randn(3, 3, 32, 32, device="cuda")
    with torch.no_grad():
        want = model(pixels)
    mode = ops_making(lambda t: t.dtype == torch.float32 and t.shape == want.shape, matmuls=True)
    with mode:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(pixels)
        (hidden * hidden).sum().backward()  # a bf16 loss: any fp32 (B, 1+N, width) tensor is the model's
    assert hidden.dtype == torch.bfloat16 and model.conv1.weight.grad.dtype == torch.float32
    assert mode.ops == [], f"fp32 activations made by {mode.ops}"
    assert (hidden.float() - want).norm() <= 3e-2 * want.norm()


def test_attention_gradient_reaches_the_qkv_projection_in_one_copy(ops_making):
    """Backward, the gradients of q, k and v are stacked straight into the projection's (B, T, 3, H, D)
    layout: one pass over a (B, T, 3 * width) tensor besides the matmuls, not a stack and then a copy."""
    cfg = ViTConfig(image_size=32, patch_size=8, width=64, layers=1, heads=2, embed_dim=None)
    attn = perturb_(vit.Attention(cfg))
    x = torch.randn(2, 17, 64, requires_grad=True)
    mode = ops_making(lambda t: t.numel() == 2 * 17 * 3 * 64)
    with mode:
        attn(x).square().sum().backward()
    assert mode.ops == ["stack.default"], mode.ops
    assert x.grad is not None and attn.qkv.weight.grad.abs().sum() > 0


def test_quick_gelu_mlp_is_one_silu_each_way(ops_making):
    """The MLP computes c_proj(x * sigmoid(1.702 x)) as SiLU with 1.702 folded into the weights: the
    same output and gradients as the formula (fp32), and one elementwise pass over the (B, T, hidden)
    activation forward and one backward, where the formula takes three and five."""
    cfg = ViTConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, embed_dim=None)
    mlp = perturb_(vit.MLP(cfg))
    x = (2 * torch.randn(2, 17, 32)).requires_grad_()
    results = []
    for fused in (True, False):
        mlp.zero_grad()
        x.grad = None
        mode = ops_making(lambda t: t.numel() == 2 * 17 * cfg.hidden)
        with mode:
            y = mlp(x) if fused else mlp.c_proj(vit.quick_gelu(mlp.c_fc(x)))
            y.square().sum().backward()
        results.append([y, x.grad] + [p.grad for p in mlp.parameters()])
        if fused:
            assert mode.ops == ["silu.default", "silu_backward.default"], mode.ops
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(*results))  # fp32 rounding


@pytest.mark.parametrize("which", ["hf", "openai", "open_clip"])
def test_cli_compare(hf_clip, openai_clip, open_clip_models, which, capsys, tmp_path, monkeypatch):
    """`python vit.py PATH --image photo.jpg --compare`, as a user runs it; user errors are one line."""
    from PIL import Image
    Image.radial_gradient("L").convert("RGB").save(tmp_path / "photo.jpg")
    path = {"hf": lambda: hf_clip[1]["safetensors"], "openai": lambda: openai_clip[1]["torchscript"],
            "open_clip": lambda: open_clip_models[1]["gelu", "safetensors"].parent}[which]()
    path = str(path)
    monkeypatch.setitem(__import__("sys").modules, "open_clip", open_clip_models[0])  # as if installed normally
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
