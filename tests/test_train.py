"""Tests for train.py: a tiny end-to-end run, DDP parity, resume, precisions, unreadable images, flags.

Every run here is a real `train.main([...])` (or `torchrun ... train.py`) on tiny models, writing into
a tmp_path; the figures they compare come from the run's log.jsonl and ckpt.pt.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import attention
import data
import magma
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(lm_layers=1, lm_embd=32, lm_heads=2, vit_patch=16, vit_width=32, vit_layers=1, vit_heads=2,
            image_size=32, train_size=256, val_size=8, eval_every=0, eval_batches=1, eval_images=2,
            log_every=1, progress=False, lm_steps=0, steps=3, batch_size=8, warmup_steps=1, qa_fraction=0.25,
            device="cpu")  # the same small runs on a machine with a GPU (the GPU paths have their own tests)


def args(out_dir, **overrides):
    cfg = dict(TINY, out_dir=str(out_dir), **overrides)
    return [f"--{k}={v}" for k, v in cfg.items()]


def log(out_dir, stage="stage 2: magma"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


def state(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------


def test_help_lists_options_and_presets(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--lr", "--vit_lr", "--grad_accum", "--precision", "--resume", "gpt2-clip", "shapes", "coco:"):
        assert text in out


def test_presets_and_overrides():
    cfg, given = train.parse_config(["--steps=7", "--strict", "--lr=1e-4"])
    assert (cfg.steps, cfg.strict, cfg.lr, cfg.data) == (7, True, 1e-4, "shapes")
    assert given == {"steps": 7, "strict": True, "lr": 1e-4}
    cfg, _ = train.parse_config(["--preset=gpt2-clip", "--lm=gpt2", "--vit=clip.pt", "--data=x.jsonl"])
    assert (cfg.lr, cfg.vit_lr, cfg.beta2, cfg.batch_size) == (8e-4, 2e-6, 0.95, 256)
    with pytest.raises(SystemExit, match="--lm"):
        train.parse_config(["--preset=gpt2-clip", "--data=x.jsonl", "--vit=clip.pt"])
    with pytest.raises(SystemExit, match="precision"):
        train.parse_config(["--precision=fp8"])
    with pytest.raises(SystemExit, match="tokenizer.*tiny LM"):
        train.parse_config(["--lm=gpt2/", "--tokenizer=bpe"])
    with pytest.raises(SystemExit):
        train.parse_config(["--no_such_flag=1"])
    for flag in ("--log_every=0", "--vit_patch=0", "--lm_batch_size=0", "--val_size=0", "--eval_every=-1"):
        with pytest.raises(SystemExit, match=flag.split("=")[0]):
            train.parse_config([flag])
    with pytest.raises(SystemExit, match="one patch"):
        train.parse_config(["--image_size=16", "--vit_patch=24", "--data=x.jsonl"])
    with pytest.raises(SystemExit, match="--batch_size=63: must be a multiple of --grad_accum=2"):
        train.parse_config(["--batch_size=63", "--grad_accum=2"])
    with pytest.raises(SystemExit, match="--lm_batch_size=15: must be a multiple of --grad_accum=2"):
        train.parse_config(["--lm_batch_size=15", "--grad_accum=2"])


def test_a_mistyped_path_is_refused_before_any_work(tmp_path, capsys):
    for flag, message in [("--lm", "no such folder"), ("--vit", "no such file or folder"),
                          ("--tokenizer", "no such folder")]:
        argv = ["--preset=gpt2-clip", f"--out_dir={tmp_path / 'run'}", f"--data={tmp_path / 'd.jsonl'}",
                "--lm=" + str(tmp_path),
                "--vit=ViT-B/16", f"{flag}={tmp_path / 'typo'}"]
        with pytest.raises(SystemExit, match=f"{flag}=.*typo.*{message}"):
            train.main(argv)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="--lm=.*model.safetensors'?: is a file, not a folder"):
        train.main(["--preset=gpt2-clip", f"--out_dir={tmp_path / 'run'}", "--data=d.jsonl", "--vit=ViT-B/16",
                    f"--lm={tmp_path / 'model.safetensors'}"])
    with pytest.raises(SystemExit, match="--tokenizer=.*model.safetensors'?: is a file, but not a .json one"):
        train.main(["--preset=gpt2-clip", f"--out_dir={tmp_path / 'run'}", "--data=d.jsonl", "--vit=ViT-B/16",
                    f"--lm={tmp_path}", f"--tokenizer={tmp_path / 'model.safetensors'}"])
    assert capsys.readouterr().out == "" and not (tmp_path / "run").exists()  # nothing ran, nothing written
    (tmp_path / "tokenizer.json").write_text("{}")  # a tokenizer.json file passes (its contents are read later)
    cfg, _ = train.parse_config(["--preset=gpt2-clip", "--data=d.jsonl", f"--lm={tmp_path}", "--vit=ViT-B/16",
                                 f"--tokenizer={tmp_path / 'tokenizer.json'}"])
    train.check_paths(cfg)


@pytest.mark.parametrize("flag", ["--lr=nan", "--lr=-1", "--vit_lr=inf", "--lm_lr=nan", "--weight_decay=-1",
                                  "--grad_clip=nan", "--beta1=1.5", "--beta2=nan", "--prefix_dropout=1",
                                  "--min_lr_ratio=nan", "--qa_fraction=2", "--seed=-1", "--max_objects=0",
                                  "--max_objects=10", "--val_data=val.jsonl", "--out_dir=", "--lm_embd=30",
                                  "--vit_width=90", "--lm_type=llama", "--adapter_kind=foo",
                                  "--adapter_places=mlp,ffn", "--adapter_downsample=0", "--adapter_downsample=1000"])
def test_bad_values_are_refused_up_front_naming_the_flag(flag):
    with pytest.raises(SystemExit, match=f"train.py: error: {flag.split('=')[0]}="):
        train.parse_config([flag])


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit, match="--out_dir=.*afile.*is a file, not a folder"):
        train.main([f"--out_dir={tmp_path / 'afile'}"])
    assert (tmp_path / "afile").read_text() == "mine"


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, idx):
        raise data.ImageError("image not found: gone.png")


def test_after_ctrl_c_resume_is_offered_only_when_this_run_has_a_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"an earlier run's checkpoint (--overwrite)")
    monkeypatch.setattr(train, "RUN", dict(ckpt=str(ckpt), saved=False))
    assert "nothing to resume" in train.interrupted_line()  # stopped before its first --save_every
    monkeypatch.setitem(train.RUN, "saved", True)  # written by this run, or the one it resumed
    assert train.interrupted_line().endswith(f"continue from the last checkpoint with --resume --out_dir={tmp_path}")
    train.main(args(tmp_path / "run", steps=2))  # and main() sets the flag when it saves
    assert train.RUN == {"ckpt": str(tmp_path / "run" / "ckpt.pt"), "saved": True}


def test_an_error_in_a_dataloader_worker_is_reported_in_one_line():
    with pytest.raises(data.ImageError) as e:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(e.value)  # the worker's traceback rides along in the message
    assert train.error_line(e.value) == "image not found: gone.png"
    assert train.error_line(ValueError("bad value: 3")) == "bad value: 3"


def test_lr_schedule():
    f = lambda s, kind: train.lr_factor(s, 100, 10, kind, 0.1)  # noqa: E731
    assert f(0, "cosine") == pytest.approx(0.1) and f(9, "cosine") == pytest.approx(1.0)
    assert f(10, "cosine") == pytest.approx(1.0) and f(100, "cosine") == pytest.approx(0.1)
    assert f(55, "cosine") == pytest.approx(0.55) and f(55, "linear") == pytest.approx(0.55)
    assert f(30, "linear") == pytest.approx(0.1 + 0.9 * (1 - 20 / 90))
    assert f(80, "constant") == 1.0


def test_tiny_end_to_end(tmp_path, capsys):
    """Both stages in seconds: the loss falls, held-out captions beat chance, the frozen LM is unchanged,
    and magma.py captions an image from the checkpoint."""
    out = tmp_path / "run"
    # Byte tokens and MLP adapters: at this size and in 300 steps they learn more reliably than the
    # default run's learned BPE.
    record = train.main(args(out, tokenizer="byte", adapter_places="mlp", adapter_downsample=4,
                             lm_layers=2, lm_embd=64, lm_heads=4, vit_width=64,
                             lm_steps=200, lm_batch_size=16, steps=300, batch_size=32, lr=3e-3, vit_lr=3e-3,
                             warmup_steps=10, max_objects=1, qa_fraction=0.0, val_size=64, train_size=4096))
    text = capsys.readouterr().out
    assert "held-out exact match" in text and "greedy caption vs truth" in text
    assert os.path.isfile(out / "samples.png")
    lm_log, magma_log = log(out, "stage 1: language model"), log(out)
    assert lm_log[-1]["loss"] < 0.5 * lm_log[0]["loss"]
    first, last = sum(r["loss"] for r in magma_log[:5]) / 5, sum(r["loss"] for r in magma_log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    # Chance: position 1/4, colour 1/5, shape 1/4, size 1/2 per object.
    chance = {"position": 0.25, "colour": 0.2, "shape": 0.25, "size": 0.5}
    gain = sum(record[f"caption_{a}"] - c for a, c in chance.items()) / len(chance)
    assert record["caption_count"] > 0.9 and gain > 0.15, record

    # The frozen LM: bit-identical to what stage 1 produced.
    lm = torch.load(out / "lm.pt", weights_only=True)["state_dict"]
    frozen = {k[len("lm."):].replace(".module.", "."): v for k, v in state(out)["state_dict"].items()
              if k.startswith("lm.") and ".adapter." not in k}  # names without the adapter wrappers
    assert frozen.keys() == lm.keys()
    assert all(torch.equal(frozen[k], lm[k]) for k in lm)

    # magma.py reads the checkpoint and captions a held-out image.
    val = data.ShapesDataset("val", 4, 32, max_objects=1)
    png = tmp_path / "scene.png"
    val.example(0)["image"].save(png)
    caption = magma.main(["--device", "cpu", "--checkpoint", str(out / "ckpt.pt"), "--image", str(png),
                          "--temperature", "0", "--max-new-tokens", "100"])
    assert caption.startswith("a ") and "in the" in caption and "\n" not in caption


def _torchrun(out_dir, nproc, **overrides):
    # torchrun leaves a torchelastic_* folder in TMPDIR: in the test's own folder, not in /tmp
    tmp = out_dir.parent / f"tmp-{out_dir.name}"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py"] + args(out_dir, **overrides)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_ddp_two_processes_equal_one_process_with_the_combined_batch(tmp_path):
    """gloo on CPU: 2 processes x 2 accumulation micro-batches of 2 == 1 process with batches of 8."""
    common = dict(lm_steps=2, lm_batch_size=8, steps=3, batch_size=8, prefix_dropout=0.0)
    train.main(args(tmp_path / "one", grad_accum=1, **common))
    _torchrun(tmp_path / "two", 2, grad_accum=2, **common)
    one, two = state(tmp_path / "one")["state_dict"], state(tmp_path / "two")["state_dict"]
    assert one.keys() == two.keys()
    diffs = {k: (one[k].float() - two[k].float()).abs().max().item() for k in one}
    assert max(diffs.values()) <= 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    moved = state(tmp_path / "one")["state_dict"]["prefix.proj.weight"]
    assert not torch.equal(moved, torch.zeros_like(moved))
    losses_one = [r["loss"] for r in log(tmp_path / "one")]
    losses_two = [r["loss"] for r in log(tmp_path / "two")]
    assert losses_one == pytest.approx(losses_two, abs=1e-5)
    assert state(tmp_path / "two")["train"]["world"] == 2


def test_resume_continues_the_same_run(tmp_path):
    """Stop after 3 of 6 steps, resume: the same per-step losses as an uninterrupted run (dropout on,
    so the RNG state must come back too)."""
    common = dict(steps=6, prefix_dropout=0.3, lm_steps=3, lm_batch_size=8, train_size=40)  # 5 steps/epoch
    train.main(args(tmp_path / "straight", **common))
    train.main(args(tmp_path / "split", stop_after=3, **common))
    assert [r["step"] for r in log(tmp_path / "split")] == [1, 2, 3]
    assert state(tmp_path / "split")["train"]["step"] == 3
    with open(tmp_path / "split" / "log.jsonl", "a") as f:  # a crash after step 4 was logged, not saved
        f.write(json.dumps({"stage": "stage 2: magma", "step": 4, "loss": 0.0}) + "\n")
        f.write('{"stage": "eval", "st')  # and a line cut short
    train.main(args(tmp_path / "split", **common) + ["--resume"])  # the same command line again, resumed
    straight, split = log(tmp_path / "straight"), log(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7))  # step 4 once: the crash's record was dropped
    assert len(log(tmp_path / "split", "stage 1: language model")) == 3  # stage 1's records were kept
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in straight], abs=1e-6)
    assert [r["lr"] for r in split] == pytest.approx([r["lr"] for r in straight])
    a, b = state(tmp_path / "straight")["state_dict"], state(tmp_path / "split")["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main([f"--out_dir={tmp_path / 'nothing'}", "--resume"])
    magma.Magma().save(str(tmp_path / "model" / "ckpt.pt"))
    with pytest.raises(SystemExit, match="holds a model but no training state \\(written by Magma.save"):
        train.main([f"--out_dir={tmp_path / 'model'}", "--resume"])
    (tmp_path / "model" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="--resume: .*ckpt.pt: not a readable MAGMA checkpoint"):
        train.main([f"--out_dir={tmp_path / 'model'}", "--resume"])
    # What a checkpoint's optimizer state or model fixes cannot change on resume, a finished run has
    # nothing to resume, and a run is never overwritten unasked, nor its log by a command that fails.
    with pytest.raises(SystemExit, match="--lr cannot change from 0.002"):
        train.main([f"--out_dir={tmp_path / 'split'}", "--resume", "--lr=0.5"])
    with pytest.raises(SystemExit, match="--lm_layers cannot change from 1"):
        train.main([f"--out_dir={tmp_path / 'split'}", "--resume", "--steps=9", "--lm_layers=5"])
    with pytest.raises(SystemExit, match="is finished \\(6 of --steps=6\\); give more --steps"):
        train.main([f"--out_dir={tmp_path / 'split'}", "--resume"])
    saved, logged = state(tmp_path / "split")["train"]["step"], (tmp_path / "split" / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match="holds a run already.*--resume.*--overwrite"):
        train.main(args(tmp_path / "split", **common))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train.main(args(tmp_path / "split", overwrite=True, data=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty").mkdir()  # a folder, but no model in it: found only after the log was started
    with pytest.raises(OSError, match="empty"):
        train.main(args(tmp_path / "split", overwrite=True, lm=str(tmp_path / "empty"), tokenizer=""))
    assert state(tmp_path / "split")["train"]["step"] == saved
    assert (tmp_path / "split" / "log.jsonl").read_text() == logged
    train.main(args(tmp_path / "split", overwrite=True, **dict(common, steps=1)))
    assert state(tmp_path / "split")["train"]["step"] == 1
    assert [r["step"] for r in log(tmp_path / "split")] == [1]  # a new run, a new log


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    train.main(args(tmp_path / "plain", steps=2))
    train.main(args(tmp_path / "ckpt", steps=2, grad_checkpointing=True))
    assert [r["loss"] for r in log(tmp_path / "plain")] == pytest.approx([r["loss"] for r in log(tmp_path / "ckpt")],
                                                                        abs=1e-6)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler")
def test_compile_gives_the_same_run(tmp_path, monkeypatch):
    """--compile (torch.compile of the model; ~15 s of compiling here) computes the eager run's losses."""
    train.main(args(tmp_path / "eager", steps=3))
    compiled_modules, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, *a, **kw: compiled_modules.append(m) or compile(m, *a, **kw))
    train.main(args(tmp_path / "compiled", steps=3, compile=True))
    assert len(compiled_modules) == 1 and isinstance(compiled_modules[0], magma.Magma)  # (no stage 1 here)
    eager, compiled = [r["loss"] for r in log(tmp_path / "eager")], [r["loss"] for r in log(tmp_path / "compiled")]
    assert compiled == pytest.approx(eager, abs=1e-4)
    magma.Magma.load(str(tmp_path / "compiled" / "ckpt.pt"))  # the checkpoint holds the model's own names


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_a_step_on_cpu(tmp_path, precision):
    train.main(args(tmp_path, precision=precision, steps=2))
    records = log(tmp_path)
    assert len(records) == 2 and all(0 < r["loss"] < 20 for r in records)
    scaler = state(tmp_path)["train"]["scaler"]
    if precision == "fp16":
        assert scaler["scale"] > 0  # the GradScaler was in use
    else:
        assert not scaler  # bf16 needs no scaling: a disabled scaler saves an empty state
    # --lm_dtype=auto held the frozen LM in the autocast dtype; the adapters stayed fp32
    saved = state(tmp_path)["state_dict"]
    half = DTYPES[precision]
    assert saved["lm.transformer.h.0.attn.module.c_attn.weight"].dtype == half
    assert all(v.dtype == torch.float32 for k, v in saved.items() if ".adapter." in k)
    model = magma.Magma.load(str(tmp_path / "ckpt.pt"))  # and the checkpoint loads and captions
    assert len(model.generate_ids([[torch.zeros(3, 32, 32)]], max_new_tokens=3, temperature=0)) == 1
    train.main(args(tmp_path / "fp32lm", precision=precision, lm_dtype="fp32", steps=1))
    other = "fp16" if precision == "bf16" else "bf16"
    with pytest.raises(SystemExit, match=f"--lm_dtype={other} needs --precision={other}"):
        train.main(args(tmp_path / "mixed", precision=precision, lm_dtype=other))
    assert state(tmp_path / "fp32lm")["state_dict"]["lm.transformer.h.0.attn.module.c_attn.weight"].dtype == torch.float32
    # The optimizer stepped (the GradScaler's step is easy to lose) ...
    steps = [int(s["step"]) for s in state(tmp_path)["train"]["optimizer"]["state"].values()]
    assert steps and all(n == 2 for n in steps), steps
    # ... and autocast ran: with the LM in fp32 too, the first loss differs from a plain fp32 run's (the
    # same weights and batch) by a half-precision rounding, neither equal nor far
    train.main(args(tmp_path / "fp32", precision="fp32", steps=1))
    amp_loss, fp32_loss = log(tmp_path / "fp32lm")[0]["loss"], log(tmp_path / "fp32")[0]["loss"]
    assert amp_loss != fp32_loss and abs(amp_loss - fp32_loss) < 0.02 * fp32_loss, (amp_loss, fp32_loss)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _jsonl_with_bad_images(root):
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]):
        Image.new("RGB", (40, 30), colour).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"colour {i}"})
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    rows.insert(2, {"image": "missing.png", "caption": "gone"})
    rows.insert(5, {"image": "corrupt.jpg", "caption": "broken"})
    with open(root / "data.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(root / "data.jsonl")


def test_unreadable_images_are_skipped_and_counted_or_stop_the_run(tmp_path, caplog):
    # --val_data given: without it a record whose path hashes into the held-out 1% (the tmp_path
    # differs between runs) would leave training, and a bad image held out is never met or counted.
    path = _jsonl_with_bad_images(tmp_path)
    train.main(args(tmp_path / "run", data=path, val_data=path, steps=4, batch_size=4, eval_images=1))
    records = log(tmp_path / "run")
    assert "missing.png" in caplog.text and "corrupt.jpg" in caplog.text
    with pytest.raises(data.ImageError, match=r"missing\.png|corrupt\.jpg"):
        train.main(args(tmp_path / "strict", data=path, val_data=path, steps=4, batch_size=4, strict=True))
    # 4 steps of 4 = two passes over the 8 records: each of the 2 bad ones is met twice (more if a
    # stand-in drawn for one is bad too). 2 processes sharing those batches meet the same records, and
    # the count covers every process, not rank 0's alone.
    assert records[-1]["skipped_images"] >= 4
    _torchrun(tmp_path / "ddp", 2, data=path, val_data=path, steps=4, batch_size=4, eval_images=1)
    assert log(tmp_path / "ddp")[-1]["skipped_images"] == records[-1]["skipped_images"]


def test_public_checkpoints_and_a_file_dataset(tmp_path, capsys):
    """The gpt2-clip path on tiny stand-ins of its inputs: a Hugging Face GPT-2 directory with its
    tokenizer files, an OpenAI CLIP state dict and a JSON Lines dataset. The LM stays as loaded, the
    checkpoint holds no LM weights, and magma.py captions an image with it."""
    from test_magma import write_hf_gpt2, write_openai_vit
    from tokenizer import Tokenizer
    lm_dir = write_hf_gpt2(tmp_path / "gpt2", seed=0)  # vocab 257: the 256 byte symbols + <|endoftext|>
    tok = Tokenizer.from_merges([])
    with open(os.path.join(lm_dir, "vocab.json"), "w") as f:
        json.dump(tok.encoder, f)
    with open(os.path.join(lm_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    vit_path = write_openai_vit(tmp_path / "ViT-tiny.pt", seed=1)
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)] * 2):
        Image.new("RGB", (20 + i, 16), colour).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": ["red", "green", "blue", "yellow"][i % 4]})
    with open(tmp_path / "data.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    train.main(["--preset=gpt2-clip", f"--lm={lm_dir}", f"--vit={vit_path}", f"--data={tmp_path / 'data.jsonl'}",
                f"--out_dir={out}", "--steps=3", "--batch_size=4", "--warmup_steps=1", "--num_workers=0",
                "--eval_images=2", "--log_every=1", "--progress=false", "--precision=fp32", "--device=cpu"])
    records = log(out)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    saved = state(out)
    assert saved["includes"] == {"lm": False, "vit": True}  # the frozen LM is not saved; the trained ViT is
    assert all(".adapter." in k for k in saved["state_dict"] if k.startswith("lm."))
    capsys.readouterr()
    caption = magma.main(["--device", "cpu", "--checkpoint", str(out / "ckpt.pt"),
                          "--image", str(tmp_path / "0.png"), "--temperature", "0", "--max-new-tokens", "5"])
    assert isinstance(caption, str)
    # The base LM moved: --resume finds it where --lm now says (and checks it is the same weights).
    os.rename(lm_dir, tmp_path / "moved")
    with pytest.raises(ValueError, match="could not load the base LM"):
        train.main([f"--out_dir={out}", "--resume", "--steps=4"])
    train.main(["--preset=gpt2-clip", f"--out_dir={out}", "--resume", "--steps=4", f"--lm={tmp_path / 'moved'}"])
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4] and state(out)["train"]["step"] == 4
    assert json.loads(state(out)["config"])["lm"] == str(tmp_path / "moved")  # the next resume needs no --lm


