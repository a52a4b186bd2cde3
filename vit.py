"""The vision transformer (CLIP-style) and its loaders for public CLIP checkpoints.

CLIP's image tower (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision", section 2.4). MAGMA's released model encodes images with CLIP's ResNet RN50x16 (its grid
features; arXiv 2112.05253, section 3.1) and tries CLIP's ViT in ablations; this codebase uses the ViT:

    pixels (B, 3, S, S)
      -> conv1: a stride-p convolution without bias, i.e. one linear map per p x p patch  (B, N, width)
      -> prepend a learned class token, add learned position embeddings                   (B, 1+N, width)
      -> ln_pre, then `layers` pre-norm residual blocks: x + attn(ln_1(x)), x + mlp(ln_2(x))
      => forward() returns these hidden states                                            (B, 1+N, width)
      -> ln_post on the class token, @ proj                                                (B, embed_dim)
      => encode_image() returns CLIP's image embedding

MAGMA feeds the hidden states (not the pooled embedding) to its image prefix.

Loaders (`ViT.from_pretrained`) read the formats users have on disk, by explicit name tables:
- an OpenAI CLIP archive (`ViT-B-16.pt`): a TorchScript archive of fp16 weights, or a plain state dict
  with the same names (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`...);
  the size is read off the tensor shapes, as OpenAI's own `build_model` does;
- an open_clip checkpoint (LAION, DataComp, MetaCLIP, DFN: `open_clip_model.safetensors`,
  `open_clip_pytorch_model.bin`..., the folder holding it, or open_clip's own `epoch_N.pt`): OpenAI's
  names, with the head width and the activation, which the tensors do not show, read from the
  `open_clip_config.json` beside it;
- a Hugging Face CLIP directory (`CLIPModel`, `CLIPVisionModel` or `CLIPVisionModelWithProjection`).
The text tower in any of these files is skipped; every vision tensor is checked (gpt.load_checked).

`python vit.py PATH --image photo.jpg [--compare]` is the sanity check for a downloaded checkpoint.
"""
import argparse
import math
import os
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attention
from gpt import load_checked, read_checkpoint_file, read_hf_weights, read_json


# ----------------------------------------------------------------------------------------------------
# Config and presets


