"""Training data: token ids from a text file, token files or a tensor, packed into sequences.

The sequences are read in a fixed order that depends only on the seed: position p of the stream
(counting sequences over all processes) is row `perm_e[p % N]` of epoch `e = p // N`, where
`perm_e` is a permutation seeded by (seed, e). A run's data position is therefore one integer,
the number of sequences consumed, and a resumed run reads exactly the batches an uninterrupted
run would have read.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["TOKEN_SUFFIXES", "check_data_source", "load_token_ids", "pack", "packed_positions", "SequenceOrder",
           "tokenize_text", "fingerprint"]

TOKEN_SUFFIXES = (".npy", ".pt", ".bin")
TEXT_CHUNK_CHARS = 1 << 20  # text is tokenized in chunks of about this many characters, cut at newlines


def check_data_source(data) -> None:
    """Refuse a data path that does not exist or holds nothing we read (ValueError)."""
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            raise ValueError("UptrainConfig.data: the token tensor is empty")
        return
    path = Path(data)
    if not path.exists():
        raise ValueError(f"UptrainConfig.data: {path} does not exist")
    if path.is_dir() and not _token_files(path):
        raise ValueError(f"UptrainConfig.data: {path} holds no token files ({', '.join(TOKEN_SUFFIXES)})")


def is_text(data) -> bool:
    return not isinstance(data, torch.Tensor) and Path(data).is_file() and Path(data).suffix not in TOKEN_SUFFIXES


def load_token_ids(data, *, tokenizer=None, token_dtype: str = "uint16") -> torch.Tensor:
    """All token ids of `data` as a LongTensor: 2-D (sequences) for a 2-D tensor, else 1-D.

    Text files go through `tokenizer` (a transformers tokenizer, or "bytes" for UTF-8 bytes).
    Token files: `.npy` (numpy integer array), `.pt` (a torch integer tensor), `.bin` (raw
    `token_dtype` values, nanoGPT's layout); each is flattened, and a folder's files are
    concatenated in name order.
    """
    if isinstance(data, torch.Tensor):
        return data.detach().to("cpu", torch.long)
    path = Path(data)
    if path.is_dir():
        return torch.cat([_read_token_file(file, token_dtype) for file in _token_files(path)])
    if path.suffix in TOKEN_SUFFIXES:
        return _read_token_file(path, token_dtype)
    if tokenizer is None:
        raise ValueError(f"UptrainConfig.data: {path} is text and there is no tokenizer; pass tokenizer= "
                         "(a tokenizer folder, or 'bytes' for UTF-8 bytes)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"UptrainConfig.data: {path} is not UTF-8 text (byte {error.start}: {error.reason}); "
                         f"token files must end in {', '.join(TOKEN_SUFFIXES)}") from None
    return tokenize_text(text, tokenizer)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    if tokenizer == "bytes":
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + TEXT_CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    ids: list[int] = []
    for chunk_ids in tokenizer(chunks, add_special_tokens=False, return_attention_mask=False,
                               verbose=False)["input_ids"]:
        ids.extend(chunk_ids)
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(num_sequences, seq_len): 2-D ids as they are, 1-D ids cut into sequences (the tail dropped)."""
    if ids.dim() == 2:
        return ids
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"seq_len {seq_len} is too long for the data: it has {ids.numel()} tokens, "
                         "not one full sequence; lower seq_len or add data")
    return ids[: count * seq_len].view(count, seq_len)


def packed_positions(batch: torch.Tensor, separator: int) -> torch.Tensor:
    """position_ids (B, N) that restart at 0 after each `separator` token and at each row's start,
    as transformers' DataCollatorWithFlattening writes them; on the batch's device, no host sync."""
    index = torch.arange(batch.shape[1], device=batch.device).expand_as(batch)
    after_separator = torch.zeros_like(batch, dtype=torch.bool)
    after_separator[:, 1:] = batch[:, :-1] == separator
    return index - torch.where(after_separator, index, 0).cummax(-1).values


class SequenceOrder:
    """Row of the data for each position of the sequence stream (module docstring)."""

    def __init__(self, num_sequences: int, *, seed: int, shuffle: bool):
        self.num_sequences, self.seed, self.shuffle = num_sequences, seed, shuffle
        self._epoch, self._perm = -1, None

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows of stream positions start .. start + count - 1 (may cross an epoch boundary)."""
        out = torch.empty(count, dtype=torch.long)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.num_sequences)
            take = min(count - done, self.num_sequences - offset)
            out[done:done + take] = self._permutation(epoch)[offset:offset + take]
            done += take
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_sequences, generator=generator)
            else:
                self._perm = torch.arange(self.num_sequences)
            self._epoch = epoch
        return self._perm


def _token_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TOKEN_SUFFIXES)


def _read_token_file(path: Path, token_dtype: str) -> torch.Tensor:
    # numpy's and torch's own messages name no file and suggest loading pickles: say what it is.
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as error:
            first_sentence = str(error).split(". ")[0]
            raise ValueError(f"{path} is not a numpy array of token ids ({first_sentence})") from None
    elif path.suffix == ".bin":
        itemsize = np.dtype(token_dtype).itemsize
        if path.stat().st_size % itemsize:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, not a whole number of {token_dtype} "
                             f"values ({itemsize} bytes each); wrong token_dtype?")
        array = np.fromfile(path, dtype=np.dtype(token_dtype))
    else:
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise ValueError(f"{path} is not a saved tensor of token ids ({type(error).__name__}); "
                             "write it with torch.save(tensor, path)") from None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor of token ids, got {type(tensor).__name__}")
        array = tensor.numpy()
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: token ids must be integers, got {array.dtype}")
    return torch.from_numpy(np.asarray(array, dtype=np.int64).reshape(-1).copy())


def fingerprint(sequences: torch.Tensor, rows: int = 1024) -> str:
    """A digest of about `rows` evenly spaced sequences: cheap at any size, and a resumed run that
    was handed other data of the same size (another file, another tokenizer) does not match."""
    sample = sequences[:: max(1, len(sequences) // rows)].contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def describe(data) -> str:
    if isinstance(data, torch.Tensor):
        return f"tensor {tuple(data.shape)}"
    return os.fspath(data)
