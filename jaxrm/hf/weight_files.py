"""Reading and writing Hugging Face weight files, one tensor at a time.

Reading parses the safetensors header and reads each tensor with a plain file read (no memory
map), so a tensor occupies memory only while the caller holds it: importing a model never holds
the whole file as well as the converted parameters. `.bin` files go through
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""

import json
import math
import reprlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import safetensors.numpy

from jaxrm.errors import UserError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


# The safetensors library refuses larger headers; a length past it is a damaged or foreign file.
MAX_HEADER_BYTES = 100_000_000
INDEX = "model.safetensors.index.json"


class _Tensor(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


class WeightReader:
    """Tensors of an HF model directory by name, across single or sharded files.

    Every safetensors header is checked against its file before anything is read, so a header
    that lies (shapes, dtypes or byte ranges that do not fit the file) is one clear error."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._files: dict[str, Path] = {}  # tensor name -> the file holding it
        self._tensors: dict[str, _Tensor] = {}
        self._torch_state: dict | None = None
        weight_map = _read_index(self.directory / INDEX)
        if weight_map is not None:
            paths = [self.directory / name for name in sorted(set(weight_map.values()))]
        else:
            paths = sorted(self.directory.glob("*.safetensors"))
        if paths:
            for path in paths:
                for name, tensor in _read_header(path).items():
                    self._add(name, path)
                    self._tensors[name] = tensor
        else:
            self._torch_state = _load_torch_bins(self.directory, self._add)
        for name, file in (weight_map or {}).items():
            if self._files.get(name) != self.directory / file:
                raise UserError(
                    f"{self.directory / INDEX}: places tensor '{name}' in {file}, which lacks it"
                )

    def _add(self, name: str, path: Path) -> None:
        if name in self._files:
            raise UserError(f"{path}: tensor '{name}' is also in {self._files[name].name}")
        self._files[name] = path

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def path(self, name: str) -> Path:
        """The file holding tensor `name`."""
        if name not in self._files:
            raise UserError(f"{self.directory}: no weight file holds tensor '{name}'")
        return self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        self.path(name)
        if self._torch_state is not None:
            return tuple(self._torch_state[name].shape)
        return self._tensors[name].shape

    def read(self, name: str) -> np.ndarray:
        path = self.path(name)
        if self._torch_state is not None:
            return _torch_to_numpy(self._torch_state[name])
        tensor = self._tensors[name]
        out = np.empty(tensor.shape, tensor.dtype)
        with open(path, "rb") as f:
            f.seek(tensor.offset)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise UserError(f"{path}: file ends inside tensor '{name}' (truncated download?)")
        return out


def _read_index(path: Path) -> dict[str, str] | None:
    """The weight map of a sharded model's index (tensor name -> file), None without an index."""
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UserError(f"{path}: weight_map must be an object of tensor name -> file name")
    for file in sorted(set(weight_map.values())):
        if not (path.parent / file).is_file():
            raise UserError(f"{path}: names weight file {file}, which is not in {path.parent}")
    return weight_map


def _read_header(path: Path) -> dict[str, _Tensor]:
    """The tensors of a safetensors file, checked as the safetensors library checks them: dtypes
    known, shapes of non-negative ints, byte ranges that match the shapes and tile the data
    section of the file exactly. Nothing is allocated by what a header claims."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: {size} bytes, too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise UserError(
                    f"{path}: safetensors header length {length} does not fit the file's "
                    f"{size} bytes or the {MAX_HEADER_BYTES}-byte limit"
                )
            text = f.read(length)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: safetensors header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + length, size - 8 - length
    spans = sorted(
        (_check_entry(path, name, info, data_size), name) for name, info in header.items()
    )
    end = 0
    for (begin, stop), name in spans:
        if begin != end:
            raise UserError(
                f"{path}: tensor '{name}' starts at data byte {begin}, but the tensor before it "
                f"ends at {end} (overlapping or gapped data_offsets)"
            )
        end = stop
    if end != data_size:
        raise UserError(
            f"{path}: {data_size - end} stray bytes after the last tensor's data (the "
            "safetensors library refuses such a file)"
        )
    tensors = {}
    for (begin, _), name in spans:
        info = header[name]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        tensors[name] = _Tensor(dtype, tuple(info["shape"]), data_start + begin)
    return tensors


def _check_entry(path: Path, name: str, info: object, data_size: int) -> tuple[int, int]:
    """The byte range of one header entry, after checking it describes a tensor in the file."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict):
        raise UserError(f"{where} must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UserError(
            f"{where} has dtype {reprlib.repr(dtype)}; jaxrm reads {', '.join(_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise UserError(f"{where} has shape {reprlib.repr(shape)}, not a list of sizes >= 0")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(n) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise UserError(f"{where} has data_offsets {reprlib.repr(offsets)}, not [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        raise UserError(
            f"{where} of shape {shape} and dtype {dtype} takes {nbytes} bytes, but its "
            f"data_offsets span {end - begin}"
        )
    if end > data_size:
        raise UserError(
            f"{where} ends at data byte {end}, past the file's {data_size} bytes of data "
            "(truncated download?)"
        )
    return begin, end


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_torch_bins(directory: Path, add: Callable[[str, Path], None]) -> dict:
    """The tensors of the `.bin` files, each name passed to `add` with its file."""
    files = sorted(directory.glob("pytorch_model*.bin")) or sorted(directory.glob("*.bin"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors or *.bin weight files")
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{directory}: has only .bin weights, which need PyTorch to read; install torch "
            "or convert the model to safetensors"
        ) from None
    state: dict = {}
    for path in files:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises its own pickle errors for unsafe content
            raise UserError(
                f"{path}: refused or unreadable .bin file ({str(e).splitlines()[0]})"
            ) from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
        for name, tensor in loaded.items():
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"{path}: '{name}' is a {type(tensor).__name__}, not a tensor")
            add(name, path)
        state.update(loaded)
    return state


def _torch_to_numpy(tensor: object) -> np.ndarray:
    import torch

    assert isinstance(tensor, torch.Tensor)
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class ShardedWriter:
    """Writes `model-0000K-of-0000N.safetensors` files of at most `max_shard_bytes` each."""

    def __init__(self, directory: Path, max_shard_bytes: int = 5 * 2**30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(tensor)
        self._pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self._written):05d}.tmp"
        safetensors.numpy.save_file(self._pending, self.directory / name, metadata={"format": "pt"})
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Names the shards K-of-N and writes the index."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        weight_map = {}
        for k, (temporary, names) in enumerate(self._written, 1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            (self.directory / temporary).rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
