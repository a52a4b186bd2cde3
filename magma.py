"""MAGMA: a frozen GPT learns to read images (Eichenberg et al., 2021, arXiv 2112.05253).

The model, section 3 of the paper (whose released encoder is CLIP's ResNet RN50x16 without its
attention pool, 144 grid features; here it is a CLIP ViT, whose last block's tokens play that part):

    image --ViT--> hidden states (B, 1+N, width) --ImagePrefix--> (B, N_img, d_lm)
    text --tokenizer--> ids --GPT's token embedding--> (B, T, d_lm)
    [image prefix][text] --GPT blocks, frozen, with trainable adapters--> next-token logits

Training minimises the cross-entropy of the caption given the image, on the text positions only.
The language model never changes: every LM weight has requires_grad=False, and it stays in eval mode
(nn.Module.train() would switch on a pretrained GPT-2's dropout of 0.1). The adapters, the prefix
and the ViT are trained; the ViT's own output head (CLIP's ln_post and projection), which the prefix
does not read, is frozen.

At inference any interleaving of images and text is one sequence of embeddings, e.g. few-shot
[image, "A picture of a cat.", image, "A picture of"]; generation prefills it once into the KV cache
and then samples token by token, each sequence of a batch stopping at its own end-of-text token.

    python magma.py --checkpoint ckpt.pt --image a.jpg --prompt "A picture of"
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from adapters import AdapterConfig, Adapted, add_adapters, adapter_report, freeze
from attention import INTERPRET, TRITON_IMPORT_ERROR, on_device, tl, triton
from data import ImageError, clip_preprocess, load_image
from gpt import EOS_CHECK_EVERY, GPT, DecodeStep, GPTConfig, load_checked, sample_next
from tokenizer import ByteTokenizer, Tokenizer
from vit import PRESETS, ViT, ViTConfig

CHECKPOINT_FORMAT = "magma-checkpoint"
CHECKPOINT_VERSION = 1  # raise it when the file's layout changes: read_magma_checkpoint refuses others


# ----------------------------------------------------------------------------------------------------
# Config


def tiny_lm_config():
    """A 2-layer, 32-wide GPT-2 over bytes (257 tokens): the default LM of tests and smoke runs."""
    return GPTConfig(model_type="gpt2", vocab_size=257, block_size=128, n_layer=2, n_head=2, n_embd=32)


def tiny_vit_config():
    """A 2-layer, 32-wide ViT on 32x32 images (16 patches + class token): the default image encoder."""
    return ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=16)


@dataclass
class MagmaConfig:
    """What to build. `lm` and `vit` are either configs (random init) or checkpoint paths (pretrained).

    lm: a GPTConfig, or the path of a Hugging Face GPT directory (gpt.GPT.from_pretrained).
    vit: a ViTConfig, a preset name from vit.PRESETS (random init), or a CLIP checkpoint path.
    tokenizer: "byte" (tokenizer.ByteTokenizer), {"merges": [[a, b], ...]} (a merge table learned with
        tokenizer.train_bpe), a tokenizer directory or tokenizer.json file, or None = the lm path when
        lm is a path, else "byte".
    The defaults build a tiny random model with MAGMA's adapters, for tests and smoke runs.
    """
    lm: object = field(default_factory=tiny_lm_config)
    vit: object = field(default_factory=tiny_vit_config)
    image_size: int | None = None     # a pretrained ViT: run it at this size (position embeddings resized)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    prefix_tokens: str = "all"        # "all": class token + patches; "patches": patch tokens only
    prefix_dropout: float = 0.1       # MAGMA: dropout 0.1 on the image prefix
    prefix_layernorm: bool = True     # MAGMA: LayerNorm on the image prefix
    freeze_vit: bool = False          # MAGMA trains the image encoder (lr 2e-6); this keeps it fixed instead
    tokenizer: str | dict | None = None

    def __post_init__(self):
        # Accept the plain dicts a checkpoint's JSON holds.
        if isinstance(self.lm, dict):
            self.lm = GPTConfig(**self.lm)
        if isinstance(self.vit, dict):
            self.vit = ViTConfig(**self.vit)
        if isinstance(self.adapters, dict):
            self.adapters = AdapterConfig(**self.adapters)
        if not isinstance(self.lm, (GPTConfig, str)):
            raise ValueError(f"MagmaConfig.lm must be a GPTConfig or a checkpoint path, got {type(self.lm).__name__}")
        if not isinstance(self.vit, (ViTConfig, str)):
            raise ValueError(f"MagmaConfig.vit must be a ViTConfig, a preset name {sorted(PRESETS)} or a "
                             f"checkpoint path, got {type(self.vit).__name__}")
        if self.prefix_tokens not in ("all", "patches"):
            raise ValueError(f"MagmaConfig.prefix_tokens must be 'all' or 'patches', got {self.prefix_tokens!r}")
        if self.tokenizer is None:
            self.tokenizer = self.lm if isinstance(self.lm, str) else "byte"

    def to_dict(self):
        """A JSON-able dict (nested configs become dicts)."""
        return {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self)}


def to_jsonable(value):
    """Configs -> plain JSON values (dataclasses become dicts, tuples lists, anything else its str)."""
    if is_dataclass(value):
        return {k: to_jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # e.g. a torch.dtype


def vit_from_spec(spec, image_size=None):
    """A ViT from a ViTConfig or preset name (random init) or a checkpoint path (pretrained)."""
    if isinstance(spec, ViTConfig):
        return ViT(spec if image_size is None else replace(spec, image_size=image_size))
    if spec in PRESETS:
        return ViT(PRESETS[spec] if image_size is None else replace(PRESETS[spec], image_size=image_size))
    return ViT.from_pretrained(spec, image_size=image_size)


def tokenizer_from_spec(spec):
    """"byte" -> ByteTokenizer; {"merges": ...} -> the BPE tokenizer of that merge table; anything else
    is a tokenizer directory (GPT-2's files or a tokenizer.json) or a tokenizer.json file."""
    if spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, dict):
        return Tokenizer.from_merges(spec["merges"])
    return Tokenizer.from_pretrained(spec)


