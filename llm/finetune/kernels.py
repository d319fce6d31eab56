"""The two custom kernels of training: the LM head fused with the cross-entropy, and a cheap
dropout for the LoRA inputs on CPU. Both give the plain computation's numbers up to rounding
(their exactness tests are in llm/tests/test_finetune.py); benchmarks/train_throughput.py
measures what they save.
"""

import math

import torch


class HeadCrossEntropy(torch.autograd.Function):
    """The autograd Function behind `head_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, need_grad, row_chunk, vocab_chunk):
        n, vocab = hidden.shape[0], weight.shape[0]
        losses = hidden.new_empty(n, dtype=torch.float32)
        grad = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_grad else None
        row_chunk = math.ceil(n / math.ceil(n / row_chunk))  # even chunks: each streams all of W
        for r0 in range(0, n, row_chunk):
            h, y = hidden[r0 : r0 + row_chunk], labels[r0 : r0 + row_chunk]
            rows = h.shape[0]
            top = h.new_full((rows,), -math.inf, dtype=torch.float32)  # running max logit
            total = h.new_zeros(rows, dtype=torch.float32)  # running sum of exp(logit - top)
            target = h.new_zeros(rows, dtype=torch.float32)
            acc = h.new_zeros((rows, hidden.shape[1]), dtype=torch.float32) if need_grad else None
            for v0 in range(0, vocab, vocab_chunk):
                w = weight[v0 : v0 + vocab_chunk]
                z = torch.nn.functional.linear(h, w).float()  # rounded like the plain head's logits
                offset = y - v0
                inside = (offset >= 0) & (offset < w.shape[0])
                picked = z.gather(1, offset.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
                target = torch.where(inside, picked, target)
                new_top = torch.maximum(top, z.amax(dim=1))
                rescale = torch.exp(top - new_top)
                z.sub_(new_top[:, None]).exp_()
                total = total * rescale + z.sum(dim=1)
                if need_grad:
                    acc.mul_(rescale[:, None]).add_(torch.mm(z.to(w.dtype), w))
                top = new_top
            losses[r0 : r0 + rows] = top + torch.log(total) - target
            if need_grad:
                # d loss / d h = softmax(logits) @ W - W[y]
                grad[r0 : r0 + rows] = acc / total[:, None] - weight[y].float()
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return (grad * grad_losses[:, None]).to(ctx.hidden_dtype), None, None, None, None, None


def head_cross_entropy(hidden, head, labels, *, softcap=None, reduction="mean", row_chunk=512, vocab_chunk=4096):
    """cross_entropy(head(hidden), labels) for the rows of `hidden`, without storing the logits.

    The logits of a 262k vocabulary are 1 MB per row in fp32: materialised, then cast, normalised,
    zero-filled for the gradient and cast back, they cost as much time as the head's matmuls. Here
    the vocabulary is walked in cache-sized chunks with an online softmax, as flash attention walks
    its keys (a running max and sum per row), and the gradient w.r.t. the hidden rows,
    softmax @ W - W[y], is accumulated in the same pass, rescaled whenever the running max moves.
    Same FLOPs, same numbers up to rounding. Used for a frozen bias-free linear head without
    soft-capping; anything else takes the plain head and cross-entropy.
    """
    weight = getattr(head, "weight", None)
    plain = (
        softcap
        or not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or weight.requires_grad
        or hidden.shape[0] == 0
    )
    if plain:
        logits = head(hidden)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction=reduction)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    losses = HeadCrossEntropy.apply(hidden, weight, labels, need_grad, row_chunk, vocab_chunk)
    return losses.mean() if reduction == "mean" else losses.sum()


class FastDropout(torch.nn.Dropout):
    """Dropout whose mask takes 16 random bits per element, four per 64-bit draw.

    torch's CPU bernoulli_ draws a 32-bit number per element on one thread (~5 ns each):
    on the seven LoRA inputs of every layer that was a tenth of a Gemma-270M step. The drop
    probability is rounded to a multiple of 1/32768 (0.05 -> 0.04999) and the scale follows.
    The RNG is torch's default generator, so seeding and checkpointed RNG state still apply.
    """

    def __init__(self, p):
        super().__init__(p)
        self.threshold = round(p * 32768)
        self.scale = 1 / (1 - self.threshold / 32768)

    def forward(self, x):
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits
        bits = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # 15 uniform bits each
        return torch.where(bits >= self.threshold, x * self.scale, 0)


def use_fast_lora_dropout(model):
    """Swap the nn.Dropout on the LoRA inputs for FastDropout (same p; CPU training only)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[name] = FastDropout(dropout.p)
