"""The one training script: MAGMA (arXiv 2112.05253) on a laptop CPU, one GPU, or many under torchrun.

    python train.py                                    # the default "shapes" run, minutes on a 2-core CPU
    python train.py --steps=300 --batch_size=32        # any field of TrainConfig as --key=value
    python train.py --resume                           # continue the run in --out_dir from its checkpoint
    torchrun --nproc_per_node=8 train.py --preset=gpt2-clip --lm=gpt2/ --vit=ViT-B-16.pt --data=coco:...

The default run is MAGMA's recipe in miniature, on the built-in synthetic scenes (data.ShapesDataset):
  stage 1  pretrain a tiny GPT on the caption and answer texts alone: the "pretrained language model"
           (its vocabulary: byte-level BPE merges learned from those texts, tokenizer.train_bpe);
  stage 2  freeze it, wrap it in magma.Magma, and train a tiny ViT, the image prefix and the adapters
           on image-text pairs (section 3 of the paper);
then it prints greedy captions of held-out images beside the truth, draws them into samples.png, and
reports held-out exact-match accuracy. Its checkpoint works with `python magma.py --checkpoint`.

Training mechanics, all in `fit` below: AdamW over the trainable parameters only, in MAGMA's two
groups (adapters + prefix, image encoder); warmup then cosine or linear decay; gradient clipping and
accumulation; bf16 autocast, fp16 with a GradScaler, or fp32; DDP under torchrun (rank 0 logs and
saves, a DistributedSampler shards the data, accumulation micro-steps skip the gradient all-reduce);
checkpoints written atomically, holding everything --resume needs to continue the same run.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

import data
from adapters import AdapterConfig, adapter_parameters, adapter_report, cast_frozen
from gpt import GPT, GPTConfig
from magma import Magma, MagmaConfig, cross_entropy, evaluating, read_magma_checkpoint
from tokenizer import ByteTokenizer, Tokenizer, train_bpe
from vit import PRESETS as VIT_PRESETS
from vit import ViTConfig


# ----------------------------------------------------------------------------------------------------
# Config: one dataclass, named presets on top of its defaults, --key=value on top of a preset.


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the "shapes" preset (a CPU run on synthetic scenes)."""
    # data
    data: str = opt("shapes", "training data: 'shapes' or a file dataset (formats below)")
    val_data: str = opt("", "validation data (same formats); '' = the shapes val split, or a held-out "
                            "slice of the training records")
    strict: bool = opt(False, "stop at the first missing or corrupt image instead of skipping it")
    train_size: int = opt(50000, "shapes: number of training scenes")
    val_size: int = opt(500, "shapes: number of held-out scenes used for evaluation")
    qa_fraction: float = opt(0.25, "shapes: fraction of training texts that are question-answer pairs")
    max_objects: int = opt(2, "shapes: at most this many objects per scene")
    image_size: int = opt(48, "image side in pixels (0 = the pretrained ViT's own)")
    max_len: int = opt(96, "longest text in tokens (longer texts are cut)")
    num_workers: int = opt(0, "DataLoader worker processes")
    # models
    lm: str = opt("tiny", "'tiny' (a small GPT built here and pretrained in stage 1) or a Hugging Face "
                          "GPT directory")
    lm_type: str = opt("gptj", "tiny GPT: family, gptj (rotary positions, as MAGMA's GPT-J) or gpt2")
    lm_layers: int = opt(2, "tiny GPT: layers")
    lm_embd: int = opt(128, "tiny GPT: width")
    lm_heads: int = opt(4, "tiny GPT: attention heads")
    vit: str = opt("tiny", f"'tiny', a CLIP preset name (random init: {', '.join(VIT_PRESETS)}) or a CLIP "
                           "checkpoint path")
    vit_patch: int = opt(24, "tiny ViT: patch size (shapes: 24 of 48 px, one patch per quadrant)")
    vit_width: int = opt(96, "tiny ViT: width")
    vit_layers: int = opt(2, "tiny ViT: layers")
    vit_heads: int = opt(4, "tiny ViT: attention heads")
    tokenizer: str = opt("", "'' = 'bpe' for the tiny LM, the LM's own for a pretrained one; 'bpe' (merges "
                             "learned from the training texts), 'byte', or a tokenizer directory or tokenizer.json")
    bpe_merges: int = opt(1000, "tiny LM, 'bpe': at most this many merges (learning stops when no pair "
                                "occurs twice)")
    adapter_kind: str = opt("sequential", "sequential | parallel | scaled_parallel | lora")
    adapter_places: str = opt("mlp,attn", "where bottleneck adapters go: 'mlp' (MAGMA's released models) or "
                                          "'mlp,attn'")
    adapter_downsample: int = opt(2, "adapter bottleneck = LM width // this (MAGMA: 4 after the MLP)")
    prefix_dropout: float = opt(0.0, "dropout on the image prefix (MAGMA: 0.1)")
    freeze_vit: bool = opt(False, "keep the image encoder fixed (MAGMA trains it)")
    # stage 1: language model pretraining (tiny LM only)
    lm_steps: int = opt(100, "stage 1 steps (0 = skip)")
    lm_batch_size: int = opt(16, "stage 1 batch size (rows of packed text, each as long as the tiny LM's "
                                 "context: at least 256 tokens)")
    lm_lr: float = opt(3e-3, "stage 1 peak learning rate")
    # stage 2: MAGMA training
    steps: int = opt(3000, "stage 2 optimizer steps")
    batch_size: int = opt(64, "samples per optimizer step, summed over processes and accumulation")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-3, "peak learning rate of the adapters and the image prefix (MAGMA: 8e-4)")
    vit_lr: float = opt(2e-3, "peak learning rate of the image encoder (MAGMA: 2e-6, pretrained CLIP)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    warmup_steps: int = opt(100, "linear warmup steps")
    schedule: str = opt("cosine", "decay after warmup: cosine | linear | constant")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    # machinery
    precision: str = opt("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 on a GPU that has it, else fp32)")
    lm_dtype: str = opt("auto", "auto | fp32 | bf16 | fp16: the dtype the frozen LM's weights are held in in "
                                "stage 2 (auto: the autocast dtype of --precision, so its weights are not cast "
                                "again at every matmul; without autocast, the dtype they were loaded in)")
    tf32: bool = opt(True, "allow TF32 matmuls on GPUs that have them")
    compile: bool = opt(False, "torch.compile the model")
    grad_checkpointing: bool = opt(False, "recompute block activations in the backward pass")
    device: str = opt("auto", "auto | cpu | cuda")
    seed: int = opt(0, "seed of the model init, the data and everything random")
    # evaluation, logging, checkpoints
    eval_every: int = opt(1000, "evaluate every N stage-2 steps (0 = only at the end)")
    eval_batches: int = opt(4, "validation batches (of 32) for the validation loss (shapes: captions only, "
                               "so it is not comparable with the training loss, which includes the questions)")
    eval_images: int = opt(4, "fixed validation images whose greedy captions are logged")
    log_every: int = opt(10, "write a JSON Lines log record every N steps")
    save_every: int = opt(1000, "write the checkpoint every N stage-2 steps (0 = only at the end)")
    out_dir: str = opt("out/shapes", "checkpoint, log.jsonl and samples.png go here (on several nodes: a "
                                     "folder they all see)")
    resume: bool = opt(False, "continue the run in out_dir from its checkpoint (with more --steps, or --lm / --vit "
                              "where its base weights have moved; model and optimizer settings stay as saved)")
    overwrite: bool = opt(False, "start a new run in an out_dir that holds one (its checkpoint is replaced)")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many stage-2 steps in this process, as a "
                             "time-limited job would; --resume continues, and stops again after as many more "
                             "(give --stop_after=0 to run to the end)")
    progress: bool = opt(True, "show a progress bar")