QUICK_GELU_SCALE = 1.702


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU; its checkpoints were trained with it. (The MLP
    below computes it as SiLU, with the scale folded into its weights.)"""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" is the exact (erf) GELU


@dataclass
class ViTConfig:
    """Sizes of a CLIP vision transformer. Defaults are ViT-B/32."""
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int | None = 512  # None: no projection (a CLIPVisionModel checkpoint has none)
    act: str = "quick_gelu"
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation act={self.act!r}; supported: {sorted(ACTIVATIONS)}")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def hidden(self):  # the MLP width (the presets give it as a ratio, as the CLIP paper's table does)
        return round(self.width * self.mlp_ratio)


# The published CLIP sizes (Radford et al., 2021, table 20). Heads are width // 64 throughout.
PRESETS = {
    "ViT-B/32": ViTConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12, embed_dim=512),
    "ViT-B/16": ViTConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=512),
    "ViT-L/14": ViTConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768),
    "ViT-L/14@336": ViTConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768),
}


# ----------------------------------------------------------------------------------------------------
# The model


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that returns its input's dtype, as the LayerNorm of OpenAI's CLIP code (and
    open_clip's) does.

    It matters under CUDA autocast, which runs every LayerNorm in fp32: a plain nn.LayerNorm there
    returns fp32 and so turns the whole residual stream fp32 (every residual add, the next LayerNorm, a
    copy back to bf16 before each matmul, and the same again in the backward). Here the bf16 input (the
    patch embedding's output under autocast) is normalised by the bf16 kernel, with autocast off and the
    fp32 weights cast to bf16; the kernel accumulates the mean and variance in fp32 and rounds once, so
    the result differs from OpenAI's (fp32 throughout, then one rounding) only by the weights' rounding.
    The stream stays bf16, as in those codebases' mixed-precision training. An input in the weights'
    dtype without autocast (fp32 training, a model converted to fp16) takes plain nn.LayerNorm."""

    def forward(self, x):  # (..., width)
        if (self.weight is None or x.dtype == self.weight.dtype) and not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        weight, bias = (None if p is None else p.to(x.dtype) for p in (self.weight, self.bias))
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask: every patch sees every patch)."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)  # rows [q; k; v], OpenAI's in_proj layout
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)
        # Split off q, k, v first, then move the heads forward: backward, autograd stacks their gradients
        # straight into the (B, T, 3, H, D) layout (one copy; splitting last would add a second).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, T, D)
        y = attention(q, k, v)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    """width -> hidden -> width with QuickGELU or GELU in between. (With QuickGELU, forward() applies
    c_fc's and c_proj's weights through F.linear, so hooks on those two modules do not run.)"""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.width, config.hidden)
        self.c_proj = nn.Linear(config.hidden, config.width)
        self.act = ACTIVATIONS[config.act]

    def forward(self, x):
        if self.act is not quick_gelu:
            return self.c_proj(self.act(self.c_fc(x)))
        # x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, and both constants fold into the weights on
        # either side: the activation becomes SiLU, one fused kernel each way, instead of three passes
        # (scale, sigmoid, multiply) and their backward over the ViT's largest activation, the
        # (B, T, hidden) one. Scaling a weight touches width * hidden numbers, not B * T * hidden.
        h = F.linear(x, self.c_fc.weight * QUICK_GELU_SCALE, self.c_fc.bias * QUICK_GELU_SCALE)  # 1.702 h
        return F.linear(F.silu(h), self.c_proj.weight / QUICK_GELU_SCALE, self.c_proj.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.width, eps=config.ln_eps)
        self.attn = Attention(config)
        self.ln_2 = LayerNorm(config.width, eps=config.ln_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """CLIP's vision transformer: forward() gives hidden states, encode_image() the CLIP embedding."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        w = config.width
        scale = w ** -0.5  # OpenAI's initialisation of the embeddings and the projection
        # A convolution with kernel = stride = patch is one shared linear map per non-overlapping patch.
        self.conv1 = nn.Conv2d(3, w, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid ** 2 + 1, w))
        self.ln_pre = LayerNorm(w, eps=config.ln_eps)  # CLIP's one addition to ViT: a LayerNorm before the blocks
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.ln_post = LayerNorm(w, eps=config.ln_eps)
        self.proj = None if config.embed_dim is None else nn.Parameter(scale * torch.randn(w, config.embed_dim))

    def forward(self, pixels):
        """pixels (B, 3, S, S), CLIP-normalised (data.clip_preprocess) -> the last block's hidden
        states (B, 1+N, width)."""
        S = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"pixels must have shape (B, 3, {S}, {S}) for this ViT, got {tuple(pixels.shape)}")
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width), patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+N, width)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return x

    def encode_image(self, pixels):
        """pixels (B, 3, S, S) -> CLIP's image embedding (B, embed_dim): ln_post(class token) @ proj."""
        if self.proj is None:
            raise ValueError("this ViT has no projection (embed_dim=None, e.g. loaded from a CLIPVisionModel "
                             "checkpoint), so encode_image is unavailable; forward() gives the hidden states")
        x = self.forward(pixels)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)

    @classmethod
    def from_pretrained(cls, path, image_size=None, dtype=torch.float32):
        """Load an OpenAI CLIP archive (.pt file), an open_clip checkpoint (its weights file or folder,
        with open_clip_config.json), or a Hugging Face CLIP directory.

        image_size: build the model for this input size instead of the checkpoint's, interpolating the
        position embedding over the patch grid. dtype: of the returned model (fp16 archives load as fp32).
        """
        if is_open_clip_folder(path):
            config, state_dict, source, names = read_openai_clip(open_clip_weights(path))
        elif os.path.isdir(path):
            config, state_dict, source, names = read_hf_clip(path)
        elif os.path.isfile(path):
            config, state_dict, source, names = read_openai_clip(path)
        else:
            raise FileNotFoundError(f"no CLIP checkpoint at {path}: expected an OpenAI CLIP archive (.pt), "
                                    "an open_clip weights file or folder, or a Hugging Face CLIP directory")
        if image_size is not None and image_size != config.image_size:
            new = replace(config, image_size=image_size)  # validates image_size against patch_size
            pos = state_dict.get("positional_embedding")
            if pos is not None and pos.shape[0] == config.grid ** 2 + 1:  # else load_checked names the bad shape
                state_dict["positional_embedding"] = resize_positional_embedding(pos, new.grid)
            config = new
        model = load_checked(cls(config), state_dict, source, names=names)
        return model.to(dtype).eval()