def fingerprint(module):
    """sha256 over every tensor's name, shape, dtype and 4096 to 8191 evenly strided values: it tells
    apart two checkpoints (or two dtypes of one) in milliseconds, even for a 6B-parameter model (almost
    always: two files that differ only between the sampled values would look the same). Magma keeps
    the base models' fingerprints, so a checkpoint without their weights can check what it is loaded
    onto (Magma.save / Magma.load)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The loss: cross-entropy over the vocabulary, one fused kernel each way on the GPU
#
# The captioning loss reads (B*T, V) logits: at batch 64 with 64 caption tokens and GPT-2's 50,257
# words, 206M numbers, 412 MB in bf16. PyTorch's cross_entropy (which autocast runs in fp32) copies
# them to fp32, writes log_softmax in fp32 and saves it; its backward writes a zero fp32 gradient,
# scatters the targets into it, runs the softmax backward and casts the result back to bf16: about
# ten passes over 0.4-0.8 GB tensors, some 8-10 GB of memory traffic per step, for arithmetic that is
# a few operations per number. The kernels below make it one read of the logits forward and one read
# plus one write backward (~1.2 GB), with fp32 arithmetic inside and no fp32 copy in memory:
#   forward, per row:   lse = log sum_j exp(x_j)  (online over chunks of the row: the running maximum
#                       m and the running sum s of exp(x - m), rescaled when m grows, as in attention.py)
#                       loss = lse - x_target      (0 for an ignored row: target -100)
#   backward, per row:  dx_j = dloss * (exp(x_j - lse) - [j == target])   (softmax minus one-hot)
# The forward saves the logits (as they are, 16-bit) and lse (one fp32 per row) for the backward.
# Elsewhere (CPU, under torch.compile, whose inductor fuses the same work itself) it is PyTorch's
# F.cross_entropy on fp32 logits; MAGMA_CROSS_ENTROPY=torch|triton forces one (bench.py compares).

IGNORE_INDEX = -100
CROSS_ENTROPY_IMPLS = ("auto", "torch", "triton")
CE_BLOCK_V = 4096  # vocabulary entries per step of a row's loop: 8 KB of bf16, 16 per thread of 8 warps
CE_WARPS = 8
# V is specialized (unlike attention.py's lengths, it is fixed for a model): a vocabulary divisible by
# 8, such as GPT-J's 50,400, gives 16-byte aligned rows and vector loads (sm_90a SASS of the forward:
# 4 global load instructions instead of 18, of the backward 5 instead of 19 and 2 stores instead of
# 16); GPT-2's 50,257 cannot: its rows start at odd offsets, so every load is 2 bytes (coalesced).


@triton.jit
def _ce_forward_kernel(X, TARGET, LOSS, LSE, stride_x, V, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row of logits X (V,) -> LSE[row] = log sum exp, LOSS[row] = LSE - x[target] (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full([], float("-inf"), tl.float32)                            # running maximum
    s = tl.zeros([], tl.float32)                                          # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(x, 0))
        # Until a finite logit is seen (a masked vocabulary may start with -inf entries) m_new = -inf:
        # subtracting 0 there keeps exp(-inf) = 0 where exp(-inf - (-inf)) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(TARGET + row)
    valid = (t >= 0) & (t < V)
    x_t = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
    # A target outside the vocabulary gives NaN, never a silently wrong loss (PyTorch raises there).
    loss = tl.where(t == IGNORE, 0.0, tl.where(valid, lse - x_t, float("nan")))
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)


@triton.jit
def _ce_backward_kernel(X, TARGET, LSE, DLOSS, DX, stride_x, stride_dx, stride_dloss, V,
                        IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: DX = DLOSS[row] * (softmax(x) - onehot(target)), in X's dtype; 0 for an ignored row."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(TARGET + row)
    g = tl.load(DLOSS + row * stride_dloss).to(tl.float32)
    g = tl.where(t == IGNORE, 0.0, g)
    lse = tl.load(LSE + row)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)                                                   # softmax, (BLOCK_V,)
        dx = g * tl.where(cols == t, p - 1.0, p)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=cols < V)


def _ce_block(V):
    """Entries per loop step: CE_BLOCK_V, fewer for a small vocabulary, and small under the interpreter
    so that the tests' tiny vocabularies still take several steps with a ragged last one."""
    return min(32 if INTERPRET else CE_BLOCK_V, 1 << max(V - 1, 0).bit_length())