PRESETS = {
    "shapes": {},  # the defaults above
    "gpt2-clip": dict(  # MAGMA's recipe on public weights: give --lm, --vit and --data
        data="", lm="", vit="", image_size=0, max_len=128, lm_steps=0, steps=15000, batch_size=256,
        lr=8e-4, vit_lr=2e-6, warmup_steps=500, prefix_dropout=0.1, adapter_places="mlp", adapter_downsample=4,
        eval_every=1000, save_every=1000, eval_batches=20, num_workers=8, out_dir="out/gpt2-clip"),
}


# Settings a checkpoint carries, in its optimizer and schedule state or in the model it holds: --resume
# refuses to change them (--lm and --vit may: they name where the base weights are, which can move).
RESUME_FIXED = ("lr", "vit_lr", "weight_decay", "beta1", "beta2", "warmup_steps", "schedule", "min_lr_ratio",
                "batch_size", "grad_accum", "seed",
                "lm_type", "lm_layers", "lm_embd", "lm_heads", "vit_patch", "vit_width", "vit_layers", "vit_heads",
                "image_size", "tokenizer", "bpe_merges", "adapter_kind", "adapter_places", "adapter_downsample",
                "prefix_dropout", "freeze_vit", "lm_steps", "lm_batch_size", "lm_lr",
                "grad_clip", "train_size", "qa_fraction", "max_objects", "max_len")


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser():
    presets = "\n".join(f"  {name:10s} {', '.join(f'{k}={v}' for k, v in ov.items()) or '(the defaults)'}"
                        for name, ov in PRESETS.items())
    parser = argparse.ArgumentParser(
        description="Train MAGMA: a frozen GPT + image encoder + image prefix + adapters.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets (applied before the other options):\n{presets}\n\ndata formats:\n{data.DATA_FORMATS}")
    parser.add_argument("--preset", default="shapes", choices=sorted(PRESETS), help="named settings")
    for f in dataclasses.fields(TrainConfig):
        kind = _parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(
            f.type if isinstance(f.type, str) else f.type.__name__, str)
        flag = "--" + f.name
        if f.type in (bool, "bool"):
            parser.add_argument(flag, type=kind, nargs="?", const=True, default=None, metavar="BOOL",
                                help=f"{f.metadata['help']} (default: {f.default})")
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    return parser


