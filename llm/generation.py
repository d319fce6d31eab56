"""Where an answer ends, and a plain greedy answer to one question.

`end_of_turn_id` is the token every trained answer ends with (the labels of llm.finetune.data)
and `stop_token_ids` the ids generation stops on (the engines and `generate_answer`): one
definition, so that a model stops where it was taught to. `generate_answer` is for training-side
evaluation and tests; chat is served by llm.engine.
"""

import torch

from llm.prompting import END, PromptFormat, Turn, encode_prompt, prompt_format_for, question_text, render_conversation

# An answer no template contains, to find what a chat template writes right after an answer.
_PROBE_ANSWER = "csp-probe-answer"


def end_of_turn_id(tokenizer, prompt_format=PromptFormat.GEMMA):
    """The id that ends an answer: the format's end-of-turn token when it is one token, else EOS.

    For the Gemma format that is <end_of_turn>; for a chat template, the special token the
    template writes right after an answer (<|im_end|> for Qwen, <|eot_id|> for Llama 3). A
    template that writes none there (ChatGLM3 starts the next turn instead) ends answers with EOS.
    """
    if PromptFormat(prompt_format) is PromptFormat.CHAT_TEMPLATE:
        token_id = _template_turn_end_id(tokenizer)
    else:
        token_id = tokenizer.convert_tokens_to_ids(END)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return tokenizer.eos_token_id
    return token_id


def _template_turn_end_id(tokenizer):
    turns = [Turn("user", "?"), Turn("assistant", _PROBE_ANSWER)]
    text = render_conversation(
        turns, add_generation_prompt=False, prompt_format=PromptFormat.CHAT_TEMPLATE, tokenizer=tokenizer
    )
    tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer, prompt_format=PromptFormat.GEMMA):
    """The ids generation stops on: the end of the answer's turn, and EOS."""
    return sorted({i for i in (end_of_turn_id(tokenizer, prompt_format), tokenizer.eos_token_id) if i is not None})


def generate_answer(model, tokenizer, instruction, input="", *, max_new_tokens=128, system="", prompt_format=None):
    """Greedy answer to one question, rendered exactly as in training, stopped at end of turn.

    prompt_format defaults to the one `train()` picks for this tokenizer, right for a model it
    just trained; for an adapter loaded from disk pass `read_prompt_format(adapter_dir)`.
    """
    prompt_format = prompt_format or prompt_format_for(tokenizer)
    text = render_conversation(
        [Turn("user", question_text(instruction, input))], system=system, prompt_format=prompt_format, tokenizer=tokenizer
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([encode_prompt(tokenizer, text, prompt_format)], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer, prompt_format),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,  # training turns it off in the model config
        )
    model.train(was_training)
    new_tokens = output[0, input_ids.shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def choice_probabilities(model, tokenizer, instruction, choices, *, system="", prompt_format=None):
    """The probability of each of `choices` (one token each) as the first token of the answer to
    `instruction`, among themselves: what the engine's `choices` option reports
    (llm.engine.local.LocalEngine.submit), for evaluation without an engine."""
    prompt_format = prompt_format or prompt_format_for(tokenizer)
    text = render_conversation([Turn("user", instruction)], system=system, prompt_format=prompt_format, tokenizer=tokenizer)
    ids = []
    for choice in choices:
        encoded = tokenizer.encode(str(choice), add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"choice {choice!r} is {len(encoded)} tokens, not one")
        ids.append(encoded[0])
    device = next(model.parameters()).device
    input_ids = torch.tensor([encode_prompt(tokenizer, text, prompt_format)], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, -1]
    model.train(was_training)
    return torch.softmax(logits[ids].float(), dim=-1).tolist()