class _FusedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy (N,) fp32 of logits (N, V) (16- or 32-bit) and int64 targets (N,)."""

    @staticmethod
    def forward(ctx, logits, targets):
        N, V = logits.shape
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=logits.device, dtype=torch.float32)
        if N:
            with on_device(logits):
                _ce_forward_kernel[(N,)](logits, targets, loss, lse, logits.stride(0), V, IGNORE=IGNORE_INDEX,
                                         BLOCK_V=_ce_block(V), num_warps=CE_WARPS)
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):  # dloss (N,): for loss.sum() a broadcast scalar (stride 0)
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        dx = torch.empty_like(logits)
        if N:
            with on_device(logits):
                _ce_backward_kernel[(N,)](logits, targets, lse, dloss, dx, logits.stride(0), dx.stride(0),
                                          dloss.stride(0), V, IGNORE=IGNORE_INDEX, BLOCK_V=_ce_block(V),
                                          num_warps=CE_WARPS)
        return dx, None


def cross_entropy(logits, targets, impl=None):
    """Per-row next-token loss: -log softmax(logits)[target] as fp32 (N,), 0 where target == -100.
    logits (N, V) in any float dtype, targets (N,) int64 or int32. The fused kernels on CUDA (see above),
    F.cross_entropy on fp32 logits elsewhere; impl (or MAGMA_CROSS_ENTROPY) = "torch" or "triton"
    forces one."""
    impl = impl or os.environ.get("MAGMA_CROSS_ENTROPY", "auto")
    if impl not in CROSS_ENTROPY_IMPLS:
        raise ValueError(f"unknown cross-entropy implementation {impl!r} (impl= or MAGMA_CROSS_ENTROPY); "
                         f"choose one of {CROSS_ENTROPY_IMPLS}")
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or logits.shape[1] == 0:
        raise ValueError(f"cross_entropy takes logits (N, V) with V >= 1 and targets (N,); got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != logits.device:
        raise ValueError(f"cross_entropy's targets must be int64 or int32 on the logits' device ({logits.device}); "
                         f"got {targets.dtype} on {targets.device}")
    targets = targets.long()
    if impl == "triton":
        if TRITON_IMPORT_ERROR is not None:
            raise RuntimeError(f"the fused cross-entropy needs Triton, which failed to import "
                               f"({TRITON_IMPORT_ERROR}); use MAGMA_CROSS_ENTROPY=torch")
        if not (logits.is_cuda or INTERPRET):
            raise RuntimeError("the fused cross-entropy runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                               f"the logits are on {logits.device}")
    use_kernel = impl == "triton" or (impl == "auto" and logits.is_cuda and TRITON_IMPORT_ERROR is None
                                      and not torch.compiler.is_compiling())
    if not use_kernel:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _FusedCrossEntropy.apply(logits, targets.contiguous())


# ----------------------------------------------------------------------------------------------------
# The model


@contextlib.contextmanager
def evaluating(module):
    """Inside the block the module is in eval mode (no dropout); afterwards, in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class ImagePrefix(nn.Module):
    """ViT hidden states -> Linear(width -> d_lm) -> Dropout -> LayerNorm: image tokens in the LM's
    embedding space (MAGMA section 3, the "image prefix")."""

    def __init__(self, vit_width, d_lm, tokens="all", dropout=0.1, layernorm=True):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(vit_width, d_lm)
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(d_lm) if layernorm else None

    def forward(self, hidden):  # (B, 1+N, width) -> (B, N_img, d_lm)
        if self.tokens == "patches":
            hidden = hidden[:, 1:]  # drop the class token
        x = self.dropout(self.proj(hidden))
        return self.ln(x) if self.ln is not None else x


