"""Reading and writing Hugging Face weight files, one tensor at a time.

Reading parses the safetensors header and reads each tensor with a plain file read (no memory
map), so a tensor occupies memory only while the caller holds it: importing a model never holds
the whole file as well as the converted parameters. `.bin` files go through
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""

import json
import struct
from pathlib import Path

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


class WeightReader:
    """Tensors of an HF model directory by name, across single or sharded files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._where: dict[str, tuple[Path, dict, int]] = {}  # file, header entry, data start
        self._torch_state: dict | None = None
        files = sorted(self.directory.glob("*.safetensors"))
        if files:
            for path in files:
                header, data_start = _read_header(path)
                for name, info in header.items():
                    self._where[name] = (path, info, data_start)
        else:
            self._torch_state = _load_torch_bins(self.directory)

    def names(self) -> list[str]:
        return list(self._torch_state if self._torch_state is not None else self._where)

    def __contains__(self, name: str) -> bool:
        return name in (self._torch_state if self._torch_state is not None else self._where)

    def read(self, name: str) -> np.ndarray:
        if self._torch_state is not None:
            if name not in self._torch_state:
                raise UserError(f"{self.directory}: the .bin weights have no tensor '{name}'")
            return _torch_to_numpy(self._torch_state[name])
        if name not in self._where:
            raise UserError(f"{self.directory}: no safetensors file holds tensor '{name}'")
        path, info, data_start = self._where[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        out = np.empty(info["shape"], dtype)
        with open(path, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - start:
                raise UserError(f"{path}: file ends inside tensor '{name}' (truncated download?)")
        return out


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor infos, byte offset of the data section)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _load_torch_bins(directory: Path) -> dict:
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
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # torch raises its own pickle errors for unsafe content
            raise UserError(
                f"{path}: refused or unreadable .bin file ({str(e).splitlines()[0]})"
            ) from None
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
