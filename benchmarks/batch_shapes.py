"""Why two chats decode slower than one on llama.cpp: the cost of one `llama_decode` per batch shape.

    .venv/bin/python benchmarks/batch_shapes.py                  # the embedded GGUF, and a copy with a Q4_0 output layer
    .venv/bin/python benchmarks/batch_shapes.py --threads 1 --head none

One context like the engine's (unified KV for 16 sequences, the engine's threads), four
sequences prefilled with the same 100-token prompt; then each shape is decoded 30 times at
position 100 (its cells removed after each) and the median printed:

  n seq, n logits   n chats' next tokens, each with its logits (a decode step of n chats)
  n seq, 1 logits   the same tokens, logits for one of them (what the body of the model costs)
  1 seq, 1+d tok    a token and a draft of d, logits for all (a prompt-lookup verify step)

Gemma-3-270M ties its output layer to the token embedding: 262 144 x 640, 180 MB of the GGUF's
245 MB as Q8_0 (K-quants need rows of 256; 640 is not). A one-row product reads it once
(memory-bound). `--head Q4_0` (the default also runs it) measures a copy of the GGUF with that tensor
requantised the same way: the copy the engine serves with CSP_LLAMA_HEAD_TYPE
(llm.engine.llamacpp.gguf_with_head: made once, kept beside the original, the other tensors as they are), plus how often its greedy answers agree with the original's on the
first questions of data/train.json (the base model, no adapter: a quality check, not a verdict).
"""

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402

from common import cpu_line  # noqa: E402  (benchmarks/ is on the path when run as a script)
from llm.engine.llamacpp import base_gguf, gguf_with_head, use_extra_buffers  # noqa: E402

QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp calls it
DEFAULT_BASE = ROOT / "var" / "models" / "gemma-3-270m"
SHAPES = (
    ("1 seq, 1 logits", 1, 1, 1),
    ("2 seq, 2 logits", 2, 1, 2),
    ("2 seq, 1 logits", 2, 1, 1),
    ("4 seq, 4 logits", 4, 1, 4),
    ("4 seq, 1 logits", 4, 1, 1),
    ("8 seq, 8 logits", 8, 1, 8),
    ("1 seq, 1+8 tok, 9 logits", 1, 9, 9),
    ("1 seq, 1+8 tok, 1 logits", 1, 9, 1),
)


class Model:
    def __init__(self, path, threads):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = use_extra_buffers("auto")
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = 16
        cparams.kv_unified = True
        cparams.n_ctx = 16 * 512
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def decode(self, entries):
        """entries: (seq id, tokens, first position, how many of the last tokens want logits)."""
        batch, count = self.batch, 0
        for seq, tokens, start, outputs in entries:
            for offset, token in enumerate(tokens):
                batch.token[count], batch.pos[count], batch.n_seq_id[count] = token, start + offset, 1
                batch.seq_id[count][0] = seq
                batch.logits[count] = offset >= len(tokens) - outputs
                count += 1
        batch.n_tokens = count
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def tokenize(self, text):
        data = text.encode()
        ids = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), ids, len(data) + 8, True, True)
        return list(ids[:count])

    def free(self):
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def _argmax(pointer, n):
    import numpy

    return int(numpy.ctypeslib.as_array(pointer, shape=(n,)).argmax())


def shape_costs(model, rounds):
    llama_cpp.llama_memory_clear(model.memory, True)
    prompt = list(range(1000, 1100))
    for seq in range(8):
        model.decode([(seq, prompt, 0, 1)])
    costs = {}
    for label, sequences, tokens, logits in SHAPES:
        times = []
        for step in range(rounds):
            if sequences == 1:
                entries = [(0, list(range(2000 + step, 2000 + step + tokens)), 100, logits)]
            else:
                entries = [(seq, [2000 + step], 100, 1 if seq < logits else 0) for seq in range(sequences)]
            start = time.perf_counter()
            model.decode(entries)
            times.append(time.perf_counter() - start)
            llama_cpp.llama_memory_seq_rm(model.memory, -1, 100, -1)
        costs[label] = statistics.median(times) * 1000
    return costs


def greedy(model, text, new_tokens):
    llama_cpp.llama_memory_clear(model.memory, True)
    ids = model.tokenize(f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n")
    model.decode([(0, ids, 0, 1)])
    out, position = [], len(ids)
    for _ in range(new_tokens):
        token = _argmax(llama_cpp.llama_get_logits_ith(model.ctx, -1), model.n_vocab)
        out.append(token)
        if token in (1, 106):  # <eos>, <end_of_turn>
            break
        model.decode([(0, [token], position, 1)])
        position += 1
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base model directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="decodes per shape (default: %(default)s)")
    parser.add_argument("--head", default="Q4_0", help="also measure a copy with this output-layer type; none: skip (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=12, help="greedy answers compared (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per compared answer (default: %(default)s)")
    args = parser.parse_args()

    gguf = base_gguf(args.base)
    if gguf is None:
        raise SystemExit(f"no GGUF under {args.base}: run `manage.py prepare_base_model`")
    llama_cpp.llama_log_set(QUIET, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    print(cpu_line())
    print(f"{gguf.name}, {args.threads} threads, median of {args.rounds} decodes per shape\n")
    files = {"Q8_0 head (embedded)": gguf}
    if args.head.lower() != "none":
        files[f"{args.head} head (requantised copy)"] = gguf_with_head(gguf, args.head.lower())
    results, answers = {}, {}
    questions = [pair["instruction"] for pair in json.loads((ROOT / "data" / "train.json").read_text())[: args.questions]]
    for name, path in files.items():
        model = Model(path, args.threads)
        results[name] = shape_costs(model, args.rounds)
        answers[name] = [greedy(model, question, args.new_tokens) for question in questions]
        model.free()
    names = list(files)
    print("| shape | " + " | ".join(f"{name} ms" for name in names) + " |")
    print("|---|" + "---|" * len(names))
    for label, *_ in SHAPES:
        print(f"| {label} | " + " | ".join(f"{results[name][label]:.1f}" for name in names) + " |")
    for name in names:
        one = results[name]["1 seq, 1 logits"]
        rates = {n: n * 1000 / results[name][f"{n} seq, {n} logits"] for n in (2, 4, 8)}
        print(
            f"\n{name}: one chat {1000 / one:.0f} tok/s; 2 chats {rates[2]:.0f} ({rates[2] * one / 1000:.2f}x), "
            f"4 chats {rates[4]:.0f} ({rates[4] * one / 1000:.2f}x), 8 chats {rates[8]:.0f} ({rates[8] * one / 1000:.2f}x); "
            f"a 9-token verify = {results[name]['1 seq, 1+8 tok, 9 logits'] / one:.1f} one-token steps"
        )
    if len(names) == 2:
        same = sum(a == b for a, b in zip(*answers.values()))
        agree = []
        for a, b in zip(*answers.values()):
            prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            agree.append(prefix)
        print(
            f"\ngreedy answers of the base model to {len(questions)} train questions ({args.new_tokens} tokens): "
            f"{same} identical; tokens before the first difference: median {statistics.median(agree)}, min {min(agree)}"
        )


if __name__ == "__main__":
    main()