def resize_positional_embedding(pos, grid):
    """(1 + g*g, width) -> (1 + grid*grid, width): bicubic over the 2-D patch grid, class position kept."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    g = math.isqrt(patch_pos.shape[0])
    width = pos.shape[1]
    patch_pos = patch_pos.float().reshape(1, g, g, width).permute(0, 3, 1, 2)  # (1, width, g, g)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, width)  # (grid*grid, width)
    return torch.cat([cls_pos, patch_pos.to(pos.dtype)])


# ----------------------------------------------------------------------------------------------------
# Loading public checkpoints: one visible table per format, checkpoint name -> our name.
# "{i}" stands for the block number.

OPENAI_NAMES = {
    "visual.conv1.weight": "conv1.weight",
    "visual.class_embedding": "class_embedding",
    "visual.positional_embedding": "positional_embedding",
    "visual.ln_pre.weight": "ln_pre.weight",
    "visual.ln_pre.bias": "ln_pre.bias",
    "visual.transformer.resblocks.{i}.ln_1.weight": "blocks.{i}.ln_1.weight",
    "visual.transformer.resblocks.{i}.ln_1.bias": "blocks.{i}.ln_1.bias",
    "visual.transformer.resblocks.{i}.attn.in_proj_weight": "blocks.{i}.attn.qkv.weight",
    "visual.transformer.resblocks.{i}.attn.in_proj_bias": "blocks.{i}.attn.qkv.bias",
    "visual.transformer.resblocks.{i}.attn.out_proj.weight": "blocks.{i}.attn.proj.weight",
    "visual.transformer.resblocks.{i}.attn.out_proj.bias": "blocks.{i}.attn.proj.bias",
    "visual.transformer.resblocks.{i}.ln_2.weight": "blocks.{i}.ln_2.weight",
    "visual.transformer.resblocks.{i}.ln_2.bias": "blocks.{i}.ln_2.bias",
    "visual.transformer.resblocks.{i}.mlp.c_fc.weight": "blocks.{i}.mlp.c_fc.weight",
    "visual.transformer.resblocks.{i}.mlp.c_fc.bias": "blocks.{i}.mlp.c_fc.bias",
    "visual.transformer.resblocks.{i}.mlp.c_proj.weight": "blocks.{i}.mlp.c_proj.weight",
    "visual.transformer.resblocks.{i}.mlp.c_proj.bias": "blocks.{i}.mlp.c_proj.bias",
    "visual.ln_post.weight": "ln_post.weight",
    "visual.ln_post.bias": "ln_post.bias",
    "visual.proj": "proj",  # stored [width, embed_dim], used as x @ proj: no transpose
}

# Hugging Face keeps q, k, v as three Linears; they are renamed to attn.q/k/v here and stacked into our
# qkv (rows [q; k; v]) by fuse_qkv. HF's Linear for the projection is [embed_dim, width]: transposed.
HF_NAMES = {
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",  # sic: the real checkpoints spell it so
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.encoder.layers.{i}.layer_norm1.weight": "blocks.{i}.ln_1.weight",
    "vision_model.encoder.layers.{i}.layer_norm1.bias": "blocks.{i}.ln_1.bias",
    "vision_model.encoder.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q.weight",
    "vision_model.encoder.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.q.bias",
    "vision_model.encoder.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k.weight",
    "vision_model.encoder.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.attn.k.bias",
    "vision_model.encoder.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v.weight",
    "vision_model.encoder.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.v.bias",
    "vision_model.encoder.layers.{i}.self_attn.out_proj.weight": "blocks.{i}.attn.proj.weight",
    "vision_model.encoder.layers.{i}.self_attn.out_proj.bias": "blocks.{i}.attn.proj.bias",
    "vision_model.encoder.layers.{i}.layer_norm2.weight": "blocks.{i}.ln_2.weight",
    "vision_model.encoder.layers.{i}.layer_norm2.bias": "blocks.{i}.ln_2.bias",
    "vision_model.encoder.layers.{i}.mlp.fc1.weight": "blocks.{i}.mlp.c_fc.weight",
    "vision_model.encoder.layers.{i}.mlp.fc1.bias": "blocks.{i}.mlp.c_fc.bias",
    "vision_model.encoder.layers.{i}.mlp.fc2.weight": "blocks.{i}.mlp.c_proj.weight",
    "vision_model.encoder.layers.{i}.mlp.fc2.bias": "blocks.{i}.mlp.c_proj.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
    "visual_projection.weight": "proj",
}
HF_TRANSPOSED = {"visual_projection.weight"}


def file_names(table, layers):
    """{our name: the checkpoint's name} for every row of `table`, so errors name what is in the file."""
    out = {}
    for theirs, ours in table.items():
        for i in range(layers) if "{i}" in theirs else [None]:
            out[ours.format(i=i)] = theirs.format(i=i)
    return out


def rename(state_dict, table):
    """Translate names through `table`; names it does not know pass unchanged, so that load_checked
    reports them as unexpected under the checkpoint's own name."""
    out = {}
    for name, tensor in state_dict.items():
        generic = re.sub(r"\.(\d+)\.", ".{i}.", name, count=1)
        target = table.get(generic)
        if target is None:
            out[name] = tensor
        else:
            block = re.search(r"\.(\d+)\.", name)
            out[target.format(i=block.group(1)) if block else target] = tensor
    return out


def is_torchscript(path):
    """A TorchScript archive is a zip holding compiled code and constants.pkl (torch.save zips have neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_openai_state_dict(path):
    """(raw state dict, open_clip config file or None) of an OpenAI CLIP archive (TorchScript as released,
    or a plain state dict) or of an open_clip checkpoint (the same names, its config beside it)."""
    if is_torchscript(path):
        try:
            raw = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"{path}: could not load the TorchScript archive ({type(e).__name__}: {e})") from None
    else:
        raw = read_checkpoint_file(path)
    training = isinstance(raw.get("state_dict"), dict)  # open_clip's own epoch_N.pt: {"epoch", "state_dict", ...}
    if training:
        raw = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}  # DDP's prefix
    if not any(k.startswith("visual.") for k in raw) and "conv1.weight" in raw:
        raw = {"visual." + k: v for k, v in raw.items()}  # a bare vision tower saved on its own
    if not (training or os.path.basename(path) in OPEN_CLIP_WEIGHTS):
        return raw, None  # OpenAI's file (TorchScript as released, or any other name): OpenAI's conventions
    config_file = os.path.join(os.path.dirname(os.path.abspath(path)), OPEN_CLIP_CONFIG)
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: an open_clip checkpoint, whose activation (GELU or QuickGELU) and head "
                         f"width are not in its tensors; put its {OPEN_CLIP_CONFIG} beside it (the hub "
                         "ships one; for your own run, open_clip's model_configs/<model>.json will do)")
    return raw, config_file


def read_openai_clip(path):
    """OpenAI CLIP archive or open_clip weights file -> (ViTConfig, state dict in our names, source,
    {our name: file's name}).

    For OpenAI's files the sizes come from the tensor shapes, as in OpenAI's build_model. For open_clip's
    (its file names, or its training checkpoint), the open_clip_config.json beside it gives them."""
    raw, config_file = read_openai_state_dict(path)
    if "visual.layer1.0.conv1.weight" in raw:
        raise ValueError(f"{path}: a ResNet CLIP checkpoint (RN50 family); only the ViT models are supported")
    if "visual.conv1.weight" not in raw:
        raise ValueError(f"{path}: not an OpenAI CLIP checkpoint (no tensor 'visual.conv1.weight'; "
                         f"found e.g. {sorted(raw)[:5]})")
    # Everything outside visual.* is the text tower (and scalars like input_resolution): skipped.
    visual = {k: v for k, v in raw.items() if k.startswith("visual.")}
    for name in ("visual.positional_embedding", "visual.proj"):
        if name not in visual:
            raise ValueError(f"{path}: missing tensor {name!r} (needed to infer the model size)")
    width, _, patch, _ = visual["visual.conv1.weight"].shape
    n_pos = visual["visual.positional_embedding"].shape[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid + 1 != n_pos:
        raise ValueError(f"{path}: tensor 'visual.positional_embedding' has {n_pos} rows, not 1 + a square grid")
    if config_file is not None:
        config = read_open_clip_config(config_file)
    else:
        blocks = [int(m.group(1)) for k in visual if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))]
        config = ViTConfig(image_size=patch * grid, patch_size=patch, width=width, layers=max(blocks, default=-1) + 1,
                           heads=width // 64, embed_dim=visual["visual.proj"].shape[1], act="quick_gelu", ln_eps=1e-5)
    return config, rename(visual, OPENAI_NAMES), path, file_names(OPENAI_NAMES, config.layers)


# open_clip (github.com/mlfoundations/open_clip; the LAION, DataComp, MetaCLIP and DFN models) saves its
# ViTs under OpenAI's names, but two things its tensors do not show differ from OpenAI's: the head width
# (80 for ViT-H/14, 88 for ViT-g/14, 104 for ViT-bigG/14; 64 at OpenAI) and the activation (exact GELU,
# unless the config says quick_gelu). Its config file, which the hub puts beside the weights, says both.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",  # open_clip's names,
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # in its order of preference
OPEN_CLIP_SIZES = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")  # read
OPEN_CLIP_OPTIONS = {  # options our ViT does not have: loadable only at open_clip's defaults
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
    "input_patchnorm": False, "global_average_pool": False,  # the names of older open_clip versions
}
OPEN_CLIP_IGNORED = {  # no effect on what the loaded tower computes (training-time, or for options refused above)
    "patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
    "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
}
# data.clip_preprocess resizes the shorter side (bicubic), crops the centre and normalises with OpenAI's
# mean and std (data.CLIP_MEAN, CLIP_STD). A model trained on other pixels (DFN's squashed images, say)
# loads with a warning: its features are right for its own preprocessing, not quite for ours.
OPEN_CLIP_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                        "interpolation": "bicubic", "resize_mode": "shortest"}


def is_open_clip_folder(path):
    """A folder with open_clip_config.json and no Hugging Face CLIP model (the hub's LAION folders have both:
    the Hugging Face files are read then; timm's folders have a config.json of another kind)."""
    if not os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        return False
    hf_config = os.path.join(path, "config.json")
    hf_clip = os.path.isfile(hf_config) and read_json(hf_config).get("model_type") in ("clip", "clip_vision_model")
    hf_weights = any(os.path.isfile(os.path.join(path, name)) for name in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))
    return not (hf_clip and hf_weights)


def open_clip_weights(folder):
    """The weights file of an open_clip folder (what open_clip's push_to_hf_hub writes)."""
    for name in OPEN_CLIP_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder}: has {OPEN_CLIP_CONFIG} but no weights file ({' or '.join(OPEN_CLIP_WEIGHTS)})")


def read_open_clip_config(config_file):
    """open_clip_config.json -> ViTConfig. Either the hub's {"model_cfg": ..., "preprocess_cfg": ...} or
    a bare model config (open_clip's model_configs/<model>.json); anything our ViT cannot compute is refused."""
    cfg = read_json(config_file)
    model_cfg = cfg.get("model_cfg", cfg)
    vision = model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None
    if not isinstance(vision, dict) or "embed_dim" not in model_cfg:
        raise ValueError(f"{config_file}: not an open_clip config (no 'vision_cfg' and 'embed_dim')")
    if vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int):
        raise ValueError(f"{config_file}: a {'timm' if vision.get('timm_model_name') else 'ResNet'} image tower; "
                         "only open_clip's own ViT (the CLIP architecture) is supported")
    for key, value in vision.items():
        if key in OPEN_CLIP_OPTIONS:
            unset = value is None or value == {} or (key, value) == ("block_type", "default")  # open_clip's default too
            if value != OPEN_CLIP_OPTIONS[key] and not unset:
                raise ValueError(f"{config_file}: vision_cfg {key}={value!r} is not supported (only "
                                 f"{OPEN_CLIP_OPTIONS[key]!r}): this ViT would compute something else")
        elif key not in OPEN_CLIP_IGNORED and key not in OPEN_CLIP_SIZES:
            raise ValueError(f"{config_file}: vision_cfg option {key!r} is not one this loader knows")
    preprocess = cfg.get("preprocess_cfg") or {}
    for key, want in OPEN_CLIP_PREPROCESS.items():
        value = preprocess.get(key)
        if isinstance(want, str):
            same = value in (None, want)
        else:  # mean, std: three numbers, as printed to JSON
            same = value is None or (isinstance(value, (list, tuple)) and len(value) == 3
                                     and all(abs(a - b) <= 1e-6 for a, b in zip(value, want)))
        if not same:  # the tower itself loads exactly; the pixels data.py gives it are what differs
            warnings.warn(f"{config_file}: preprocess_cfg {key}={value!r}, but data.clip_preprocess uses {want!r} "
                          "(OpenAI's CLIP preprocessing): this model was trained on other pixels", stacklevel=2)
    sizes = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "head_width": 64, "mlp_ratio": 4.0,
             **{k: vision[k] for k in OPEN_CLIP_SIZES if k in vision}}  # open_clip's CLIPVisionCfg defaults
    for key in ("image_size", "patch_size"):
        if isinstance(sizes[key], (list, tuple)):
            if len(set(sizes[key])) != 1:
                raise ValueError(f"{config_file}: vision_cfg {key}={sizes[key]}: only square sizes are supported")
            sizes[key] = sizes[key][0]
    if not isinstance(sizes["head_width"], int) or sizes["head_width"] <= 0 or sizes["width"] % sizes["head_width"]:
        raise ValueError(f"{config_file}: width {sizes['width']} is not a multiple of head_width {sizes['head_width']}")
    try:
        return ViTConfig(image_size=sizes["image_size"], patch_size=sizes["patch_size"], width=sizes["width"],
                         layers=sizes["layers"], heads=sizes["width"] // sizes["head_width"],
                         mlp_ratio=int(sizes["width"] * sizes["mlp_ratio"]) / sizes["width"],  # open_clip truncates
                         embed_dim=model_cfg["embed_dim"],
                         act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", ln_eps=1e-5)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from None


HF_VISION_DEFAULTS = {  # transformers' CLIPVisionConfig defaults, for keys an older config.json leaves out
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


def read_hf_clip(path):
    """Hugging Face CLIP directory -> (ViTConfig, state dict in our names, source, {our name: file's name})."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json, so not a Hugging Face model directory")
    hf = read_json(config_file)
    model_type = hf.get("model_type")
    if model_type == "clip":
        vision = hf.get("vision_config") or {}
    elif model_type == "clip_vision_model":
        vision = hf
    else:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a CLIP model; "
                         "supported: 'clip', 'clip_vision_model'")
    v = {**HF_VISION_DEFAULTS, **vision}
    raw, _, source = read_hf_weights(path)  # model.safetensors, its sharded index, or pytorch_model.bin
    if model_type == "clip_vision_model" and not any(k.startswith("vision_model.") for k in raw):
        # transformers >= 5 saves a CLIPVisionModel without the "vision_model." prefix older files have
        raw = {(k if k == "visual_projection.weight" else "vision_model." + k): t for k, t in raw.items()}
    if model_type == "clip":
        embed_dim = hf.get("projection_dim", 512)
    else:  # CLIPVisionModelWithProjection has the projection, CLIPVisionModel does not
        embed_dim = raw["visual_projection.weight"].shape[0] if "visual_projection.weight" in raw else None
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu"}.get(v["hidden_act"])
    if act is None:
        raise ValueError(f"{config_file}: hidden_act {v['hidden_act']!r} is not supported; "
                         "supported: 'quick_gelu', 'gelu'")
    image_size, patch_size = (int(s[0]) if isinstance(s, (list, tuple)) else int(s)
                              for s in (v["image_size"], v["patch_size"]))
    config = ViTConfig(image_size=image_size, patch_size=patch_size, width=v["hidden_size"],
                       layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                       mlp_ratio=v["intermediate_size"] / v["hidden_size"], embed_dim=embed_dim,
                       act=act, ln_eps=v["layer_norm_eps"])
    # Skipped: the text tower, the logit scale, and the position_ids index buffers old files carry.
    kept = {k: t for k, t in raw.items()
            if not (k.startswith(("text_model.", "text_projection.")) or k == "logit_scale"
                    or k.endswith("position_ids"))}
    kept = {k: (t.t() if k in HF_TRANSPOSED else t) for k, t in kept.items()}
    return config, fuse_qkv(rename(kept, HF_NAMES), config, source), source, file_names(HF_NAMES, config.layers)


def fuse_qkv(state_dict, config, source):
    """Stack each block's separate q, k, v (weight and bias) into our qkv, rows [q; k; v]."""
    w = config.width
    for i in range(config.layers):
        for kind, shape in (("weight", (w, w)), ("bias", (w,))):
            names = [f"blocks.{i}.attn.{p}.{kind}" for p in "qkv"]
            for p, name in zip("qkv", names):
                hf_name = f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"
                if name not in state_dict:
                    raise ValueError(f"{source}: missing tensor {hf_name!r}")
                if tuple(state_dict[name].shape) != shape:
                    raise ValueError(f"{source}: tensor {hf_name!r} has shape {tuple(state_dict[name].shape)}, "
                                     f"the model expects {shape}")
            state_dict[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state_dict.pop(n) for n in names])
    return state_dict


# ----------------------------------------------------------------------------------------------------
# Command line: load a checkpoint, embed one image, optionally compare with the reference implementation.


def load_reference_openai_model_file():
    """OpenAI's clip/model.py from the clip-anytorch package, imported by file path (its __init__ needs
    torchvision)."""
    import importlib.util
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("--compare on an OpenAI archive needs the clip-anytorch package "
                          "(pip install --no-deps clip-anytorch)")
    file = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_reference_open_clip_tower(config_file):
    """open_clip's own image tower, built from the config as open_clip builds it (random weights)."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"--compare on an open_clip checkpoint needs open_clip (pip install open_clip_torch): "
                          f"{e}") from None
    cfg = read_json(config_file)
    model_cfg = cfg.get("model_cfg", cfg)
    return open_clip.model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                               quick_gelu=bool(model_cfg.get("quick_gelu", False)))


@torch.no_grad()
def compare_with_reference(path, model, pixels):
    """Run the reference implementation on the same checkpoint and pixels; return {output: max abs diff}."""
    ours_hidden = model(pixels)
    ours_embed = model.encode_image(pixels) if model.proj is not None else None
    if os.path.isdir(path) and not is_open_clip_folder(path):
        import transformers
        transformers.utils.logging.disable_progress_bar()
        model_type = read_json(os.path.join(path, "config.json"))["model_type"]
        if model_type == "clip":
            ref = transformers.CLIPModel.from_pretrained(path).float().eval()
            ref_hidden = ref.vision_model(pixel_values=pixels).last_hidden_state
            out = ref.get_image_features(pixel_values=pixels)
            ref_embed = out if isinstance(out, torch.Tensor) else out.pooler_output
        elif ours_embed is None:
            ref = transformers.CLIPVisionModel.from_pretrained(path).float().eval()
            ref_hidden, ref_embed = ref(pixel_values=pixels).last_hidden_state, None
        else:
            ref = transformers.CLIPVisionModelWithProjection.from_pretrained(path).float().eval()
            out = ref(pixel_values=pixels)
            ref_hidden, ref_embed = out.last_hidden_state, out.image_embeds
    else:
        raw, config_file = read_openai_state_dict(open_clip_weights(path) if os.path.isdir(path) else path)
        if config_file is None:
            c = model.config
            ref = load_reference_openai_model_file().VisionTransformer(
                input_resolution=c.image_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                heads=c.heads, output_dim=c.embed_dim)
        else:
            ref = load_reference_open_clip_tower(config_file)
        ref.load_state_dict({k[len("visual."):]: v for k, v in raw.items() if k.startswith("visual.")})
        ref = ref.float().eval()
        captured = {}
        # OpenAI (and open_clip before 2.24) run the blocks sequence-first (L, B, D): the hook turns it back
        ref.transformer.register_forward_hook(lambda m, i, o: captured.update(
            hidden=o if getattr(m, "batch_first", False) else o.permute(1, 0, 2)))
        ref_embed = ref(pixels)
        ref_hidden = captured["hidden"]
    diffs = {"hidden states": (ours_hidden - ref_hidden).abs().max().item()}
    if ours_embed is not None:
        diffs["image embedding"] = (ours_embed - ref_embed).abs().max().item()
    return diffs


def main(argv=None):
    """Entry point of `python vit.py PATH --image photo.jpg [--compare]`."""
    parser = argparse.ArgumentParser(description="Load a CLIP vision transformer and embed one image: "
                                                 "a sanity check for a downloaded checkpoint.")
    parser.add_argument("path", help="OpenAI CLIP archive (e.g. ViT-B-16.pt), open_clip weights file or folder "
                                     "(open_clip_config.json beside the weights), or Hugging Face CLIP directory")
    parser.add_argument("--image", help="image file (default: a synthetic colour gradient)")
    parser.add_argument("--compare", action="store_true",
                        help="also run the reference implementation (transformers for a Hugging Face "
                             "directory, open_clip for an open_clip checkpoint, OpenAI's clip/model.py for an "
                             "archive) and print the largest absolute difference")
    args = parser.parse_args(argv)
    try:
        from PIL import Image

        from data import ImageError, clip_preprocess, load_image
        if args.image is None:
            image = Image.merge("RGB", [Image.linear_gradient("L"), Image.linear_gradient("L").rotate(90),
                                        Image.new("L", (256, 256), 128)])
        else:  # read before the (slower) checkpoint, so a wrong image path fails at once
            try:
                image = load_image(args.image)  # any unreadable file (corrupt, truncated, too large) in one line
            except ImageError as e:
                raise ValueError(str(e)) from None
        model = ViT.from_pretrained(args.path)
        print(f"config: {asdict(model.config)}")
        print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
        pixels = clip_preprocess(image, model.config.image_size)[None]  # (1, 3, S, S)
        with torch.no_grad():
            hidden = model(pixels)
            print(f"hidden states: {tuple(hidden.shape)}")
            if model.proj is not None:
                embedding = model.encode_image(pixels)[0]
                print(f"image embedding: ({embedding.shape[0]},) norm {embedding.norm().item():.4f} "
                      f"first values {[round(x, 4) for x in embedding[:5].tolist()]}")
            else:
                print("image embedding: none (this checkpoint has no projection)")
        if args.compare:
            for what, diff in compare_with_reference(args.path, model, pixels).items():
                print(f"max abs diff vs reference, {what}: {diff:.3e}")
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"vit.py: error: {e}") from None


if __name__ == "__main__":
    main()