class Magma(nn.Module):
    """ViT + image prefix + frozen GPT with adapters + tokenizer.

    Magma(config) builds what config names (tiny random models by default); lm=, vit=, tokenizer=
    take existing instances instead (e.g. a GPT pretrained earlier in the same run). A given instance is
    used in place: `lm` is frozen and gets adapters, so one GPT can back only one Magma.
    """

    def __init__(self, config=None, lm=None, vit=None, tokenizer=None):
        super().__init__()
        config = replace(config) if config is not None else MagmaConfig()
        if lm is not None and not isinstance(config.lm, str):
            config.lm = lm.config  # describe the given LM, so a checkpoint can rebuild it
        if vit is not None and not isinstance(config.vit, str):
            config.vit = vit.config
        if isinstance(tokenizer, ByteTokenizer):
            config.tokenizer = "byte"
        elif tokenizer is not None and config.tokenizer == "byte":
            # A BPE tokenizer for a model built here (e.g. one train_bpe learned): record its merge
            # table, which is all a saved checkpoint needs to rebuild it.
            config.tokenizer = {"merges": [list(pair) for pair in tokenizer.merges]}
            if tokenizer_from_spec(config.tokenizer).encoder != tokenizer.encoder:
                raise ValueError("MagmaConfig.tokenizer says 'byte' but a BPE tokenizer with its own vocabulary "
                                 "was passed: set it to that tokenizer's directory, so that a saved checkpoint "
                                 "can rebuild it")
        self.config = config

        # The language model, frozen before anything is added to it (section 3: its weights never train).
        self.lm = lm if lm is not None else (
            GPT.from_pretrained(config.lm) if isinstance(config.lm, str) else GPT(config.lm))
        freeze(self.lm)
        self.lm.eval()  # no dropout in the frozen LM, ever: train() below keeps it so
        self.vit = vit if vit is not None else vit_from_spec(config.vit, config.image_size)
        if config.freeze_vit:
            freeze(self.vit)
            self.vit.eval()
        # The prefix reads the last block's hidden states, so CLIP's ln_post and projection never get a
        # gradient: frozen, so that they are not counted as trained (and DDP does not wait for them).
        freeze(self.vit.ln_post)
        if self.vit.proj is not None:
            self.vit.proj.requires_grad_(False)
        # Fingerprints of the weights as they came in, so a checkpoint that stores only the trained
        # weights can check it is being restored onto the same base models.
        self.base_fingerprint = {"lm": fingerprint(self.lm), "vit": fingerprint(self.vit)}

        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_from_spec(config.tokenizer)
        if self.tokenizer.vocab_size > self.lm.config.vocab_size:
            name = "learned BPE" if isinstance(config.tokenizer, dict) else repr(config.tokenizer)
            raise ValueError(f"tokenizer {name} has {self.tokenizer.vocab_size} tokens but the LM's "
                             f"vocabulary has only {self.lm.config.vocab_size}")

        self.adapters = add_adapters(self.lm, config.adapters)  # trainable modules inside the frozen LM
        ref = self.lm.transformer.wte.weight
        self.prefix = ImagePrefix(self.vit.config.width, self.lm.config.n_embd, config.prefix_tokens,
                                  config.prefix_dropout, config.prefix_layernorm).to(ref.device)

    @classmethod
    def from_pretrained(cls, lm, vit, adapters=None, tokenizer=None, **config):
        """MAGMA around public checkpoints: lm a Hugging Face GPT directory, vit a CLIP checkpoint (or a
        preset name for a random ViT); adapters an AdapterConfig (default: MAGMA's); tokenizer defaults to
        the lm directory; other MagmaConfig fields as keywords."""
        return cls(MagmaConfig(lm=lm, vit=vit, adapters=adapters or AdapterConfig(), tokenizer=tokenizer,
                               **config))

    def train(self, mode=True):
        """As nn.Module.train, except the frozen parts stay in eval mode (no dropout in the LM)."""
        super().train(mode)
        self.lm.eval()
        if self.config.freeze_vit:
            self.vit.eval()
        return self

    def report(self):
        """One line of parameter counts: adapters vs the frozen LM, and everything trained."""
        return adapter_report(self, self.lm)

    @property
    def image_size(self):
        return self.vit.config.image_size

    # ------------------------------------------------------------------------------------------------
    # Embedding images and text

    def image_embeds(self, pixels):
        """pixels (B, 3, S, S) -> image prefix tokens (B, N_img, d_lm) in the LM's dtype."""
        S = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"pixels must have shape (B, 3, {S}, {S}), got {tuple(pixels.shape)}")
        hidden = self.vit(pixels.to(self.vit.conv1.weight.device))  # (B, 1+N, width)
        proj, wte = self.prefix.proj.weight, self.lm.transformer.wte.weight
        hidden = hidden.to(proj.device)
        if not torch.is_autocast_enabled(proj.device.type):  # (autocast casts for the projection itself)
            hidden = hidden.to(proj.dtype)  # e.g. an fp16 CLIP before an fp32 prefix
        return self.prefix(hidden).to(device=wte.device, dtype=wte.dtype)

    def to_pixels(self, image):
        """A PIL image or a (3, S, S) pixel tensor -> (3, S, S) float pixels."""
        if isinstance(image, Image.Image):
            return clip_preprocess(image, self.image_size)
        S = self.image_size
        if not torch.is_tensor(image) or tuple(image.shape) != (3, S, S):
            shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"an image must be a PIL image or a (3, {S}, {S}) pixel tensor, got {shape}")
        if not image.is_floating_point():  # e.g. uint8 0..255: not what the ViT was trained on
            raise ValueError(f"a pixel tensor must be float and CLIP-normalised (data.clip_preprocess), "
                             f"got {image.dtype}")
        return image.float()

    def embed_batch(self, examples):
        """A batch of interleaved lists of images and strings -> (x (B, T, d_lm), key_padding_mask (B, T)).

        Each example becomes one sequence: an image contributes its prefix tokens, a string its token
        embeddings (each string tokenized on its own: no space or eos is put between items; every item
        that is not a str is an image, so pass a path as a PIL image: data.load_image). Sequences of
        different lengths are left-padded (mask False), so every row's last position is real and
        generation continues all rows at the same step.
        """
        if not isinstance(examples, (list, tuple)) or not all(isinstance(e, (list, tuple)) for e in examples):
            raise ValueError("inputs must be a list (the batch) of lists of images and strings, "
                             "e.g. [[image, 'A picture of']]")
        images = [item for ex in examples for item in ex if not isinstance(item, str)]
        wte = self.lm.transformer.wte
        if images:  # one ViT call for every image of the batch
            image_tokens = iter(self.image_embeds(torch.stack([self.to_pixels(im) for im in images])))
        sequences = []
        for b, ex in enumerate(examples):
            parts = []
            for item in ex:
                if isinstance(item, str):
                    ids = self.tokenizer.encode(item)
                    if ids:
                        parts.append(wte(torch.tensor(ids, device=wte.weight.device)))  # (n_text, d_lm)
                else:
                    parts.append(next(image_tokens))  # (N_img, d_lm)
            if not parts:
                raise ValueError(f"inputs[{b}] is empty: give at least one image or non-empty string")
            sequences.append(torch.cat(parts))
        T = max(len(s) for s in sequences)
        x = torch.stack([F.pad(s, (0, 0, T - len(s), 0)) for s in sequences])  # (B, T, d_lm), left-padded
        mask = torch.stack([torch.arange(T, device=x.device) >= T - len(s) for s in sequences])  # (B, T)
        return x, mask

    def embed(self, example):
        """One interleaved list of images and strings -> its embeddings (T, d_lm)."""
        return self.embed_batch([example])[0][0]

    # ------------------------------------------------------------------------------------------------
    # Training

    def forward(self, pixels, input_ids, text_mask):
        """Captioning loss: cross-entropy of the caption tokens given the image (section 3).

        pixels (B, 3, S, S); input_ids (B, T) caption ids followed by eos, right-padded; text_mask (B, T)
        True on real tokens. The sequence is [image tokens][caption]; the last image position predicts
        the first caption token, and so on up to the eos. Image positions and padding have no target.
        """
        if input_ids.dim() != 2 or text_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and text_mask {tuple(text_mask.shape)} "
                             "must both be (B, T)")
        if pixels.dim() == 4 and pixels.shape[0] != input_ids.shape[0]:  # other shapes: image_embeds says
            raise ValueError(f"pixels has batch size {pixels.shape[0]}, input_ids {input_ids.shape[0]}")
        text_mask = text_mask.to(torch.bool)
        image = self.image_embeds(pixels)  # (B, I, C)
        text = self.lm.transformer.wte(input_ids)  # (B, T, C)
        x = torch.cat([image, text], dim=1)  # (B, I+T, C)
        # Right padding needs no mask: causal attention keeps the pads out of every real position.
        hidden = self.lm(inputs_embeds=x, return_hidden=True)  # (B, I+T, C)
        I = image.shape[1]
        # The vocabulary projection runs only on the T positions that predict a text token (the last
        # image position, then every text one but the last), pads included: picking out the real ones
        # with the mask would give a shape the host must read back from the GPU every step (a stall,
        # and a break in a torch.compile graph). Pads get the target -100, which cross_entropy skips.
        # (B, T, C) hidden states of positions I-1 ... I+T-2: position I-1+t predicts input_ids[:, t]
        logits = self.lm.lm_head(hidden[:, I - 1:-1].flatten(0, 1))  # (B*T, V)
        targets = input_ids.masked_fill(~text_mask, -100).flatten()  # (B*T,)
        loss = cross_entropy(logits, targets).sum()  # fp32, the fused kernels on a GPU (see above)
        return loss / text_mask.sum().clamp(min=1)  # the mean over real tokens (0 if there are none)

    # ------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate_ids(self, inputs, max_new_tokens=32, temperature=0.7, top_k=0, top_p=0.9, eos=True,
                     generator=None, cuda_graph=False):
        """Like generate(), but returns the new token ids of each row (without the eos)."""
        if max_new_tokens < 0:  # before the ViT runs
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        with evaluating(self):  # the image prefix's dropout off
            x, mask = self.embed_batch(inputs)  # (B, T, C), (B, T)
        return self.generate_ids_from_embeds(x, mask, max_new_tokens, temperature, top_k, top_p, eos,
                                             generator, cuda_graph)

    @torch.no_grad()
    def generate_ids_from_embeds(self, x, mask, max_new_tokens=32, temperature=0.7, top_k=0, top_p=0.9,
                                 eos=True, generator=None, cuda_graph=False):
        """generate_ids() after embed_batch(): x (B, T, C) and its key padding mask (B, T) -> new ids.
        Embed in eval mode (`with evaluating(model): model.embed_batch(...)`), or the image prefix's
        dropout is in x."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if x.dim() != 3 or mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"expected x (B, T, C) and its (B, T) key padding mask, as embed_batch returns; "
                             f"got x {tuple(x.shape)}, mask {None if mask is None else tuple(mask.shape)}")
        B, T, _ = x.shape
        # The last new token is returned, not fed back: T + max_new_tokens - 1 positions are run.
        limit = getattr(self.lm.config, "block_size", None)
        if limit is not None and T + max_new_tokens - 1 > limit:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the LM's "
                             f"block_size {limit}")
        eos_id = self.tokenizer.eos_id if eos is True else (None if eos is False else int(eos))
        with evaluating(self):  # dropout off
            cache = self.lm.new_cache(B, T + max(max_new_tokens - 1, 0), device=x.device, dtype=x.dtype)
            hidden = self.lm(inputs_embeds=x, key_padding_mask=mask, cache=cache, return_hidden=True)  # prefill
            logits = self.lm.lm_head(hidden[:, -1]).float()  # (B, V)
            step = DecodeStep(self.lm, cache, mask, cuda_graph=cuda_graph)  # then one token at a time
            done = torch.zeros(B, dtype=torch.bool, device=x.device)
            out = []
            for i in range(max_new_tokens):
                logits[:, self.tokenizer.vocab_size:] = float("-inf")  # LM rows the tokenizer cannot decode
                token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator)  # (B,)
                out.append(token)
                if eos_id is not None:
                    done |= token == eos_id  # a finished row runs on with the others; its tail is cut below
                    if i % EOS_CHECK_EVERY == 0 and bool(done.all()):  # a read back from the device
                        break
                if i < max_new_tokens - 1:
                    logits = step(token[:, None])
            rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
        if eos_id is not None:
            rows = [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
        return rows

    def generate(self, inputs, max_new_tokens=32, temperature=0.7, top_k=0, top_p=0.9, eos=True,
                 generator=None, cuda_graph=False):
        """Continue each interleaved input (a batch: list of lists of images and strings) -> list[str].

        Prefills each prompt once into the KV cache, then samples token by token (gpt.sample_next:
        temperature 0 = greedy, top-k 0 = off, top-p = the smallest set of tokens whose probability
        reaches p). eos=True stops each row at the tokenizer's end-of-text token (an int: at that id;
        False: never), and the text returned stops before it. cuda_graph=True records the decode step
        once as a CUDA graph and replays it per token (gpt.DecodeStep; CUDA, no autocast).
        """
        rows = self.generate_ids(inputs, max_new_tokens, temperature, top_k, top_p, eos, generator, cuda_graph)
        return [self.tokenizer.decode(row) for row in rows]

    # ------------------------------------------------------------------------------------------------
    # Checkpoints

    def _lm_is_loadable(self):
        return isinstance(self.config.lm, str)

    def _vit_is_base(self):
        """The ViT is part of the base (not saved) when it is frozen and comes from a checkpoint file."""
        return self.config.freeze_vit and isinstance(self.config.vit, str) and self.config.vit not in PRESETS

    def _saved_names(self, include_lm, include_vit):
        """The state-dict names a checkpoint holds: everything except the base weights it leaves out."""
        adapter_prefixes = tuple(f"lm.{name}.adapter." for name, m in self.lm.named_modules()
                                 if isinstance(m, Adapted))
        names = []
        for name in self.state_dict():
            if name.startswith("lm.") and not include_lm and not name.startswith(adapter_prefixes):
                continue
            if name.startswith("vit.") and not include_vit:
                continue
            names.append(name)
        return names

    def save(self, path, include_lm=None, extra=None):
        """Write the config and the trained weights to `path`, atomically (temporary file, then rename).

        The frozen LM's weights are left out when the LM was loaded from a path (and a frozen pretrained
        ViT's), with a fingerprint to check them against at load time; include_lm=True stores them anyway
        (the tokenizer is still read from the LM's directory). An LM that no path can rebuild (random,
        or pretrained in this run) is always stored. `extra` adds entries to the file (train.py keeps its
        optimizer, schedule and step under "train"): values torch.load(weights_only=True) can read back,
        i.e. tensors, numbers, strings, and lists, tuples and dicts of them.
        """
        include_lm = (not self._lm_is_loadable()) if include_lm is None else bool(include_lm)
        if not include_lm and not self._lm_is_loadable():
            raise ValueError("save(include_lm=False): this LM was not loaded from a path "
                             "(MagmaConfig.lm is a config), so the checkpoint must hold its weights")
        include_vit = not self._vit_is_base()
        state = self.state_dict()
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": json.dumps(self.config.to_dict()),
            "lm_config": json.dumps(to_jsonable(self.lm.config)),
            "vit_config": json.dumps(to_jsonable(self.vit.config)),
            "includes": {"lm": include_lm, "vit": include_vit},
            "fingerprint": dict(self.base_fingerprint),
            "state_dict": {name: state[name].detach().cpu() for name in self._saved_names(include_lm, include_vit)},
        }
        for key, value in (extra or {}).items():
            if key in checkpoint:
                raise ValueError(f"save(extra=...): {key!r} is one of the checkpoint's own entries")
            checkpoint[key] = value
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint at `path`
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path, lm=None, vit=None, tokenizer=None, checkpoint=None):
        """Rebuild a model saved by save(). Base weights the file does not hold come from `lm` / `vit`
        (instances or paths) or else from the paths recorded at training time, and must match the
        fingerprints recorded then (`lm` / `vit` are not needed, and unused, for weights the file holds;
        a path given for the LM also locates its tokenizer). A caller that has read the file already
        (read_magma_checkpoint(path)) passes what it read as `checkpoint`, and the file is not read
        again. The model comes back in eval mode, as GPT.from_pretrained's does."""
        if checkpoint is None:
            checkpoint = read_magma_checkpoint(path)
        try:
            config = MagmaConfig(**json.loads(checkpoint["config"]))
        except (TypeError, ValueError) as e:  # a field this code does not know, or a bad value
            raise ValueError(f"{path}: bad config in checkpoint ({e})") from None
        includes = checkpoint["includes"]
        recorded = {"lm": config.lm, "vit": config.vit}  # where the base weights were at training time
        name = {"lm": "LM", "vit": "ViT"}
        # Base weights given as a path now replace the path recorded at training time (they may have
        # moved; the fingerprints below check that they are the same weights), so a checkpoint saved
        # again records where they are. The LM's own tokenizer files move with it.
        if isinstance(lm, str):
            if config.tokenizer == config.lm:
                config.tokenizer = lm
            if not includes["lm"]:
                config.lm = lm
        if isinstance(vit, str) and not includes["vit"]:
            config.vit = vit

        def base(part, given, build_from_config, build_from_path):
            if includes[part]:  # weights are in the file: a random model of the saved config, overwritten below
                return build_from_config(json.loads(checkpoint[f"{part}_config"]))
            source = given if given is not None else getattr(config, part)
            if not isinstance(source, str):
                return source
            try:
                return build_from_path(source)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: could not load the base {name[part]} this checkpoint was trained "
                                 f"on from {source!r} ({e}); pass {part}=PATH or {part}=model "
                                 f"(--{part} PATH on the command line)") from None

        lm_model = base("lm", lm, lambda c: GPT(GPTConfig(**c)), GPT.from_pretrained)
        vit_model = base("vit", vit, lambda c: ViT(ViTConfig(**c)),
                         lambda p: ViT.from_pretrained(p, image_size=config.image_size))
        model = cls(config, lm=lm_model, vit=vit_model, tokenizer=tokenizer)
        for part in ("lm", "vit"):
            if not includes[part] and model.base_fingerprint[part] != checkpoint["fingerprint"][part]:
                given = {"lm": lm, "vit": vit}[part]
                where = " given" if given is not None and not isinstance(given, str) else f" at {getattr(config, part)!r}"
                raise ValueError(f"{path}: the base {name[part]} weights{where} differ from those this "
                                 f"checkpoint was trained on, from {recorded[part]!r} (fingerprint "
                                 f"{model.base_fingerprint[part][:12]} != {checkpoint['fingerprint'][part][:12]}); "
                                 f"give the same weights in the same dtype (a path loads in its stored dtype; else "
                                 f"pass {part}={dict(lm='GPT', vit='ViT')[part]}.from_pretrained(PATH, dtype=...))")
        for part in ("lm", "vit"):  # a part the file holds was fingerprinted as a random skeleton above:
            if includes[part]:      # keep the fingerprint of the weights it was saved from
                model.base_fingerprint[part] = checkpoint["fingerprint"][part]
        expected = model._saved_names(includes["lm"], includes["vit"])
        return load_checked(model, checkpoint["state_dict"], path, expected).eval()


