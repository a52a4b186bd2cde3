"""bench.py: every subcommand's --cpu-smoke run, and the equivalence that makes its comparisons fair.

Speed is never asserted. What is: each smoke run writes the rows it promises, with positive figures;
on a tiny config our MAGMA and the same model assembled from transformers (bench.TransformersMagma)
give the same loss and gradients (fp32) and the same greedy tokens; and train_flops counts exactly
the matmuls that run (torch's FlopCounterMode).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("transformers")

import bench
from adapters import AdapterConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ("ms_per_step", "samples_per_s", "tokens_per_s", "tflops")


def run(tmp_path, *argv):
    """bench.main(argv + --cpu-smoke --json), in this process; the JSON payload it wrote."""
    path = tmp_path / f"{argv[0]}.json"
    bench.main([*argv, "--cpu-smoke", "--json", str(path)])
    return json.loads(path.read_text())


def tiny_pair(seed=0):
    """Our MAGMA and the transformers assembly on one tiny config, fp32, eval mode, weights far from ties,
    adapters drawn at random (zero-initialised ones would be invisible; build_pair copies them across)."""
    lm, vit = bench.magma_shapes(smoke=True)
    adapters = AdapterConfig(init="normal", init_std=0.2)
    ours, theirs = bench.build_pair(lm, vit, adapters, seed=seed, init_std=0.15, prefix_dropout=0.0)
    return ours.eval(), theirs.eval(), lm, vit


def caption_batch(lm, vit, lengths, T=8, seed=0):
    """Pixels, ids and a right-padded text mask with the given caption lengths."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    pixels = torch.randn(B, 3, vit.image_size, vit.image_size, generator=g)
    ids = torch.randint(0, lm.vocab_size, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return pixels, ids, mask


# ------------------------------------------------------------------------------------------------
# The smoke runs


def test_train_smoke_writes_every_row(tmp_path):
    payload = run(tmp_path, "train")
    rows = {r["variant"]: r for r in payload["rows"]}
    assert list(rows) == list(bench.TRAIN_VARIANTS)
    assert payload["flops_per_sample"] == sum(payload["flops_parts"].values()) > 0
    assert payload["shape"]["image_tokens"] == 17 and payload["shape"]["text_tokens"] == 8
    measured = [r for r in rows.values() if r["mode"] == "eager"]
    for r in measured:
        assert all(r[k] > 0 for k in POSITIVE), r
    # identical weights and inputs: every row's first loss agrees (bf16 autocast on the CPU)
    losses = [r["loss0"] for r in measured]
    assert max(losses) - min(losses) < 2e-2, losses
    assert rows["transformers"]["x_samples_vs_tf"] == 1.0
    assert rows["transformers-bf16lm"]["x_samples_vs_tf_same_lm"] == 1.0  # each against its own LM dtype
    assert rows["ours"]["x_samples_vs_tf_same_lm"] == pytest.approx(
        rows["ours"]["samples_per_s"] / rows["transformers-bf16lm"]["samples_per_s"])
    assert rows["ours-fp32lm"]["x_samples_vs_tf_same_lm"] == rows["ours-fp32lm"]["x_samples_vs_tf"]
    assert payload["transformers_extra_flops_per_sample"] > 0
    assert rows["ours-compile"]["note"].startswith("n/a") and rows["ours-graph"]["note"].startswith("n/a")


def test_generate_smoke_writes_every_row(tmp_path):
    payload = run(tmp_path, "generate")
    rows = payload["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (b, v) for b in (1, 2) for v in bench.GENERATE_VARIANTS]
    for r in rows:
        assert r["new_tokens"] == 8 and r["ms"] > 0 and r["tokens_per_s"] > 0 and r["x_vs_tf"] > 0
        assert r["agree"] == 1.0, r  # fp32 in the smoke run: the same tokens as transformers


def test_big_smoke_doubles_the_batch(tmp_path):
    payload = run(tmp_path, "big")
    assert [r["batch"] for r in payload["rows"]] == [1, 2, 4]
    assert payload["largest_batch"] == 4 and payload["capped"]  # stopped by --max-batch, not by a failure
    assert payload["shape"]["lm"]["model_type"] == "gptj"
    for r in payload["rows"]:
        assert all(r[k] > 0 for k in POSITIVE), r


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the CPU shapes")
def test_attention_profile_script_runs_each_shape_and_names_bad_ones(capsys):
    """tests/attention_profile.py (what gpu_check.sh hands to Nsight Compute) on the CPU: SDPA on every
    smoke shape; the Triton rows need the interpreter and say so; unknown names end in one message."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import attention_profile
    attention_profile.main(["--impls", "sdpa-flash,triton"])
    err = capsys.readouterr().err
    for shape in ("gpt2-tiny", "vit-tiny"):
        assert f"{shape} (B,H,Tq,Tk,D" in err and "sdpa-flash: profiled" in err
        interpreted = attention_profile.A.INTERPRET  # then the Triton rows run too
        assert f"{shape} triton: skipped (CPU tensors need TRITON_INTERPRET=1)" in err or interpreted
    for argv, named in ((["--shapes", "decode-tiny"], "decode-tiny"), (["--impls", "sdpa"], "sdpa")):
        with pytest.raises(SystemExit) as e:
            attention_profile.main(argv)
        assert named in str(e.value) and "choose from" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
@pytest.mark.parametrize("command", ["train", "generate", "big"])
def test_without_gpu_one_clear_line(command):
    with pytest.raises(SystemExit) as e:
        bench.main([command])
    message = str(e.value)
    assert "no CUDA GPU" in message and "--cpu-smoke" in message and "\n" not in message


def test_unknown_variant_is_named():
    with pytest.raises(SystemExit, match="nope"):
        bench.main(["train", "--cpu-smoke", "--variants", "ours,nope"])


def test_unknown_shape_is_named():
    names = ",".join(s[0] for s in (bench.ATTENTION_SHAPES if torch.cuda.is_available() else bench.SMOKE_SHAPES))
    with pytest.raises(SystemExit, match=rf"unknown --shapes \['bogus'\]; choose from {names}$"):
        bench.main(["attention", "--cpu-smoke", "--shapes", "bogus"])


def test_attention_runs_only_the_implementations_named(tmp_path):
    payload = run(tmp_path, "attention", "--shapes", "vit-tiny,decode-tiny", "--impls", "reference,triton-4split")
    assert [(r["shape"], r["impl"]) for r in payload["rows"]] == [("vit-tiny", "reference"),
                                                                  ("decode-tiny", "triton-4split"),
                                                                  ("decode-tiny", "reference")]
    assert payload["rows"][0]["fwdbwd_ms"] > 0
    with pytest.raises(SystemExit, match=r"unknown --impls \['sdpa'\]; choose from triton,"):
        bench.main(["attention", "--cpu-smoke", "--impls", "reference,sdpa"])


@pytest.mark.parametrize("argv", [["attention", "--iters", "0"], ["attention", "--warmup", "-1"],
                                  ["train", "--warmup", "-1"], ["big", "--warmup", "-2"]])
def test_bad_counts_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--cpu-smoke"])
    assert e.value.code == 2 and f"argument {argv[1]}: expected" in capsys.readouterr().err


def test_bad_json_paths_are_named_before_any_benchmark_runs(tmp_path, monkeypatch):
    def must_not_run(args):
        raise AssertionError("a benchmark ran before --json was checked")
    monkeypatch.setattr(bench, "bench_train", must_not_run)
    (tmp_path / "afile").write_text("")
    for argv, message in [
            (["train", "--json", str(tmp_path / "missing" / "x.json")], "the folder .*missing does not exist"),
            (["train", "--json", str(tmp_path)], "is a folder; give a file name"),
            (["all", "--json-dir", str(tmp_path / "afile")], "--json-dir .*afile is a file, not a folder")]:
        with pytest.raises(SystemExit, match=message) as e:
            bench.main([*argv, "--cpu-smoke"])
        assert str(e.value).startswith(f"bench.py {argv[0]}: ") and "\n" not in str(e.value)
    # a write that fails after the run (the folder removed meanwhile): one line, not a traceback
    with pytest.raises(SystemExit, match="bench.py train: cannot write --json .*gone.*the table above"):
        bench.write_json("train", str(tmp_path / "gone" / "x.json"), {"rows": []})


# ------------------------------------------------------------------------------------------------
# The comparison is fair: the two assemblies compute the same thing


def test_loss_and_gradients_match_transformers():
    ours, theirs, lm, vit = tiny_pair()
    pixels, ids, mask = caption_batch(lm, vit, lengths=[8, 5, 1])
    loss_ours, loss_theirs = ours(pixels, ids, mask), theirs(pixels, ids, mask)
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-4, (loss_ours.item(), loss_theirs.item())
    loss_ours.backward()
    loss_theirs.backward()
    pairs = [(ours.prefix.proj.weight, theirs.prefix.proj.weight),
             (ours.vit.conv1.weight, theirs.vit.get_parameter("embeddings.patch_embedding.weight"))]
    pairs += [(o.down.weight, t.down.weight) for o, t in zip(ours.adapters, theirs.adapters)]
    for a, b in pairs:
        assert a.grad is not None and a.grad.abs().max() > 0
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), (a.grad - b.grad).abs().max()
    # the adapters matter to this loss, so a missing adapter on either side could not go unnoticed
    with torch.no_grad():
        for t in theirs.adapters:
            t.up.weight.zero_()
            t.up.bias.zero_()
        assert abs(theirs(pixels, ids, mask).item() - loss_theirs.item()) > 1e-3


def test_greedy_generation_matches_transformers():
    ours, theirs, lm, vit = tiny_pair(seed=3)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, vit.image_size, vit.image_size, generator=g)
    prompt = torch.randint(0, lm.vocab_size, (3, 5), generator=g)
    mine = bench.ours_generate_ids(ours, pixels, prompt, 12)
    reference = theirs.generate_ids(pixels, prompt, 12)
    assert mine == reference
    assert all(len(row) == 12 for row in mine) and len({t for row in mine for t in row}) > 3  # not degenerate


def test_train_flops_counts_the_matmuls_that_run(monkeypatch):
    """FlopCounterMode over one forward+backward of our model: every mm/addmm/convolution FLOP is in
    train_flops (frozen weights: no weight gradient; logits at text positions only). The attention runs
    the reference here (bmm: full score matrix, plain backward), so it is compared separately."""
    monkeypatch.setenv("MAGMA_ATTENTION", "reference")
    ours, _, lm, vit = tiny_pair()
    B, T = 2, 8
    pixels, ids, mask = caption_batch(lm, vit, lengths=[T] * B, T=T)
    with FlopCounterMode(display=False) as counter:
        ours(pixels, ids, mask).backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.pop("aten.bmm", 0)
    I = vit.grid ** 2 + 1
    parts = bench.train_flops(lm, vit, ours.config.adapters, image_tokens=I, text_tokens=T)
    matmuls = sum(v for k, v in parts.items() if not k.endswith("attn"))
    assert sum(counts.values()) == B * matmuls, counts
    # the reference attention: QK^T and PV (4 S^2 d per layer) forward, twice that backward
    S = I + T
    assert attention == B * 12 * (S * S * lm.n_embd * lm.n_layer + I * I * vit.width * vit.layers)


def test_generate_flops_counts_the_matmuls_that_run(monkeypatch):
    """FlopCounterMode over one greedy generation of our model: every mm/addmm/convolution FLOP is in
    generate_flops (ViT and prefix once, prefill with logits at its last position, a decode step per
    new token but the last). Attention (bmm under the reference) attends to every slot of the cache,
    more than generate_flops credits, so it is left out."""
    monkeypatch.setenv("MAGMA_ATTENTION", "reference")
    ours, _, lm, vit = tiny_pair()
    B, prompt_len, new = 2, 5, 6
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(B, 3, vit.image_size, vit.image_size, generator=g)
    prompt = torch.randint(0, lm.vocab_size, (B, prompt_len), generator=g)
    with FlopCounterMode(display=False) as counter:
        bench.ours_generate_ids(ours, pixels, prompt, new)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    counts.pop("aten.bmm", 0)
    parts = bench.generate_flops(lm, vit, ours.config.adapters, vit.grid ** 2 + 1, prompt_len, new)
    assert sum(counts.values()) == B * sum(v for k, v in parts.items() if not k.endswith("attn")), counts


def test_all_runs_each_benchmark_and_keeps_going_after_a_failure(tmp_path):
    (tmp_path / "train.json").mkdir()  # train's JSON cannot be written: that benchmark fails
    result = subprocess.run([sys.executable, "bench.py", "all", "--cpu-smoke", "--json-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "bench.py all: train failed" in result.stderr, result.stderr[-2000:]
    for name in ("attention", "generate", "big"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["benchmark"] == name
    assert not (tmp_path / "train-compile.json").exists()  # --quick's separate compiled row only


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("graph capture failed (simulated)")
    monkeypatch.setattr(bench, "ours_generate_ids", broken)
    rows = run(tmp_path, "generate", "--variants", "transformers,ours")["rows"]
    assert [(r["variant"], "tokens_per_s" in r) for r in rows] == [("transformers", True), ("ours", False)] * 2
    assert rows[1]["note"] == "failed: ValueError: graph capture failed (simulated)"
    real = bench.timed_training
    monkeypatch.setattr(bench, "timed_training", lambda model, inputs, *a: (
        broken() if inputs[0].shape[0] == 2 else real(model, inputs, *a)))
    payload = run(tmp_path, "big")  # batch 2 fails whatever the attention: tried again on SDPA, then no larger
    assert [(r["batch"], r["attention"]) for r in payload["rows"]] == [(1, "auto"), (2, "auto"), (2, "sdpa")]
    assert payload["largest_batch"] == 1 and not payload["capped"]
    assert payload["rows"][1]["note"].startswith("failed: ValueError")
    monkeypatch.setattr(bench, "timed_training", lambda model, inputs, *a: (  # only the default attention fails
        broken() if inputs[0].shape[0] == 2 and os.environ["MAGMA_ATTENTION"] != "sdpa" else real(model, inputs, *a)))
    payload = run(tmp_path, "big")
    assert [(r["batch"], r["attention"]) for r in payload["rows"]] == [(1, "auto"), (2, "auto"), (2, "sdpa"),
                                                                     (4, "sdpa")]
    assert payload["largest_batch"] == 4 and payload["capped"]


def test_an_interrupted_benchmark_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    real, calls = bench.ours_generate_ids, []

    def interrupted_on_the_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or bench.py all's time limit
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, "ours_generate_ids", interrupted_on_the_third_call)
    path = tmp_path / "generate.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["generate", "--cpu-smoke", "--variants", "transformers,ours", "--json", str(path)])
    assert e.value.code == 130
    payload = json.loads(path.read_text())
    assert payload["interrupted"] and payload["benchmark"] == "generate"
    rows = payload["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(1, "transformers"), (1, "ours"), (2, "transformers"),
                                                         (2, "ours")]
    assert all("tokens_per_s" in r for r in rows[:3]) and "tokens_per_s" not in rows[3]
    # the header known before the first row, and the ratios of the rows measured, are kept too
    assert payload["shape"]["new_tokens"] == 8 and payload["columns"][:2] == ["batch", "variant"]
    assert rows[1]["x_vs_tf"] > 0 and "x_vs_tf" not in rows[3]


def test_environment_names_the_device_the_rows_ran_on(monkeypatch):
    """A --cpu-smoke run on a machine with a GPU ran on the CPU, and its JSON must say so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert bench.environment()["device"] == "NVIDIA H200"
    smoke = bench.environment(cpu_smoke=True)
    assert smoke["device"].startswith("CPU") and smoke["cuda"] is None


def test_a_compiled_model_trains_one_step():
    """The compiled rows pass torch.compile(model) to training_step (the "eager" backend here: dynamo's
    tracing without inductor's C compiler); a compiled Magma once failed there on len()."""
    ours, _, lm, vit = tiny_pair()
    ours.train()
    pixels, ids, mask = caption_batch(lm, vit, lengths=[8, 3])
    from adapters import trainable_parameters
    params = list(trainable_parameters(ours))
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    torch._dynamo.reset()
    step = bench.training_step(ours, optimizer, pixels, ids, mask, compiled=torch.compile(ours, backend="eager"))
    loss = step()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_graphed_training_step_equals_eager():
    """The ours-graph rows replay one recorded step (forward, backward, fused AdamW): each replay is a
    real optimizer step, with the losses of the same steps run eagerly (no dropout, so no random draw)."""
    import copy
    from adapters import trainable_parameters
    ours, _, lm, vit = tiny_pair()
    inputs = [t.cuda() for t in caption_batch(lm, vit, lengths=[8, 3])]
    losses = {}
    for mode in ("eager", "graph"):
        model = copy.deepcopy(ours).cuda().train()
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, fused=True, capturable=mode == "graph")
        step = bench.training_step(model, optimizer, *inputs, autocast_cache=mode == "eager")
        if mode == "graph":
            step = bench.graphed(step, warmup=3)  # 3 eager steps, then the recording (which runs nothing)
        else:
            for _ in range(3):
                step()
        losses[mode] = [step().item() for _ in range(4)]
    assert losses["graph"] == pytest.approx(losses["eager"], rel=1e-3, abs=1e-4)
    assert losses["eager"][-1] < losses["eager"][0]  # the steps do train
