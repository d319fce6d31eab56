"""LoRA / QLoRA fine-tuning of a local causal LM on Q&A pairs: a plain package, no Django.

The Django side (the training task) calls `train(config, base_dir, train_records, dev_records,
out_dir)`; this package never calls back except through the `on_progress`, `should_stop` and
`should_interrupt` callables it is given. From a shell:

    import json
    from llm.finetune.config import FinetuneConfig
    from llm.finetune.loop import train
    records = json.load(open("data/train.json"))
    train(FinetuneConfig(epochs=3), "var/models/base", records, [], "var/runs/demo")

The modules: `config` (FinetuneConfig, torch-free: Django imports it), `data` (examples with
answer-only labels, batches), `kernels` (the fused LM head + cross-entropy, the fast LoRA
dropout), `loss`, `checkpoints` (everything written to disk) and `loop` (`train`). Loading the
base model and adding LoRA is llm.modeling's; generation is llm.generation's.

What ends up in out_dir:

    adapter/               the PEFT adapter (save_pretrained) plus finetune_config.json;
                           it appears only when training finished (written aside, then renamed)
    finetune_config.json   the config the adapter was trained with, and its prompt format
    metrics.json           loss history, dev loss per epoch, steps, tokens/s, seconds
    checkpoints/step-N/    while training: adapter + optimizer + scheduler + RNG state, each
                           renamed into place only when complete; removed after a successful run

Every example is rendered by `llm.prompting.render_training_example` in the checkpoint's prompt
format (its chat template when it has one, else the Gemma format), the same renderer the
inference engine uses, and the loss is taken on the answer tokens only, which end with the
end-of-turn token so that the model learns to stop (Gemma base otherwise rambles on).

Speed (measured by benchmarks/train_throughput.py): where bf16 runs, the frozen base weights are
held in bf16 and the LoRA weights in fp32; the LM head runs only at answer positions, fused with
the cross-entropy so that no logits are stored; batches group similar lengths; on CPU the LoRA
dropout draws its masks cheaply. None of it changes the loss beyond rounding.

This file imports nothing: `import llm.finetune.config` must not pay for torch.
"""
