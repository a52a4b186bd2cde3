"""The GPT decoder (GPT-2, GPT-J and GPT-NeoX families) and its loaders for public checkpoints."""
import json
import os

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# Reading checkpoint files. These helpers also serve vit.py (it imports them from here).

SAFETENSORS_DTYPES = {  # safetensors dtype name -> (numpy dtype to read the bytes as, torch dtype)
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),  # numpy has no bfloat16: read the raw 16 bits, reinterpret
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}


def read_safetensors(path):
    """Read a .safetensors file into {name: tensor}.

    The format: 8 bytes little-endian header length n, n bytes of JSON mapping each tensor name to
    {dtype, shape, data_offsets: [begin, end]} (offsets into the data that follows), then raw
    little-endian tensor bytes. An optional "__metadata__" entry holds strings.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise ValueError(f"{path}: corrupt safetensors header (header length {n}, file size {len(raw)})")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}; "
                             f"supported: {sorted(SAFETENSORS_DTYPES)}")
        np_dtype, torch_dtype = SAFETENSORS_DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= len(data)) or end - begin != count * np.dtype(np_dtype).itemsize:
            raise ValueError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit "
                             f"shape {shape} of {dtype} in {len(data)} data bytes")
        array = np.frombuffer(data[begin:end], dtype=np.dtype(np_dtype).newbyteorder("<"), count=count)
        tensor = torch.from_numpy(array.astype(np_dtype, copy=True)).reshape(shape)
        out[name] = tensor.view(torch_dtype) if dtype == "BF16" else tensor
    return out


def read_checkpoint_file(path):
    """Read a .safetensors file or a torch pickle (.bin/.pt) holding a state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: could not read as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_checked(model, state_dict, source):
    """Copy `state_dict` (already in our names) into `model`, refusing anything that does not fit.

    Every parameter and persistent buffer of the model must be present with the right shape, and
    nothing may be left over: a missing, unexpected or mis-shaped tensor raises an error naming it
    and `source` (the file it came from).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            own[name].copy_(tensor)
    return model
