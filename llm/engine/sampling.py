"""Choosing the next token from a row of logits: greedy, or nucleus sampling with a seeded generator.

Shared by both backends (torch tensors; the llama.cpp engine wraps its logits buffer with
`torch.from_numpy`, no copy), so that a seed and a temperature mean the same thing on either.
"""

import torch

# Below this a temperature is greedy decoding (and would overflow the softmax).
MIN_TEMPERATURE = 1e-3


def greedy(logits):
    """Argmax of every row of [rows, vocab] logits, as a list of ids (one device sync)."""
    return torch.argmax(logits, dim=-1).tolist()


def sample(logits, temperature, top_p, generator):
    """Next token id from one row of logits by nucleus sampling (on the CPU, where the generator is)."""
    if temperature < MIN_TEMPERATURE:
        # Dividing by a vanishing temperature overflows to inf/NaN; the limit is the argmax anyway.
        return int(torch.argmax(logits))
    probs = torch.softmax((logits.float().cpu() - logits.max().float().cpu()) / temperature, dim=-1)
    if top_p < 1:
        # A full sort of a 262k vocabulary costs more than a decode step; the nucleus almost
        # always lies in the top few dozen, so look there first and sort everything only if not.
        k = min(64, probs.numel())
        while True:
            top, index = torch.topk(probs, k)
            cumulative = torch.cumsum(top, dim=-1)
            if cumulative[-1] >= top_p or k == probs.numel():
                break
            k = min(k * 8, probs.numel())
        keep = int(torch.searchsorted(cumulative, torch.tensor(top_p, dtype=cumulative.dtype))) + 1
        top, index = top[:keep], index[:keep]
        choice = torch.multinomial(top / top.sum(), 1, generator=generator)
        return int(index[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def choice_probabilities(logits, ids):
    """The probabilities of token `ids` among themselves: the softmax of their logits (one row)."""
    return torch.softmax(logits[list(ids)].float(), dim=-1).tolist()


def seeded_generator(seed):
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else torch.seed() % (2**63))
    return generator