def test_flops_per_sample_counts_the_matmuls_that_run():
    """The MFU's numerator (GPU runs only, so checked here by hand): frozen LM blocks 4N at every
    position, adapters 6N, the vocabulary projection 4N at the text positions, prefix and ViT 6N
    per image token (a frozen ViT 2N)."""
    from adapters import AdapterConfig
    from gpt import GPTConfig
    from vit import ViTConfig
    lm = GPTConfig(model_type="gpt2", vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32)
    vit = ViTConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16)
    d, w, T, I = 32, 32, 7, 5  # LM and ViT widths, text tokens, image tokens (4 patches + class token)
    blocks = 2 * (d * 3 * d + d * d + 2 * d * 4 * d)          # c_attn, c_proj, c_fc, c_proj
    adapters = 2 * (d * (d // 4) + d // 4 + (d // 4) * d + d)  # down and up, with biases, after each MLP
    vit_weights = w * 3 * w + w * w + 2 * w * vit.hidden + 3 * 8 * 8 * w  # qkv, proj, MLP, patch conv
    for freeze_vit in (False, True):
        model = magma.Magma(magma.MagmaConfig(lm=lm, vit=vit, freeze_vit=freeze_vit,
                                              adapters=AdapterConfig(places=("mlp",), downsample=4)))
        expected = (4 * blocks * (I + T) + 6 * adapters * (I + T) + 4 * 257 * d * T + 6 * w * d * I
                    + (2 if freeze_vit else 6) * vit_weights * I)
        assert train.flops_per_sample(model, T) == expected


def test_resume_with_more_steps_follows_the_longer_schedule(tmp_path):
    """4 steps, then --resume --steps=8: steps 5-8 use the 8-step schedule's rates, as a straight 8-step
    run does (not the 4-step run's final rate, then a jump)."""
    common = dict(warmup_steps=2, train_size=64)
    train.main(args(tmp_path / "straight", **common, steps=8))
    train.main(args(tmp_path / "longer", **common, steps=4))
    train.main([f"--out_dir={tmp_path / 'longer'}", "--resume", "--steps=8"])
    straight, longer = log(tmp_path / "straight"), log(tmp_path / "longer")
    assert [r["step"] for r in longer] == list(range(1, 9))
    assert [r["lr"] for r in longer[4:]] == pytest.approx([r["lr"] for r in straight[4:]])
    assert [r["lr"] for r in longer[:4]] != pytest.approx([r["lr"] for r in straight[:4]])  # it did decay over 4


def test_held_out_split_does_not_depend_on_how_the_path_is_written(tmp_path, monkeypatch):
    rows = [{"image": f"img/{i}.png", "caption": f"c{i}"} for i in range(600)]  # images are read lazily
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)
    splits = []
    for spec in (str(tmp_path / "d.jsonl"), "d.jsonl"):
        cfg, _ = train.parse_config([f"--data={spec}", f"--out_dir={tmp_path / 'run'}"])
        tr, va = train.make_datasets(cfg)
        assert va is not tr and len(tr) + len(va) == 600 and 0 < len(va) < 30
        splits.append(sorted(os.path.basename(p) for p, _ in va.records))
    assert splits[0] == splits[1]


@pytest.mark.skipif(not torch.cuda.is_available() or attention.TRITON_IMPORT_ERROR is not None,
                    reason="needs a CUDA GPU and triton")
def test_gpu_bf16_run_tracks_the_cpu_fp32_run_and_uses_the_kernel(tmp_path, monkeypatch, no_tf32):
    """The script's GPU path (bf16 autocast, the frozen LM held in bf16, the Triton kernel at head dim
    16) gives the CPU fp32 run's losses, step by step, to bf16's precision (on CPU, bf16 against fp32
    differ by 3e-4 relative here), and a checkpoint that captions on the GPU."""
    calls, kernel = [], attention.flash_attention
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    common = dict(steps=8, lm_steps=10, lm_batch_size=8)
    train.main(args(tmp_path / "gpu", **dict(common, device="cuda", precision="auto")))
    assert calls  # the kernel ran (its backward, of the same custom op, is not counted here)
    train.main(args(tmp_path / "cpu", **dict(common, device="cpu", precision="fp32")))
    for stage in ("stage 1: language model", "stage 2: magma"):
        gpu, cpu = [r["loss"] for r in log(tmp_path / "gpu", stage)], [r["loss"] for r in log(tmp_path / "cpu", stage)]
        assert len(gpu) == len(cpu) > 0 and all(math.isfinite(x) for x in gpu), stage
        assert max(abs(g - c) / c for g, c in zip(gpu, cpu)) < 0.02, (stage, gpu, cpu)
    frozen_weight = state(tmp_path / "gpu")["state_dict"]["lm.transformer.h.0.attn.module.c_attn.weight"]
    assert frozen_weight.dtype == torch.bfloat16
    model = magma.Magma.load(str(tmp_path / "gpu" / "ckpt.pt")).cuda()
    ids = model.generate_ids([[torch.zeros(3, 32, 32, device="cuda")]], max_new_tokens=3, temperature=0)
    assert len(ids) == 1 and len(ids[0]) <= 3
