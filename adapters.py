"""Adapters: small trainable modules inserted into a frozen transformer (MAGMA, arXiv 2112.05253, section 3).

A bottleneck adapter maps d -> d/downsample -> d and is added to a module's output, so the frozen
model learns a new task by training only a few percent of its size. MAGMA's released model puts a
sequential adapter after every MLP (downsample 4); its second configuration puts one after every
MLP and every attention layer (downsample 8 for both). The variants, in one table:

    kind              where the adapter reads     output
    sequential        the module's output y       y + A(y)          (Houlsby et al. 2019)
    parallel          the module's input x        f(x) + A(x)       (He et al. 2021)
    scaled_parallel   the module's input x        f(x) + s * A(x)   (He et al.: s fixed; MAGMA's code:
                                                                     s a learnable scalar from 1)
    lora              a Linear layer's input x    W0 x + (alpha/r) B A x   (Hu et al. 2021)

On GPT-2's fused c_attn, one LoRA updates q, k and v together (Hu et al. adapt W_q and W_v alone).

Nothing here knows about gpt.py: add_adapters() wraps `model.transformer.h[i].mlp` / `.attn` (or the
chosen nn.Linear layers for LoRA) from outside. With init="zero" (the default here: zero
up-projection; LoRA's B is always zero) the wrapped module behaves exactly as before until training
moves the adapter's weights; MAGMA's own init ("normal") starts about 1e-3 away from it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,  # MAGMA's choice
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}
KINDS = ("sequential", "parallel", "scaled_parallel", "lora")
PLACES = ("mlp", "attn")
INITS = ("zero", "normal")


@dataclass
class AdapterConfig:
    """Which adapters to insert, where, and how big. The defaults are MAGMA's released configuration,
    except the init: "zero" leaves the model unchanged at step 0, where MAGMA's "normal" does not quite."""
    kind: str = "sequential"         # one of KINDS
    places: tuple = ("mlp",)         # bottleneck adapters: which sub-modules of each block to wrap
    downsample: int = 4              # bottleneck width = d // downsample (MAGMA: 4 for mlp only, 8 for both)
    activation: str = "relu"         # one of ACTIVATIONS
    layernorm: bool = False          # a LayerNorm on the adapter's input (MAGMA's add_layernorm option)
    init: str = "zero"               # "zero": up-projection zero, model unchanged at step 0; "normal": MAGMA's
    init_std: float = 1e-3           # std of the "normal" init (MAGMA: 1e-3, clamped to +-2 std)
    lora_targets: tuple = ("attn",)  # LoRA: block-relative names of Linear layers or of modules holding them
    lora_r: int = 8
    lora_alpha: float = 16.0
    layers: tuple | None = None      # indices of the blocks to adapt; None = every block

    def __post_init__(self):
        # One name is a one-element tuple: tuple("mlp") would be ("m", "l", "p").
        self.places, self.lora_targets = (tuple([x]) if isinstance(x, str) else tuple(x)
                                          for x in (self.places, self.lora_targets))
        self.layers = None if self.layers is None else tuple(self.layers)
        if self.kind not in KINDS:
            raise ValueError(f"AdapterConfig.kind: unknown adapter kind {self.kind!r}; choose one of {KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation: unknown {self.activation!r}; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"AdapterConfig.init: unknown {self.init!r}; choose one of {INITS}")
        bad = [p for p in self.places if p not in PLACES]
        if bad or not self.places:
            raise ValueError(f"AdapterConfig.places: {self.places!r} must be a non-empty subset of {PLACES}")
        if not (isinstance(self.downsample, int) and isinstance(self.lora_r, int)) \
                or self.downsample < 1 or self.lora_r < 1:
            raise ValueError(f"AdapterConfig: downsample ({self.downsample!r}) and lora_r ({self.lora_r!r}) "
                             "must be integers >= 1")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"AdapterConfig.layers: {self.layers} names a block twice")


# ----------------------------------------------------------------------------------------------------
# The adapter modules


def _in_own_dtype(x, weight, first_op_is_matmul=True):
    """x in the adapter's dtype: a bf16/fp16 frozen model may hold fp32 adapters. Under autocast a
    matmul casts its input to the autocast dtype itself, so when one comes first the cast would only
    add a copy of x: x passes unchanged, with the same result. (A LayerNorm first does get the cast:
    CPU autocast would run it in bf16.)"""
    if first_op_is_matmul and torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


class Adapter(nn.Module):
    """Bottleneck adapter: [LayerNorm] -> Linear(d, d/downsample) -> activation -> Linear(-> d) [* s]."""

    def __init__(self, dim, downsample=4, activation="relu", layernorm=False, init="zero", init_std=1e-3,
                 scaled=False):
        super().__init__()
        hidden = dim // downsample
        if hidden < 1:
            raise ValueError(f"adapter downsample {downsample} leaves no bottleneck: width {dim} // {downsample} = 0")
        self.ln = nn.LayerNorm(dim) if layernorm else None
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.activation = activation
        # scaled parallel: a learnable scalar gate on the adapter's output, starting at 1 as in MAGMA
        self.scale = nn.Parameter(torch.ones(1)) if scaled else None
        if init == "zero":
            # The down-projection keeps PyTorch's default init so gradients reach `up` from step 0;
            # a zero up-projection makes the adapter output exactly 0, so the wrapped model is unchanged.
            # (`down` gets a zero gradient at step 0, through the zero `up`, and learns once `up` moves.)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            # MAGMA: every weight and bias ~ N(0, std), then clamped to +-2 std. (Clamping, not a
            # truncated normal: the ~5% of draws beyond 2 std land exactly on +-2 std.)
            with torch.no_grad():
                for t in (self.down.weight, self.down.bias, self.up.weight, self.up.bias):
                    t.normal_(0.0, init_std).clamp_(-2 * init_std, 2 * init_std)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        h = _in_own_dtype(x, self.down.weight, first_op_is_matmul=self.ln is None)
        h = self.ln(h) if self.ln is not None else h
        h = self.up(ACTIVATIONS[self.activation](self.down(h)))  # (B, T, d/downsample) -> (B, T, d)
        h = h * self.scale if self.scale is not None else h
        return h.to(x.dtype)