def parse_config(argv=None):
    """Defaults <- preset <- --key=value. Returns (config, the keys given on the command line)."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    cfg = dataclasses.replace(TrainConfig(), **{**PRESETS[args.preset], **given})
    if not cfg.resume:  # a resumed run is checked once its saved config is read (the preset's --data is '')
        check_config(cfg)
    return cfg, given


def bad_flag(cfg, flag, why):
    raise SystemExit(f"train.py: error: --{flag}={getattr(cfg, flag)!r}: {why}")


def check_config(cfg):
    """Every flag's value, before any work."""
    bad = functools.partial(bad_flag, cfg)
    if not cfg.data:
        bad("data", f"give the training data; formats:\n{data.DATA_FORMATS}")
    if not cfg.lm:
        bad("lm", "give 'tiny' or a Hugging Face GPT directory")
    if not cfg.vit:
        bad("vit", "give 'tiny', a CLIP preset name or a CLIP checkpoint path")
    for name in ("steps", "batch_size", "grad_accum", "max_len", "log_every", "eval_batches", "bpe_merges",
                 "lm_batch_size", "lm_layers", "lm_embd", "lm_heads", "vit_patch", "vit_width", "vit_layers",
                 "vit_heads", "train_size", "val_size", "adapter_downsample"):
        if getattr(cfg, name) < 1:
            bad(name, "must be >= 1")
    for name in ("lm_steps", "eval_every", "save_every", "eval_images", "stop_after", "warmup_steps", "num_workers"):
        if getattr(cfg, name) < 0:
            bad(name, "must be >= 0")
    # Real numbers: `not lo <= x` also catches nan, which compares false with everything.
    for name in ("lr", "vit_lr", "lm_lr", "weight_decay", "grad_clip"):
        if not 0 <= getattr(cfg, name) < math.inf:
            bad(name, "must be a finite number >= 0")
    for name in ("beta1", "beta2", "prefix_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            bad(name, "must be in [0, 1)")
    for name in ("min_lr_ratio", "qa_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            bad(name, "must be in [0, 1]")
    if not 0 <= cfg.seed < 2**32:
        bad("seed", "must be in [0, 2**32)")
    if not 1 <= cfg.max_objects <= len(data.POSITIONS):
        bad("max_objects", f"a scene holds 1 to {len(data.POSITIONS)} objects")
    if cfg.val_data and cfg.data == "shapes":
        bad("val_data", "is for file datasets: --data=shapes has its own validation scenes (--val_size)")
    if not cfg.out_dir:
        bad("out_dir", "give a folder for the checkpoint and the log")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        bad("out_dir", "is a file, not a folder")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        bad("precision", "choose auto, fp32, bf16 or fp16")
    if cfg.lm_dtype not in ("auto", "fp32", "bf16", "fp16"):
        bad("lm_dtype", "choose auto, fp32, bf16 or fp16")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        bad("schedule", "choose cosine, linear or constant")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        bad("device", "choose auto, cpu or cuda")
    if cfg.tokenizer in ("bpe", "byte") and cfg.lm != "tiny":
        bad("tokenizer", "'bpe' and 'byte' are for the tiny LM; a pretrained LM comes with its own (leave "
                         "--tokenizer empty) or give a tokenizer directory")
    if cfg.data == "shapes" and cfg.image_size < 8:
        bad("image_size", "the shapes data needs images of at least 8 pixels")
    if cfg.vit == "tiny" and cfg.image_size < cfg.vit_patch:
        bad("image_size", f"the tiny ViT needs images of at least one patch (--vit_patch={cfg.vit_patch})")
    if cfg.lm == "tiny" and cfg.lm_embd % cfg.lm_heads:
        bad("lm_embd", f"must be a multiple of --lm_heads={cfg.lm_heads}")
    if cfg.vit == "tiny" and cfg.vit_width % cfg.vit_heads:
        bad("vit_width", f"must be a multiple of --vit_heads={cfg.vit_heads}")
    if cfg.lm_type not in ("gptj", "gpt2"):
        bad("lm_type", "choose gptj or gpt2")
    if cfg.batch_size % cfg.grad_accum:
        bad("batch_size", f"must be a multiple of --grad_accum={cfg.grad_accum}")
    if cfg.lm == "tiny" and cfg.lm_steps > 0 and cfg.lm_batch_size % cfg.grad_accum:  # stage 1 accumulates too
        bad("lm_batch_size", f"must be a multiple of --grad_accum={cfg.grad_accum}")
    for flag, field, value in [("adapter_kind", "kind", cfg.adapter_kind),
                               ("adapter_places", "places", tuple(cfg.adapter_places.split(",")))]:
        try:
            AdapterConfig(**{field: value})
        except (TypeError, ValueError) as e:  # "AdapterConfig.kind: unknown adapter kind ..."
            bad(flag, str(e).split(": ", 1)[-1])
    if cfg.lm == "tiny" and cfg.lm_embd // cfg.adapter_downsample < 1:
        bad("adapter_downsample", f"leaves no bottleneck of the tiny LM's width --lm_embd={cfg.lm_embd}")


def check_paths(cfg):
    """A new run's --lm / --vit / --tokenizer exist: a typo found now, not after the data, the BPE and
    stage 1. (A resumed run's base weights may have moved: Magma.load says how to point at them.)"""
    if cfg.lm != "tiny" and not os.path.isdir(cfg.lm):
        what = "is a file, not a folder" if os.path.exists(cfg.lm) else "no such folder"
        bad_flag(cfg, "lm", f"{what} (a Hugging Face GPT directory, or 'tiny')")
    if cfg.vit != "tiny" and cfg.vit not in VIT_PRESETS and not os.path.exists(cfg.vit):
        bad_flag(cfg, "vit", f"no such file or folder (a CLIP checkpoint, 'tiny' or a preset: {', '.join(VIT_PRESETS)})")
    tokenizer_file = cfg.tokenizer.endswith(".json") and os.path.isfile(cfg.tokenizer)
    if cfg.tokenizer not in ("", "bpe", "byte") and not (os.path.isdir(cfg.tokenizer) or tokenizer_file):
        what = "is a file, but not a .json one" if os.path.exists(cfg.tokenizer) else "no such folder or file"
        bad_flag(cfg, "tokenizer", f"{what} (a tokenizer directory, a tokenizer.json file, 'bpe' or 'byte')")


# ----------------------------------------------------------------------------------------------------
# Processes and devices. Under torchrun every process runs this same script; RANK / WORLD_SIZE /
# LOCAL_RANK come from the environment. Without torchrun it is one process, rank 0 of 1.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    wait_group: object = None  # the process group barrier() waits in (several processes only)

    @property
    def main(self):
        return self.rank == 0

    def all_sum(self, *values):
        """Sum each number over processes in one all_reduce (a no-op for one process): a float, or a
        list of floats for several values."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.world > 1:
            t = t.to(self.device)
            torch_dist.all_reduce(t)
        sums = t.tolist()
        return sums[0] if len(sums) == 1 else sums

    def barrier(self):
        """Wait for every process: the others wait here while rank 0 evaluates or writes a checkpoint."""
        if self.world > 1:
            torch_dist.barrier(group=self.wait_group)


def setup(cfg):
    """Start the process group under torchrun, pick the device, set TF32."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("train.py: error: --device=cuda but no CUDA device is available")
        device = torch.device("cuda", local) if want == "cuda" else torch.device(want)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    else:
        device = torch.device("cpu")
    wait_group = None
    if world > 1:
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Rank 0 evaluates alone (captions, the final report) while the others wait at a barrier. That
        # wait gets its own CPU group with a long timeout; the training collectives keep the default
        # one (10 minutes under NCCL), so processes that fall out of step fail soon instead of hanging.
        wait_group = torch_dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    return Dist(rank, world, device, wait_group)


def autocast_dtype(cfg, device):
    """None for fp32, else the autocast dtype."""
    p = cfg.precision
    if p == "auto":  # bf16 where the GPU computes it natively (compute capability 8.0+: Ampere and newer)
        native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        p = "bf16" if native_bf16 else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def frozen_lm_dtype(cfg, device):
    """The dtype to hold the frozen LM's weights in (--lm_dtype), or None to leave them as loaded."""
    amp = autocast_dtype(cfg, device)
    if cfg.lm_dtype == "auto":
        return amp
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.lm_dtype]
    if dtype != torch.float32 and dtype != amp:
        # The LM's activations come out in its dtype: autocast in another half dtype cannot mix them
        # with the image prefix, and without autocast (or its GradScaler) fp16 gradients underflow.
        raise SystemExit(f"train.py: error: --lm_dtype={cfg.lm_dtype} needs --precision={cfg.lm_dtype} "
                         f"(the precision here is {'fp32' if amp is None else str(amp).split('.')[-1]}); "
                         f"use --lm_dtype=auto or fp32")
    return dtype


# ----------------------------------------------------------------------------------------------------
# Data


def make_datasets(cfg):
    """(train dataset, validation dataset) for cfg.data / cfg.val_data."""
    if cfg.data == "shapes":
        common = dict(image_size=cfg.image_size, seed=cfg.seed, max_objects=cfg.max_objects)
        train = data.ShapesDataset("train", cfg.train_size, qa_fraction=cfg.qa_fraction, **common)
        val = data.ShapesDataset("val", cfg.val_size, **common)
        return train, val
    train = data.open_dataset(cfg.data, strict=cfg.strict)
    if cfg.val_data:
        return train, data.open_dataset(cfg.val_data, strict=cfg.strict)
    # Hold out 1 image in 100 by the hash of its path, so all captions of an image fall on one side. The
    # path is taken relative to the folder all images share: the split stays the same when the data
    # moves, or is given by an absolute path instead of a relative one.
    paths = [os.path.abspath(path) for path, _ in train.records]
    root = os.path.dirname(os.path.commonpath(paths)) if len(set(paths)) == 1 else os.path.commonpath(paths)
    held = [data.stable_hash(os.path.relpath(path, root)) % 100 == 0 for path in paths]
    if not any(held) or all(held):  # too few images to hold any out: main() says so
        return train, train
    pick = lambda keep: [r for r, h in zip(train.records, held) if h == keep]  # noqa: E731
    return (data.ImageTextDataset(pick(False), cfg.strict, train.name),
            data.ImageTextDataset(pick(True), cfg.strict, train.name + " (held out)"))


def text_of(dataset, idx):
    """The text of item idx, without reading its image."""
    if isinstance(dataset, data.ShapesDataset):
        return dataset.text(idx)
    return dataset.records[idx][1]


BPE_TEXTS = 20000  # texts a tiny LM's merge table is learned from: enough to see every word many times


def make_tokenizer(cfg, train_set, logger):
    """The tokenizer instance for a tiny LM (None for a pretrained LM: Magma loads the LM's own)."""
    kind = cfg.tokenizer or ("bpe" if cfg.lm == "tiny" else "")
    if cfg.lm != "tiny":
        return Tokenizer.from_pretrained(kind) if kind else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        texts = [text_of(train_set, i) for i in range(min(len(train_set), BPE_TEXTS))]
        tokenizer = train_bpe(texts, cfg.bpe_merges)
        logger.print(f"tokenizer: byte-level BPE, {len(tokenizer.merges)} merges learned from {len(texts)} "
                     f"training texts, vocabulary {tokenizer.vocab_size}")
        return tokenizer
    return Tokenizer.from_pretrained(kind)


class PackedTexts(torch.utils.data.Dataset):
    """Stage 1's training data: the texts of an image-text dataset, without its images, packed as
    GPT-2 was pretrained: "text eos text eos ..." cut into rows of `length` tokens. Row idx starts at
    text idx, part-way into it (a seeded offset), so texts appear at every position and after other
    text; in stage 2 they will come after the image prefix instead."""

    def __init__(self, dataset, tokenizer, length, seed):
        self.dataset, self.tokenizer, self.length, self.seed = dataset, tokenizer, length, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        eos = self.tokenizer.eos_id
        ids = self.tokenizer.encode(text_of(self.dataset, idx)) + [eos]
        ids = ids[random.Random(f"pack/{self.seed}/{idx}").randrange(len(ids)):]  # start part-way in
        j = idx
        while len(ids) < self.length:
            j = (j + 1) % len(self.dataset)
            ids += self.tokenizer.encode(text_of(self.dataset, j)) + [eos]
        return {"input_ids": torch.tensor(ids[:self.length]), "skipped": []}


def collate_rows(batch):
    input_ids = torch.stack([item["input_ids"] for item in batch])  # (B, T)
    return {"input_ids": input_ids, "text_mask": torch.ones_like(input_ids, dtype=torch.bool), "skipped": []}


def batches(dataset, collate_fn, micro_batch, dist, cfg, start=0, batch_flag="batch_size"):
    """Micro-batches forever, as a pure function of (seed, rank, position): position `start` (counted
    in micro-batches) resumes exactly where a run stopped. Each epoch is one DistributedSampler pass
    (a shuffled shard per process); the ragged tail of an epoch is dropped."""
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // micro_batch
    if per_epoch == 0:
        raise SystemExit(f"train.py: error: the dataset ({len(dataset)} items) is smaller than one micro-batch "
                         f"({micro_batch} per process); lower --{batch_flag}")
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * micro_batch: per_epoch * micro_batch]
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG, which would
        # make the dropout masks after a resume differ from those of an uninterrupted run.
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=order, drop_last=True,
                                             collate_fn=collate_fn, num_workers=cfg.num_workers,
                                             pin_memory=dist.device.type == "cuda",  # non_blocking copies
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        yield from loader
        epoch, skip = epoch + 1, 0


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Models


