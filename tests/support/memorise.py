"""The settings that make the tiny model (llm/tinymodel.py) memorise a handful of answers in
seconds, for every test that needs an adapter whose answers are known:

    adapter = adapter_cache.memorised(tiny_model, records)   # trained once a session (tests/support/adapters.py)

    from tests.support.memorise import MEMORISE              # a training the test itself runs
    train(FinetuneConfig(**MEMORISE), tiny_model, records, [], out)

Measured (llm/tests/test_finetune.py): on 28 sample pairs, r=16 / alpha=32 / lr 1e-2 / dropout 0 /
25 epochs reproduced 28 of 28 answers for three seeds; 30 epochs leave a margin. bf16 is off so
that a machine with fast bf16 trains the same adapter as one without.

A dict of FinetuneConfig's keywords, so that a test can add its own (`system_prompt=...`).
"""

MEMORISE = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-2, epochs=30, batch_size=4, bf16="off")
