"""The torch side of the transformers engine: dtype choice and the shared KV cache of the running batch.

Imported by `Engine.load()`, never by `import llm.engine`: a process that only wants the config
or the event types does not pay for torch.

The batch keeps ONE `DynamicCache` for all running sequences, left-padded to a common width:

    column:     0   1   2   3   4   5   6
    row 0:      .   .   p   p   p   g   g      (. = padding, masked out; p = prompt; g = generated)
    row 1:      p   p   p   p   p   p   g

A decode step feeds each row its last token at its own position (positions count real tokens,
so rotary embeddings see exactly what a lone sequence sees) and appends one column. A newcomer is
prefilled alone (in chunks) into its own cache, then spliced in: both sides are left-padded to the
wider width and concatenated on the batch axis. A finished row is dropped with an index select,
and padding columns that no row needs any more are trimmed from the left. The cache is a plain
(non-sliding) DynamicCache: sliding-window models (Gemma 3) apply their window through the
attention mask, so the splice never has to reason about windows.
"""

import torch
from transformers import DynamicCache


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name, device):
    """(torch dtype, reason): the configured one, or for "auto" the fastest correct one here."""
    if name != "auto":
        return getattr(torch, name), f"configured dtype={name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this CUDA device supports bfloat16"
        return torch.float32, "auto: this CUDA device has no bfloat16"
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if check is not None and check():
        return torch.bfloat16, "auto: the CPU has AVX-512 bf16 (bf16 weights halve the bytes read per token)"
    return torch.float32, "auto: the CPU has no AVX-512 bf16, where bf16 is emulated and slower than fp32"


def new_cache():
    # No config on purpose: every layer a full DynamicLayer (see the module docstring).
    return DynamicCache()


def _pad_left(tensor, width):
    """Left-pad the sequence axis (-2) of [batch, heads, seq, dim] to width."""
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


class Batch:
    """Rows (any objects, e.g. requests) and their shared left-padded KV cache and mask."""

    def __init__(self, device):
        self.device = device
        self.rows = []
        self.cache = None
        self.mask = None  # [rows, width] long: 1 where the column holds one of the row's tokens

    def __len__(self):
        return len(self.rows)

    @property
    def width(self):
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, row, cache, length):
        """Splice in a row whose prompt (`length` tokens) is prefilled in its own batch-1 cache."""
        row_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, row_mask
            return
        width = max(self.width, length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0)
        masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (self.mask, row_mask)]
        self.mask = torch.cat(masks, dim=0)
        self.rows.append(row)

    def remove(self, rows):
        """Drop rows (finished or cancelled), then the padding columns nobody needs any more."""
        drop = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in drop]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(dim=0).nonzero()[0])  # first column some row still uses
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def step_inputs(self, last_tokens, positions):
        """Inputs of one decode step: each row's last token at its own position."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        return {
            "input_ids": torch.tensor(last_tokens, device=self.device).view(-1, 1),
            "position_ids": torch.tensor(positions, device=self.device).view(-1, 1),
            "attention_mask": self.mask,
            "use_cache": True,
        }

    def undo_step(self):
        """Forget the column a failed step added to the mask."""
        self.mask = self.mask[:, :-1]


def prefill_inputs(ids, start, device):
    """Inputs that prefill `ids` of one sequence whose first `start` tokens are already cached."""
    end = start + len(ids)
    return {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": torch.arange(start, end, device=device).view(1, -1),
        "attention_mask": torch.ones((1, end), dtype=torch.long, device=device),
        "use_cache": True,
    }