def image_tokens(cfg):
    """How many image-prefix tokens the run's ViT gives (an upper bound for a checkpoint not yet read)."""
    if cfg.vit == "tiny":
        return (cfg.image_size // cfg.vit_patch) ** 2 + 1
    vit = VIT_PRESETS.get(cfg.vit)
    if vit is None:
        # a checkpoint: not read yet, so an upper bound (public CLIP patches are 14 px or more;
        # ViT-L/14@336's 577 tokens are the most at its own size)
        return 577 if not cfg.image_size else (cfg.image_size // 14) ** 2 + 1
    return ((cfg.image_size or vit.image_size) // vit.patch_size) ** 2 + 1


def tiny_lm_config(cfg, tokenizer):
    """The tiny GPT of stage 1: rows of 256 packed tokens, and room for image prefix + caption."""
    prefix = image_tokens(cfg)
    return GPTConfig(model_type=cfg.lm_type, vocab_size=tokenizer.vocab_size,
                     block_size=max(256, prefix + cfg.max_len + 8),
                     n_layer=cfg.lm_layers, n_head=cfg.lm_heads, n_embd=cfg.lm_embd)


STAGE1_FIELDS = ("data", "val_data", "train_size", "qa_fraction", "max_objects", "seed", "tokenizer", "bpe_merges",
                 "lm_type", "lm_layers", "lm_embd", "lm_heads", "lm_steps", "lm_batch_size",
                 "lm_lr", "image_size", "vit_patch", "max_len")


def magma_config(cfg, lm):
    """The MagmaConfig of this run; lm is the GPT instance (tiny) or None (a path in cfg.lm)."""
    if cfg.vit == "tiny":
        vit = ViTConfig(image_size=cfg.image_size, patch_size=cfg.vit_patch, width=cfg.vit_width,
                        layers=cfg.vit_layers, heads=cfg.vit_heads, embed_dim=None)
    else:
        vit = cfg.vit
    adapters = AdapterConfig(kind=cfg.adapter_kind, places=tuple(cfg.adapter_places.split(",")),
                             downsample=cfg.adapter_downsample)
    image_size = None if cfg.vit == "tiny" or not cfg.image_size else cfg.image_size  # None: the ViT's own
    return MagmaConfig(lm=lm.config if lm is not None else cfg.lm, vit=vit, image_size=image_size,
                       adapters=adapters, prefix_dropout=cfg.prefix_dropout, freeze_vit=cfg.freeze_vit,
                       tokenizer=None if cfg.tokenizer in ("", "bpe", "byte") else cfg.tokenizer)


def param_groups(model, cfg):
    """MAGMA's two AdamW groups: adapters + image prefix at cfg.lr, the image encoder at cfg.vit_lr."""
    first = adapter_parameters(model.lm) + list(model.prefix.parameters())
    vit = [p for p in model.vit.parameters() if p.requires_grad]
    groups = [{"name": "adapters+prefix", "params": [p for p in first if p.requires_grad], "lr": cfg.lr}]
    if vit:
        groups.append({"name": "vit", "params": vit, "lr": cfg.vit_lr})
    grouped = {id(p) for g in groups for p in g["params"]}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise ValueError(f"trainable parameters outside MAGMA's groups: {stray[:5]}")
    return groups


def checkpoint_blocks(blocks):
    """Gradient checkpointing: each block's activations are recomputed in the backward pass."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class TextLoss(nn.Module):
    """Stage 1: next-token cross-entropy of a GPT on text alone (every position after the first)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, text_mask):
        logits = self.lm(input_ids[:, :-1])  # (B, T-1, V)
        targets = input_ids[:, 1:].masked_fill(~text_mask[:, 1:], -100)  # pads skipped, no mask selection
        loss = cross_entropy(logits.flatten(0, 1), targets.flatten()).sum()  # magma's: fused on a GPU
        return loss / (targets != -100).sum().clamp(min=1)  # the mean over real targets (0 if none)


def lr_factor(step, total, warmup, schedule, min_ratio):
    """Learning-rate multiplier at optimizer step `step`: linear warmup, then cosine/linear decay to
    min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


# ----------------------------------------------------------------------------------------------------
# Throughput figures for the progress bar (GPU only): tokens/s, MFU against the bf16 dense peak.

PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peak; keys tried in order, so longer names come first
    "H100 PCIe": 756, "H100 NVL": 835, "GH200": 989, "H100": 989, "H200 NVL": 835, "H200": 989, "H800": 989,
    "B200": 2250, "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70, "A10": 125,
    "RTX 4090": 165, "RTX 3090": 71,
}


def peak_tflops(device):
    """Dense bf16 peak of this GPU in TFLOP/s (PEAK_BF16_TFLOPS), or None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_sample(model, text_len):
    """Training FLOPs of one sample, matmul weights only (attention, norms and lookups ignored). A
    weight costs per token 2 FLOPs forward, 2 for the gradient of its input, 2 for its own gradient:
    the frozen LM's blocks 4N at every position (image prefix included), their trained adapters 6N,
    the frozen vocabulary projection 4N at the text positions only (the loss's), the image prefix
    and a trained ViT 6N per image token (a frozen ViT only its forward, 2N)."""
    if isinstance(model, TextLoss):  # stage 1: every weight trained, at every position
        return 6 * sum(p.numel() for p in model.parameters()) * text_len
    adapters = adapter_parameters(model.lm)  # LoRA's factors too, which are not nn.Linear layers
    ids = {id(p) for p in adapters}

    def matmul_weights(module):  # frozen or not, adapters excluded
        return sum(m.weight.numel() for m in module.modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m.weight) not in ids)
    vit_tokens = model.vit.config.grid ** 2 + 1
    image_tokens = vit_tokens if model.config.prefix_tokens == "all" else vit_tokens - 1
    lm_positions = image_tokens + text_len
    return (4 * matmul_weights(model.lm.transformer.h) * lm_positions
            + 6 * sum(p.numel() for p in adapters) * lm_positions
            + 4 * model.lm.lm_head.weight.numel() * text_len
            + 6 * model.prefix.proj.weight.numel() * image_tokens
            + (2 if model.config.freeze_vit else 6) * matmul_weights(model.vit) * vit_tokens)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one file, out_dir/ckpt.pt. It is a magma.py checkpoint (Magma.save: config and trained
# weights) with the training state added under "train": optimizer, scheduler, grad scaler, step,
# every process's RNG states, the TrainConfig. Written to a temporary file and renamed into place,
# so a crash mid-write never leaves a broken checkpoint behind.


def rng_state(device):
    """This process's random states. On CUDA only its own device's: a resumed run may see fewer GPUs."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(), "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                                                   for v in np.random.get_state()]}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and torch.is_tensor(state["cuda"]):  # a CPU run's checkpoint has none
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, model, train_state):
    """Magma.save with the training state added under "train" (written to a temporary file, then renamed)."""
    model.save(path, extra={"train": train_state})


def save_lm(path, lm, cfg):
    """Stage 1's result, with the settings that produced it (a later run with the same ones reuses it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    made_by = {k: getattr(cfg, k) for k in STAGE1_FIELDS}
    torch.save({"config": dataclasses.asdict(lm.config), "made_by": json.dumps(made_by),
                "state_dict": lm.state_dict()}, tmp)
    os.replace(tmp, path)


def load_lm(path, cfg):
    """The stage-1 LM in `path` if the same settings made it, else None."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(saved["made_by"]) != {k: getattr(cfg, k) for k in STAGE1_FIELDS}:
            return None
        lm = GPT(GPTConfig(**saved["config"]))
        lm.load_state_dict(saved["state_dict"])
    except Exception as e:
        raise SystemExit(f"train.py: error: {path}: not a stage-1 language model ({type(e).__name__}: {e})")
    return lm


# ----------------------------------------------------------------------------------------------------
# The training loop, shared by both stages.


class Logger:
    """JSON Lines records in out_dir/log.jsonl (rank 0 only), plus the console."""

    def __init__(self, dist, path):
        self.dist, self.path = dist, path
        self.kept = None  # after start(): the old lines to keep, until begin() writes them

    def log(self, record):
        if self.dist.main:
            self.begin()
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def begin(self):
        """Replace the log by the lines start() kept (once; with the first record or checkpoint)."""
        if self.dist.main and self.kept is not None:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(self.kept)
            os.replace(tmp, self.path)
            self.kept = None

    def start(self, resume_step=None):
        """A new run starts an empty log. A resumed one keeps the records up to its checkpoint and drops
        the stage-2 and eval records of the steps after it: those steps run again and log again. The file
        is rewritten only at the run's first record or checkpoint (begin), so a run that fails before
        either (a model folder without a model in it, say) leaves the old log as it was."""
        self.kept = []
        if not self.dist.main or resume_step is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short by the crash
                    continue
                if r.get("stage") not in ("stage 2: magma", "eval") or r.get("step", 0) <= resume_step:
                    self.kept.append(line if line.endswith("\n") else line + "\n")

    def print(self, *text):
        if self.dist.main:
            from tqdm import tqdm
            tqdm.write(" ".join(str(t) for t in text))


def fit(stage, model, forward, count, dataset, collate_fn, cfg, dist, logger, *, steps, batch_size, groups,
        schedule, start_step=0, resume_state=None, on_step=None, batch_flag="batch_size"):
    """Train `model` (an nn.Module) for `steps` optimizer steps; returns the step reached.

    forward(module, batch) -> mean loss over the batch's target tokens; count(batch) -> that number of
    tokens. Each optimizer step takes cfg.grad_accum micro-batches per process; every micro-batch's
    loss is weighted by its share of the step's tokens over all processes, so the update equals one
    process's update on the whole combined batch (with DDP, which averages gradients over processes).
    on_step(step, module, state) runs after every step (evaluation, checkpoints); it returns True to stop.
    """
    from tqdm import tqdm
    micro = batch_size // (dist.world * cfg.grad_accum)
    if micro * dist.world * cfg.grad_accum != batch_size:
        raise SystemExit(f"train.py: error: --{batch_flag}={batch_size} must be a multiple of processes "
                         f"({dist.world}) x --grad_accum ({cfg.grad_accum})")
    amp = autocast_dtype(cfg, dist.device)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=dist.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, *schedule))
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp == torch.float16)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        # The saved learning rates follow the saved --steps; with more steps the schedule is stretched
        # over the new total from here on, so this step's rates are recomputed on it too.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(start_step, steps, *schedule)
        if resume_state["scaler"] and scaler.is_enabled():  # empty unless the saved run used fp16
            scaler.load_state_dict(resume_state["scaler"])
    params = [p for g in groups for p in g["params"]]

    module = model
    if dist.world > 1:
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module)
    stream = batches(dataset, collate_fn, micro, dist, cfg, start=start_step * cfg.grad_accum, batch_flag=batch_flag)
    peak, sample_flops = peak_tflops(dist.device), {}
    skipped = resume_state.get("skipped", 0) if resume_state else 0
    bar = tqdm(total=steps, initial=start_step, desc=stage, disable=not (dist.main and cfg.progress),
               dynamic_ncols=True, leave=True)
    model.train()
    step = start_step
    t0 = time.perf_counter()
    while step < steps:
        # Token counts are taken on the host copies, and the loss is summed on the device: the step
        # reads one number back from the GPU (after its optimizer update), so the host never waits
        # on a half-finished step.
        host_batches = [next(stream) for _ in range(cfg.grad_accum)]
        counts = [int(count(b)) for b in host_batches]
        new_skips = sum(len(b["skipped"]) for b in host_batches)
        micro_batches = [to_device(b, dist.device) for b in host_batches]
        n_local = sum(counts)
        n_total = dist.all_sum(n_local)
        if n_total == 0:
            raise SystemExit(f"train.py: error: {stage}: step {step + 1}'s batches hold no text token to predict")
        loss_sum = torch.zeros((), device=dist.device)
        for i, (b, n) in enumerate(zip(micro_batches, counts)):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or dist.world == 1) else module.no_sync()
            with sync:
                with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
                    loss = forward(module, b)
                scaler.scale(loss * (n * dist.world / n_total)).backward()
            loss_sum += loss.detach().float() * n
        grad_norm = None
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # read after the update
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step += 1

        loss_total, step_skips = dist.all_sum(loss_sum, new_skips)  # every process's unreadable images too
        loss_value = loss_total / n_total
        skipped += int(step_skips)
        if not math.isfinite(loss_value):
            raise SystemExit(f"train.py: error: {stage} loss is {loss_value} at step {step}; "
                             "lower the learning rate or use --precision=fp32")
        elapsed = time.perf_counter() - t0
        samples_s = batch_size / elapsed
        record = {"stage": stage, "step": step, "loss": round(loss_value, 6),
                  "lr": lr_used, "samples_per_s": round(samples_s, 2),
                  "skipped_images": skipped}
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm.item(), 4)
        if dist.device.type == "cuda":
            seq = micro_batches[0]["input_ids"].shape[1]
            record["tokens_per_s"] = round(n_total / elapsed, 1)
            record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(dist.device) / 2**30, 2)
            if peak:
                if seq not in sample_flops:  # counted once per text length: it walks every module
                    sample_flops[seq] = flops_per_sample(model, seq)
                record["mfu"] = round(sample_flops[seq] * samples_s / (peak * 1e12 * dist.world), 4)
        bar.update(1)
        bar.set_postfix({k: record[k] for k in ("loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb")
                         if k in record}, refresh=False)
        if step % cfg.log_every == 0 or step == steps:
            logger.log(record)
        if on_step is not None:
            state = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "skipped": skipped}
            if on_step(step, model, state):
                break
        t0 = time.perf_counter()  # after on_step: evaluation and checkpoints are not charged to a step
    bar.close()
    if skipped:
        logger.print(f"{stage}: skipped {skipped} unreadable image(s) (paths in the warnings above)")
    return step


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def validation_loss(model, dataset, collate_fn, cfg, device, batch_size):
    amp = autocast_dtype(cfg, device)
    total, n = 0.0, 0
    with evaluating(model):
        for i in range(min(cfg.eval_batches, max(1, len(dataset) // batch_size))):
            items = [dataset[j % len(dataset)] for j in range(i * batch_size, (i + 1) * batch_size)]
            b = to_device(collate_fn(items), device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(b["pixels"], b["input_ids"], b["text_mask"])
            k = int(b["text_mask"].sum())
            total, n = total + loss.item() * k, n + k
    return total / max(n, 1)


@torch.no_grad()
def greedy(model, prompts, max_new_tokens, batch_size=100):
    """Greedy continuations of interleaved prompts, in chunks."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += model.generate(prompts[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                              top_k=0, top_p=1.0)
    return out


def shapes_metrics(model, val, cfg, n=None):
    """Greedy captions and answers for n held-out scenes -> (scores dict, examples, predictions)."""
    n = min(n or len(val), len(val))
    examples = [val.example(i) for i in range(n)]
    max_new = max(len(model.tokenizer.encode(e["caption"])) for e in examples) + 8
    captions = greedy(model, [[e["image"]] for e in examples], max_new)
    scores = {f"caption_{k}": v for k, v in data.caption_scores(captions, [e["scene"] for e in examples]).items()}
    if cfg.qa_fraction > 0:
        qs = [e["questions"][i % len(e["questions"])] for i, e in enumerate(examples)]  # one question each
        longest = max(len(model.tokenizer.encode(" " + a)) for _, a, _ in qs)
        answers = greedy(model, [[e["image"], data.qa_prompt(q)] for e, (q, _, _) in zip(examples, qs)], longest + 4)
        scores.update({f"answer_{k}": v for k, v in
                       data.answer_scores(answers, [a for _, a, _ in qs], [k for _, _, k in qs]).items()})
    return scores, examples, captions


def evaluate(step, model, val, collate_fn, cfg, dist, logger, final=False):
    """Validation loss, greedy captions of fixed validation images, and (shapes) accuracies."""
    record = {"stage": "eval", "step": step,
              "val_loss": round(validation_loss(model, val, collate_fn, cfg, dist.device, 32), 6)}
    if isinstance(val, data.ShapesDataset):
        scores, examples, captions = shapes_metrics(model, val, cfg, n=None if final else 200)
        record.update({k: round(v, 4) for k, v in scores.items()})
        shown = list(zip(captions, [e["caption"] for e in examples]))[:cfg.eval_images]
    else:
        items = [val[i] for i in range(min(cfg.eval_images, len(val)))]
        captions = greedy(model, [[it["image"]] for it in items], 40)
        shown = list(zip(captions, [it["caption"] for it in items]))
        examples = [{"image": it["image"], "caption": it["caption"]} for it in items]
    record["samples"] = [{"predicted": p, "truth": t} for p, t in shown]
    logger.log(record)
    logger.print(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in record.items()
                                               if k not in ("stage", "step", "samples")))
    for p, t in shown:
        logger.print(f"  {p!r}  (truth: {t!r})")
    return record, examples, captions  # in the mode it came in: validation_loss and generate put it back


def draw_grid(path, examples, captions, columns=4, cell=160):
    """A PNG of images with their predicted captions under them (green: exact, red: wrong)."""
    font = ImageFont.load_default()
    rows = math.ceil(len(examples) / columns)
    text_h = 64
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (e, c) in enumerate(zip(examples, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(e["image"].convert("RGB").resize((cell - 8, cell - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
        colour = (0, 130, 0) if c.strip() == e["caption"] else (200, 0, 0)
        words, lines = c.split(), [""]
        for w in words:  # wrap to the cell width
            if draw.textlength(lines[-1] + " " + w, font=font) > cell - 8 and lines[-1]:
                lines.append(w)
            else:
                lines[-1] = (lines[-1] + " " + w).strip()
        draw.multiline_text((x + 4, y + cell), "\n".join(lines[:5]), fill=colour, font=font, spacing=2)
    grid.save(path)


def final_report(model, val, collate_fn, cfg, dist, logger, step):
    """What the default run ends with: captions beside the truth, samples.png, held-out accuracy."""
    record, examples, captions = evaluate(step, model, val, collate_fn, cfg, dist, logger, final=True)
    n_show = min(12, len(examples))
    print("\nheld-out images, greedy caption vs truth:")
    for e, c in list(zip(examples, captions))[:n_show]:
        print(f"  {'ok' if c.strip() == e['caption'] else '--'}  {c.strip():<80s} | {e['caption']}")
    grid_path = os.path.join(cfg.out_dir, "samples.png")
    if examples:
        draw_grid(grid_path, examples[:16], captions[:16])
        print(f"\nwrote {grid_path}")
    if "caption_exact" in record:
        line = (f"held-out exact match: captions {100 * record['caption_exact']:.1f}% of {len(examples)} scenes "
                f"(count {100 * record['caption_count']:.1f}%, "
                + ", ".join(f"{a} {100 * record['caption_' + a]:.1f}%" for a in data.ATTRIBUTES) + ")")
        if "answer_exact" in record:
            line += f"; answers {100 * record['answer_exact']:.1f}%"
        print(line)
    return record


def pretrain_lm(lm, train_set, tokenizer, cfg, dist, logger):
    """Stage 1: train every weight of the tiny GPT on the training texts alone."""
    lm.to(dist.device)
    texts = PackedTexts(train_set, tokenizer, lm.config.block_size, cfg.seed)
    loss = TextLoss(lm)
    fit("stage 1: language model", loss, lambda m, b: m(b["input_ids"], b["text_mask"]),
        lambda b: b["text_mask"][:, 1:].sum(), texts, collate_rows, cfg, dist, logger,
        steps=cfg.lm_steps, batch_size=cfg.lm_batch_size, batch_flag="lm_batch_size",
        groups=[{"name": "lm", "params": list(lm.parameters()), "lr": cfg.lm_lr}],
        schedule=(min(50, cfg.lm_steps // 10), "cosine", 0.1))
    lm.eval()
    lm.cpu()


# ----------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg, given = parse_config(argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    RUN.update(ckpt=ckpt_path, saved=cfg.resume)  # a resumed run has a checkpoint to go back to
    resume = saved_file = None
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"train.py: error: --resume: no checkpoint at {ckpt_path}")
        try:
            saved_file = read_magma_checkpoint(ckpt_path)  # read once: the model below comes from it too
        except ValueError as e:
            raise SystemExit(f"train.py: error: --resume: {e}")
        if "train" not in saved_file:
            raise SystemExit(f"train.py: error: --resume: {ckpt_path} holds a model but no training state "
                             f"(written by Magma.save, not train.py): nothing to continue")
        resume = saved_file["train"]
        # The same run: its saved config, with what this command line changes (e.g. more --steps).
        given = {k: v for k, v in given.items() if k != "resume"}
        saved = TrainConfig(**json.loads(resume["config"]))
        fixed = sorted(k for k in set(given) & set(RESUME_FIXED) if given[k] != getattr(saved, k))
        if fixed:
            raise SystemExit(f"train.py: error: --resume continues the saved model, optimizer and schedule; "
                             f"--{fixed[0]} cannot change from {getattr(saved, fixed[0])!r} (start a new run "
                             f"in another --out_dir)")
        cfg = dataclasses.replace(saved, **given, resume=True)
        check_config(cfg)
        if resume["step"] >= cfg.steps:
            raise SystemExit(f"train.py: error: --resume: the run in {cfg.out_dir} is finished ({resume['step']} "
                             f"of --steps={cfg.steps}); give more --steps to train on")
    elif os.path.exists(ckpt_path) and not cfg.overwrite:
        raise SystemExit(f"train.py: error: {ckpt_path} holds a run already: continue it with --resume, start "
                         f"over with --overwrite, or pick another --out_dir")
    else:
        check_paths(cfg)
    dist = setup(cfg)
    frozen_lm_dtype(cfg, dist.device)  # --lm_dtype checked against --precision before any work
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same on every process: identical initial weights
    train_set, val_set = make_datasets(cfg)  # a bad --data fails here, before out_dir or its log is touched
    if dist.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    dist.barrier()
    logger = Logger(dist, os.path.join(cfg.out_dir, "log.jsonl"))
    logger.start(resume_step=resume["step"] if resume is not None else None)
    if val_set is train_set:
        logger.print(f"note: {cfg.data} has too few images to hold 1 in 100 out: the validation figures are "
                     f"on the training data; give --val_data for held-out ones")
    if cfg.warmup_steps >= cfg.steps:
        logger.print(f"note: --warmup_steps={cfg.warmup_steps} >= --steps={cfg.steps}: the learning rate never "
                     f"reaches its peak --lr={cfg.lr}")
    tokenizer = make_tokenizer(cfg, train_set, logger) if resume is None else None
    t_start = time.perf_counter()

    # Stage 1: the "pretrained" language model (tiny LM only), then stage 2 around it.
    if resume is not None:
        # Base weights the checkpoint does not hold come from where they were, or from --lm / --vit if
        # given now (moved); Magma.load checks them against the fingerprints saved with the run.
        model = Magma.load(ckpt_path, checkpoint=saved_file, lm=given.get("lm"), vit=given.get("vit"))
        saved_file = None  # the weights are in the model now; the training state stays in `resume`
        start_step = resume["step"]
        logger.print(f"resuming {ckpt_path} at step {start_step}")
    else:
        lm = None
        if cfg.lm == "tiny":
            lm_path = os.path.join(cfg.out_dir, "lm.pt")
            lm = load_lm(lm_path, cfg) if cfg.lm_steps > 0 else None
            if lm is not None:
                logger.print(f"stage 1: reusing the language model in {lm_path} (same settings)")
            else:
                lm = GPT(tiny_lm_config(cfg, tokenizer))
                if cfg.lm_steps > 0:
                    pretrain_lm(lm, train_set, tokenizer, cfg, dist, logger)
                    if dist.main:
                        save_lm(lm_path, lm, cfg)
        model = Magma(magma_config(cfg, lm), lm=lm, tokenizer=tokenizer)
        start_step = 0
    lm_dtype = frozen_lm_dtype(cfg, dist.device)
    if lm_dtype is not None:  # after Magma recorded its base fingerprint, so checkpoints still match the source
        cast_frozen(model.lm, lm_dtype)
    model.to(dist.device)
    if cfg.grad_checkpointing:
        checkpoint_blocks(list(model.lm.transformer.h) + list(model.vit.blocks))
    torch.manual_seed(cfg.seed + 1 + dist.rank)  # per-process randomness (dropout) from here on; a resume
                                                  # on as many processes restores the saved states instead
    if resume is not None and len(resume["rng"]) == dist.world:  # else the per-process seeds above
        set_rng_state(resume["rng"][dist.rank], dist.device)
    logger.print(adapter_report(model, model.lm))

    collate_fn = functools.partial(data.collate, tokenizer=model.tokenizer, image_size=model.image_size,
                                   max_len=cfg.max_len)
    stopped = {"early": False}
    steps_this_run = [0]

    def on_step(step, module, state):
        steps_this_run[0] += 1
        stop = cfg.stop_after > 0 and steps_this_run[0] >= cfg.stop_after and step < cfg.steps
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop:
            rngs = [rng_state(dist.device)]
            if dist.world > 1:
                rngs = [None] * dist.world
                torch_dist.all_gather_object(rngs, rng_state(dist.device))
            if dist.main:
                logger.begin()  # the log's old lines go now, not at a resume after Ctrl-C (see Logger.start)
                save_checkpoint(ckpt_path, model, {
                    "step": step, "optimizer": state["optimizer"].state_dict(),
                    "scheduler": state["scheduler"].state_dict(), "scaler": state["scaler"].state_dict(),
                    "rng": rngs, "skipped": state["skipped"], "world": dist.world,
                    "config": json.dumps(dataclasses.asdict(cfg))})
                RUN["saved"] = True
            dist.barrier()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            if dist.main:
                evaluate(step, model, val_set, collate_fn, cfg, dist, logger)
            dist.barrier()
        stopped["early"] = stop
        return stop

    step = fit("stage 2: magma", model,
               lambda m, b: m(b["pixels"], b["input_ids"], b["text_mask"]),
               lambda b: b["text_mask"].sum(), train_set, collate_fn, cfg, dist, logger,
               steps=cfg.steps, batch_size=cfg.batch_size, groups=param_groups(model, cfg),
               schedule=(cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio), start_step=start_step,
               resume_state=resume, on_step=on_step)
    record = None
    if stopped["early"]:
        logger.print(f"stopped after step {step} of {cfg.steps}; continue with --resume --out_dir={cfg.out_dir}")
    elif dist.main:
        record = final_report(model, val_set, collate_fn, cfg, dist, logger, step)
        minutes = (time.perf_counter() - t_start) / 60
        print(f"checkpoint: {ckpt_path} ({minutes:.1f} min); caption an image with\n"
              f"  python magma.py --checkpoint {ckpt_path} --image IMAGE.png --temperature 0")
    dist.barrier()
    if dist.world > 1:
        torch_dist.destroy_process_group()
    return record


RUN = {}  # this process's run, for the message after Ctrl-C: its checkpoint path, whether it has one


def interrupted_line():
    """What to do after Ctrl-C: resume from this run's checkpoint if it wrote one (or resumed one)."""
    path = RUN.get("ckpt")
    if path and RUN.get("saved") and os.path.isfile(path):
        return f"train.py: interrupted; continue from the last checkpoint with --resume --out_dir={os.path.dirname(path) or '.'}"
    return ("train.py: interrupted before this run wrote a checkpoint (stage 2 writes one every --save_every "
            "steps): nothing to resume; run it again")


def error_line(e):
    """The message of a user-facing error. Raised in a DataLoader worker, it comes back with the
    worker's traceback in its text, whose last line is the original exception and message."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    try:
        main()
    except (data.ImageError, OSError, ValueError) as e:  # a user's bad path, file or value: one line
        sys.exit(f"train.py: error: {error_line(e)}")
    except KeyboardInterrupt:  # checkpoints are written by rename, so the last one is whole
        print("\n" + interrupted_line(), file=sys.stderr)
        sys.exit(130)
