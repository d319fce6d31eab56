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

Drafts (llm.engine.drafting). A step where some rows verify a draft feeds every row the same
number of columns, 1 + the longest draft; a row with a shorter draft, or none, fills its extra
columns with padding (masked out). Afterwards row i keeps its first kept[i] inputs: the columns
no row keeps are cropped from the end, and the others a row does not keep are masked out, which
leaves holes inside that row (h):

    column:     0   1   2   3   4   5   6   7
    row 0:      .   .   p   p   g   g   g   g      (kept all 3 of its inputs)
    row 1:      p   p   p   p   g   g   h   h      (kept 1: its last token, draft rejected)

Full attention layers do not mind holes: a hole is masked, and positions are given per row.
Sliding-window layers do. transformers draws the window over column indices (a key is seen when
its column > the query's column - window), which counts a row's real tokens correctly only while
they are contiguous: left padding is harmless (it lies before the row's first token), but each
hole inside the window would push one real token out of it, and an answer crossing the window
would differ from decoding without drafts. So on a model with sliding layers, once the batch has
holes (and in every step that feeds several columns) the engine passes its own masks, one per
layer type, computed from the rows' real positions (`position_masks`: a row's real tokens are
positions 0, 1, 2, ... in column order, so the mask's cumulative sum gives them): the window is
the same as a lone sequence's, holes or not, and no column is ever moved. (The other choices were
compacting each row's holes away, which copies the row's whole cache per step, or not drafting
near the window, which still breaks once holes made earlier fall inside it.) A step with no
draft and no holes is today's one-column step with a 2D mask. A batch of one row never has holes:
whatever it does not keep is at the end and is cropped.
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
        self.holes = False  # whether a row has masked columns among its tokens (see the module docstring)

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
            self.holes = False
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(dim=0).nonzero()[0])  # first column some row still uses
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        if self.holes:
            self.holes = self._find_holes()

    def step_inputs(self, fed, positions):
        """Inputs of one decode step: row i feeds the ids `fed[i]` (its last token, then its draft
        if any) from position `positions[i]` on. Every row gets as many columns as the longest
        one; a shorter row's extra columns repeat its last input at its last position, masked out."""
        columns = max(len(ids) for ids in fed)
        ids = [row + row[-1:] * (columns - len(row)) for row in fed]
        at = [[start + min(j, len(row) - 1) for j in range(columns)] for row, start in zip(fed, positions)]
        if columns == 1:
            new = self.mask.new_ones((len(self.rows), 1))
        else:
            lengths = torch.tensor([len(row) for row in fed], device=self.device)
            new = (torch.arange(columns, device=self.device) < lengths[:, None]).long()
        self.mask = torch.cat([self.mask, new], dim=1)
        return {
            "input_ids": torch.tensor(ids, device=self.device),
            "position_ids": torch.tensor(at, device=self.device),
            "attention_mask": self.mask,
            "use_cache": True,
        }

    def position_masks(self, windows, columns):
        """Boolean 4D masks [rows, 1, columns, width] for a step's last `columns` columns, built
        from each row's real positions rather than from column indices: {layer type: mask} for
        `windows` ({layer type: its sliding window, or None}). A query sees its row's real tokens
        at its position or before, and on a sliding layer only those after its position minus
        the window: what a lone sequence sees, holes or not. A padding query column stands at
        its row's last real input, so it always sees something (a fully masked row could be NaN)."""
        valid = self.mask.bool()
        positions = self.mask.cumsum(dim=1) - 1  # a row's real tokens are positions 0, 1, 2, ... in column order
        keys = positions[:, None, :]
        queries = positions[:, -columns:, None]
        seen = valid[:, None, :] & (keys <= queries)
        return {
            name: (seen if window is None else seen & (keys > queries - window)).unsqueeze(1)
            for name, window in windows.items()
        }

    def keep(self, kept, columns):
        """After a step that fed `columns` columns: row i keeps its first `kept[i]` inputs (0 for a
        row that ended in the step). Its other columns become holes, masked out; the trailing
        columns that no row keeps are cropped from the mask and from every layer's keys and values."""
        if all(k == columns for k in kept):
            return
        crop = columns - max(kept)
        start = self.width - columns
        if crop:
            self.mask = self.mask[:, :-crop]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, :-crop]
                layer.values = layer.values[:, :, :-crop]
        block = torch.arange(columns - crop, device=self.device)
        taken = block < torch.tensor(kept, device=self.device)[:, None]
        self.mask[:, start:] = self.mask[:, start:] * taken
        self.holes = self.holes or min(kept) < columns - crop

    def _find_holes(self):
        """Whether some row has a masked column between its first real one and the end."""
        count = self.mask.sum(dim=1)
        first = self.mask.argmax(dim=1)  # the first 1 of each row
        return bool((count != self.width - first).any())


def prefill_inputs(ids, start, device):
    """Inputs that prefill `ids` of one sequence whose first `start` tokens are already cached."""
    end = start + len(ids)
    return {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": torch.arange(start, end, device=device).view(1, -1),
        "attention_mask": torch.ones((1, end), dtype=torch.long, device=device),
        "use_cache": True,
    }
