"""Trained adapters shared by every test of a session that asks for the same one: the same base
checkpoint, records and settings train once, each later ask gets the same folder.

    adapter = adapter_cache.memorised(tiny_model, records)                      # MEMORISE
    adapter = adapter_cache.memorised(base, records, system_prompt=SYSTEM)      # MEMORISE + a setting
    adapter = adapter_cache.trained(tiny_model, records, FinetuneConfig(epochs=1))

`adapter_cache` is the root conftest's session fixture. Each call returns `<out>/adapter` of a
`train()` run (its config, metrics and prompt-format record beside it, as train() writes them),
with its adapter.gguf for llama.cpp. The folder is shared: a test that changes it, or needs it
without its adapter.gguf, copies it first (shutil.copytree, ignore_patterns("adapter.gguf")).
A checkpoint is known by its path: tests never change a session's checkpoints in place.
"""

import hashlib
import json
from pathlib import Path

from tests.support.memorise import MEMORISE


class AdapterCache:
    def __init__(self, root):
        self.root = Path(root)
        self._trained = {}

    def memorised(self, base_dir, records, dev_records=(), **settings):
        """An adapter that memorised `records` (tests/support/memorise.py, plus `settings`)."""
        from llm.finetune.config import FinetuneConfig

        return self.trained(base_dir, records, FinetuneConfig(**{**MEMORISE, **settings}), dev_records)

    def trained(self, base_dir, records, config, dev_records=()):
        """The adapter `train(config, base_dir, records, dev_records, ...)` writes, trained once a session."""
        key = json.dumps(
            {"base": str(Path(base_dir).resolve()), "records": list(records), "dev": list(dev_records), "config": config.to_dict()},
            sort_keys=True, ensure_ascii=False,
        )
        if key not in self._trained:
            out = self.root / hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
            self._trained[key] = _train(config, base_dir, records, dev_records, out)
        return self._trained[key]


def _train(config, base_dir, records, dev_records, out):
    import torch

    from llm.finetune.loop import train
    from llm.gguf import write_lora_gguf

    # One torch thread: the test machine's two cores are shared by two pytest processes (and
    # often by other people's). Measured on it, lightly loaded: twelve pairs memorised in 21 s
    # on torch's two threads, 5 s on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config, base_dir, list(records), list(dev_records), out)
    finally:
        torch.set_num_threads(threads)
    write_lora_gguf(out / "adapter", base_dir=base_dir)
    return out / "adapter"
