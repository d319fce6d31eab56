"""A tiny random-init causal LM with a tokenizer trained on the fly, for tests and demos.

It is a Qwen2-architecture model (under 1M parameters with the vocabulary of the sample
data, a few million with a 16k one) and a byte-level BPE tokenizer learned from the given
texts, saved as an ordinary Hugging Face checkpoint directory, so every code path that loads
a real base model (`llm.modeling.load_base`, the chat engine) runs against it unchanged.
Builds in a few seconds on a CPU; nothing is downloaded.

    from llm.tinymodel import build_tiny_model
    build_tiny_model(["如何退货？", "您好！..."], "var/models/tiny")
    build_tiny_model(["如何退货？", "您好！..."], "var/models/tiny", gguf=True)  # plus gguf/model.gguf

The turn markers of `llm.prompting` are declared as special tokens, so each is one id,
and `<end_of_turn>` is the EOS token: generation stops at the end of the model's turn, as with
Gemma.
"""

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from llm.prompting import END, START

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<|endoftext|>"  # Qwen2Tokenizer's unknown token: in the vocabulary, it is not appended past the embedding
SPECIAL_TOKENS = [PAD, BOS, EOS, START, END, UNK]


def build_tokenizer(texts, *, vocab_size=2048):
    """Train a byte-level BPE tokenizer on texts; returns a PreTrainedTokenizerFast.

    Encoding prepends BOS, as Gemma's tokenizer does, so both models see the same kind of prompt.
    The pipeline is Qwen2Tokenizer's own (NFC, Qwen's split regex, byte level): AutoTokenizer
    loads a qwen2 checkpoint with that class, which rebuilds the pipeline around the saved
    vocabulary, so training the merges with anything else would change the tokens on reload.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=END,  # generation must stop at the end of the model's turn
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START, EOS],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    texts,
    out_dir,
    *,
    vocab_size=2048,
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=384,  # a multiple of 64: bitsandbytes packs 4-bit CPU weights in 64-blocks
    max_positions=1024,
    initializer_range=0.1,
    seed=0,
    gguf=False,
):
    """Train a tokenizer on texts, build a random-init Qwen2 LM, save both to out_dir.

    With gguf, also write the same weights and tokenizer as `out_dir/gguf/model.gguf` (f32), the
    file llama.cpp loads and `llm.basemodel.describe_checkpoint` reports.
    Deterministic for a given seed and texts. Returns out_dir as a Path.
    """
    out_dir = Path(out_dir)
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("build_tiny_model needs at least one non-empty text to train the tokenizer on")
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        # LoRA trains neither the embedding nor (tied to it) the output layer. With the usual
        # std of 0.02 the frozen output layer cannot reach a confident logit (~2.6 at most)
        # and LoRA barely learns; at 0.1 it memorises a few dozen answers in seconds.
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    # Seed a private generator state rather than leaking a seeded global RNG to the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if gguf:
        from llm.gguf import write_model_gguf

        write_model_gguf(out_dir)
    return out_dir