def read_magma_checkpoint(path):
    """torch.load a file written by Magma.save, with one clear error for a missing or corrupt file."""
    if os.path.isdir(path):  # e.g. train.py's --out_dir: the OSError the callers catch, saying what is wrong
        raise IsADirectoryError(f"MAGMA checkpoint {path} is a folder; give the ckpt.pt file in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MAGMA checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, ...: all mean "not a checkpoint"
        # torch's messages run to many lines and advise weights_only=False: keep the first sentence
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ValueError(f"{path}: not a readable MAGMA checkpoint ({type(e).__name__}: {reason})") from None
    keys = ("version", "config", "lm_config", "vit_config", "includes", "fingerprint", "state_dict")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT \
            or any(k not in checkpoint for k in keys):
        raise ValueError(f"{path}: not a MAGMA checkpoint (written by Magma.save)")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {checkpoint['version']}, this code reads {CHECKPOINT_VERSION}")
    return checkpoint


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    """The command line: load a checkpoint, read the images, print the continuation of the prompt."""
    parser = argparse.ArgumentParser(
        prog="magma.py",  # also when main() is called from train.py or a test
        description="Caption images (or continue interleaved image/text prompts) with a trained MAGMA model.",
        epilog="Images and prompts are interleaved in the order given: "
               "--image a.jpg --prompt 'A cat.' --image b.jpg --prompt 'A picture of'")
    parser.add_argument("--checkpoint", required=True, help="file written by Magma.save / train.py")
    parser.add_argument("--image", dest="items", action="append", type=lambda p: ("image", p), default=[],
                        metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--prompt", dest="items", action="append", type=lambda s: ("text", s), metavar="TEXT",
                        help="text (repeatable)")
    parser.add_argument("--lm", default=None, help="path of the base LM, if it moved since training")
    parser.add_argument("--vit", default=None, help="path of the base ViT, if it moved since training")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="stop after this many tokens, or at EOS (default: 100, or what the LM's context leaves)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = off (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.9,
                        help="keep the smallest set of tokens whose probability reaches p; 1.0 = off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a random one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, mps (default here: %(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="hold the whole model in this dtype (bf16 halves the memory of a large LM; "
                             "default: %(default)s)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="record the decode step once as a CUDA graph and replay it per token (GPU only)")
    args = parser.parse_args(argv)
    if not args.items:
        parser.error("give at least one --image or --prompt")
    checks = [  # (flag, value, is it good, what it must be); nan fails every comparison, inf is not finite
        ("max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1,
         "must be >= 1"),
        ("temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
         "must be a finite number >= 0"),
        ("top-k", args.top_k, args.top_k >= 0, "must be >= 0"),
        ("top-p", args.top_p, 0 < args.top_p <= 1, "must be a number in (0, 1]"),
    ]
    for flag, value, good, why in checks:
        if not good:
            parser.error(f"--{flag}={value}: {why}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type not in ("cpu", "cuda", "mps"):  # e.g. meta holds no data: nothing could be printed
        parser.error(f"--device {args.device!r}: generation runs on cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {args.device}: no Apple GPU (MPS) is available; use --device cpu")
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA --device")
    try:
        example = [load_image(value) if kind == "image" else value for kind, value in args.items]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        checkpoint = read_magma_checkpoint(args.checkpoint)
        model = Magma.load(args.checkpoint, lm=args.lm, vit=args.vit, checkpoint=checkpoint).to(device, dtype)
        for part, given in (("lm", args.lm), ("vit", args.vit)):
            if given is not None and checkpoint["includes"][part]:  # say so, rather than ignore it silently
                used = part == "lm" and model.config.tokenizer == given  # the LM's folder holds its tokenizer
                print(f"magma.py: note: the checkpoint holds the {dict(lm='LM', vit='ViT')[part]}'s weights; --{part} "
                      + ("only locates its tokenizer" if used else "is not used"), file=sys.stderr)
        generator = None
        if args.seed is not None:
            generator = torch.Generator(device=device).manual_seed(args.seed)
        max_new_tokens = args.max_new_tokens
        with torch.no_grad(), evaluating(model):  # the ViT runs once, here; generation starts from x
            x, mask = model.embed_batch([example])
        prompt_len = x.shape[1]  # image and text positions
        limit = getattr(model.lm.config, "block_size", None)  # the context Magma.generate keeps to
        if max_new_tokens is None:
            max_new_tokens = max(1, min(100, (limit or prompt_len + 100) - prompt_len))
        if limit and prompt_len > limit:
            raise ValueError(f"the prompt (images and text) takes {prompt_len} positions; the LM has {limit}")
        if limit and prompt_len + max_new_tokens - 1 > limit:  # the last new token is not fed back
            raise ValueError(f"--max-new-tokens={max_new_tokens}: the prompt fills {prompt_len} of the LM's {limit} "
                             f"positions, which leaves room for at most {limit - prompt_len + 1} new tokens")
        ids = model.generate_ids_from_embeds(x, mask, max_new_tokens=max_new_tokens, temperature=args.temperature,
                                             top_k=args.top_k, top_p=args.top_p, generator=generator,
                                             cuda_graph=args.cuda_graph)[0]
        text = model.tokenizer.decode(ids)
    except (OSError, ValueError, ImageError) as e:
        print(f"magma.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(text)
    return text


if __name__ == "__main__":
    main()