class LoRA(nn.Module):
    """The low-rank update (alpha/r) B A x of a Linear(d_in, d_out); B starts at zero (Hu et al. 2021)."""

    def __init__(self, in_features, out_features, r=8, alpha=16.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / r

    def forward(self, x):  # (..., d_in) -> (..., d_out)
        h = _in_own_dtype(x, self.A)
        return ((h @ self.A.t()) @ self.B.t() * self.scaling).to(x.dtype)  # (..., r) -> (..., d_out)


class Adapted(nn.Module):
    """A frozen module with an adapter beside it (parallel: reads x) or after it (sequential: reads y).

    `module(x, *args, **kwargs)` keeps its signature, so the block that calls it is untouched. If the
    module returns a tuple (as some attention implementations do), the adapter applies to its first item.
    """

    def __init__(self, module, adapter, parallel):
        super().__init__()
        self.module = module
        self.adapter = adapter
        self.parallel = parallel

    def forward(self, x, *args, **kwargs):
        out = self.module(x, *args, **kwargs)
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        # In y's dtype: under CUDA autocast a LayerNorm before the module outputs fp32, and the adapter
        # returns its input's dtype; added as is, it would promote q, k, v (LoRA on c_attn) to fp32.
        y = y + self.adapter(x if self.parallel else y).to(y.dtype)
        return y if rest is None else (y,) + tuple(rest)


# ----------------------------------------------------------------------------------------------------
# Inserting adapters into a model


def _lora_linears(block, targets):
    """The (name, parent, attribute, Linear) of every nn.Linear in `block` matched by a target name."""
    found = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.startswith(t + ".") for t in targets):
            parent_name, _, attr = name.rpartition(".")
            found.append((name, block.get_submodule(parent_name) if parent_name else block, attr, module))
    return found


def add_adapters(model, config):
    """Wrap the decoder blocks' modules of `model` (model.transformer.h) with adapters; returns the adapters.

    Bottleneck kinds wrap `block.mlp` and/or `block.attn` (config.places); LoRA wraps every nn.Linear
    inside each block whose block-relative name is, or lies under, one of config.lora_targets. The new
    modules are trainable, on the model's device, in float32 whatever the model's dtype (trained weights
    want full precision; they cast activations on the way in and out); freeze the model first.
    """
    blocks = model.transformer.h
    layers = range(len(blocks)) if config.layers is None else config.layers
    device = next(model.parameters()).device
    added = []
    for i in layers:
        if not 0 <= i < len(blocks):
            raise ValueError(f"AdapterConfig.layers: block index {i} out of range (the model has {len(blocks)})")
        block = blocks[i]
        if any(isinstance(m, Adapted) for m in block.modules()):
            raise ValueError(f"block {i} already has adapters; add_adapters was called twice")
        if config.kind == "lora":
            linears = _lora_linears(block, config.lora_targets)
            if not linears:
                raise ValueError(f"AdapterConfig.lora_targets: {config.lora_targets!r} matches no nn.Linear "
                                 f"in block {i}; its Linear layers are "
                                 f"{[n for n, m in block.named_modules() if isinstance(m, nn.Linear)]}")
            for _, parent, attr, linear in linears:
                lora = LoRA(linear.in_features, linear.out_features, config.lora_r, config.lora_alpha)
                lora.to(device)
                setattr(parent, attr, Adapted(linear, lora, parallel=True))
                added.append(lora)
            continue
        for place in config.places:
            module = getattr(block, place, None)
            if module is None:
                raise ValueError(f"block {i} has no {place!r} sub-module to put an adapter on")
            adapter = Adapter(model.config.n_embd, config.downsample, config.activation, config.layernorm,
                              config.init, config.init_std, scaled=config.kind == "scaled_parallel")
            adapter.to(device)
            setattr(block, place, Adapted(module, adapter, parallel=config.kind != "sequential"))
            added.append(adapter)
    return added


def freeze(module):
    """Stop gradients to every parameter of `module` (requires_grad=False); returns the module."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def cast_frozen(module, dtype):
    """Hold the frozen parameters of `module` in `dtype` (e.g. a frozen LM in bf16, so autocast does not
    cast its weights again at every matmul); trainable ones, the adapters, keep theirs. Returns module."""
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return module


def trainable_parameters(module):
    """The parameters of `module` that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]


def adapter_parameters(module):
    """The parameters of the adapters inside `module` (those add_adapters created)."""
    return [p for m in module.modules() if isinstance(m, Adapted) for p in m.adapter.parameters()]


def _millions(n):
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 100 else str(n)


def adapter_report(model, lm=None):
    """One line: adapter size relative to the base LM, and what `model` trains in all.

    e.g. "adapters: 7.1M trainable = 5.7% of the LM (124.4M frozen); trainable in all: 95.0M"
    """
    lm = model if lm is None else lm
    n_adapter = sum(p.numel() for p in adapter_parameters(lm))
    n_lm = sum(p.numel() for p in lm.parameters()) - n_adapter
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_frozen = sum(p.numel() for p in lm.parameters() if not p.requires_grad)
    pct = 100.0 * n_adapter / max(n_lm, 1)
    return (f"adapters: {_millions(n_adapter)} trainable = {pct:.1f}% of the LM ({_millions(n_frozen)} frozen); "
            f"trainable in all: {_millions(n_train)}")
