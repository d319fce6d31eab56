"""The adapter table of a local engine: which versions it knows, which is current, who uses which.

    table.set_current("v3", "var/adapters/v3/adapter")   # new requests answer with v3
    name = table.bind(CURRENT, None)                     # a new request takes a reference ...
    table.release(name)                                  # ... and gives it back when it ends
    table.collect()                                      # (decode thread) unload the unused

Requests already bound finish on the adapter they started with; a version that is neither
current nor used any more is garbage, unloaded by the decode thread between steps (the model is
not changed under a running forward). The backend's weights are loaded and unloaded through the
two callables it gives, always under `model_lock`; the table's own state is under `lock` (the
scheduler's Condition, so that new garbage wakes the decode loop).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from llm.finetune.config import read_saved_record
from llm.prompting import PromptFormat, read_prompt_format

logger = logging.getLogger(__name__)

CURRENT = object()  # submit(adapter=CURRENT): the adapter new requests get now (the default)


@dataclass
class Adapter:
    path: Path
    system_prompt: str | None  # what it was trained with (finetune_config.json), if recorded
    prompt_format: PromptFormat = PromptFormat.GEMMA  # the format it was trained on: it is served in it
    refs: int = 0  # requests bound to it that have not finished
    loaded: bool = False  # its weights are in the backend


class AdapterTable:
    def __init__(self, *, lock, model_lock, file, hint, load_weights, unload_weights, model_loaded):
        self.lock = lock
        self.model_lock = model_lock
        self.file = file  # what an adapter directory must hold for this backend
        self.hint = hint  # how to make that file when it is missing
        self._load_weights = load_weights  # (name, path): make it servable
        self._unload_weights = unload_weights  # (name): drop it
        self._model_loaded = model_loaded  # (): whether weights can be loaded yet
        self._entries = {}  # name -> Adapter
        self.current = None  # adapter name for new requests; None = base model
        self._garbage = set()  # names to unload on the decode thread once unused

    def read(self, path):
        path = Path(path)
        if not (path / self.file).is_file():
            raise FileNotFoundError(f"no adapter in {str(path)!r} ({self.file} is missing{self.hint})")
        system = read_saved_record(path).get("system_prompt")
        return Adapter(path=path.resolve(), system_prompt=system, prompt_format=read_prompt_format(path))

    def path(self, name):
        with self.lock:
            return self._entries[name].path

    def loaded_names(self):
        with self.lock:
            return sorted(name for name, adapter in self._entries.items() if adapter.loaded)

    def system_prompt(self, name):
        """Under `lock`: the prompt `name` was trained with (None: not recorded, or the base model)."""
        return self._entries[name].system_prompt if name is not None else None

    def prompt_format(self, name):
        """Under `lock`: the PromptFormat `name` was trained on (None for the base model: the
        checkpoint's own format, which only the engine's tokenizer knows)."""
        return self._entries[name].prompt_format if name is not None else None

    def load_current(self):
        """Under `model_lock`, as the model has just loaded: the current adapter's weights."""
        with self.lock:
            current = self.current
        if current is not None:
            self._load(current)

    def _load(self, name):
        """Under `model_lock`: load the weights of a known adapter unless they are in."""
        with self.lock:
            adapter = self._entries[name]
            if adapter.loaded:
                return
        self._load_weights(name, adapter.path)
        with self.lock:
            adapter.loaded = True

    def _check_same(self, name, known, path):
        if known is not None and path is not None and Path(path).resolve() != known.path:
            raise ValueError(f"adapter {name!r} is already loaded from {str(known.path)!r}; versions are immutable")

    def set_current(self, name, path=None):
        """Serve new requests with `name` (read from `path` the first time); None = base model.
        Raises (leaving the table as it was) when the adapter cannot be loaded."""
        adapter = None
        if name is not None:
            with self.lock:
                known = self._entries.get(name)
            if known is None:
                if path is None:
                    raise ValueError(f"adapter {name!r} is not loaded; give its path")
                adapter = self.read(path)
            self._check_same(name, known, path)
        with self.model_lock:
            with self.lock:
                if name is not None and name not in self._entries:
                    self._entries[name] = adapter
                previous, self.current = self.current, name
                self._garbage.discard(name)
                if previous is not None and previous != name:
                    self._garbage.add(previous)
            if name is not None and self._model_loaded():
                try:
                    self._load(name)
                except Exception:
                    with self.lock:  # leave the engine as it was
                        self.current = previous
                        self._garbage.discard(previous)
                        self._entries.pop(name, None)
                    raise
            if not self._model_loaded():
                self.collect()  # nothing loaded: just forget the unused entries
        with self.lock:
            self.lock.notify_all()

    def bind(self, adapter, path):
        """The adapter name a new request answers with, with a reference taken on it. A pinned
        adapter that is not loaded yet is loaded now (under `model_lock`: waits for the current step)."""
        if adapter is CURRENT:
            with self.lock:
                name = self.current
                if name is not None:
                    self._entries[name].refs += 1
            return name
        if adapter is None:
            return None
        with self.lock:
            entry = self._entries.get(adapter)
            self._check_same(adapter, entry, path)
            if entry is not None and entry.loaded:
                entry.refs += 1
                return adapter
        if entry is None and path is None:
            raise ValueError(f"adapter {adapter!r} is not loaded; give its path")
        known_path = Path(path) if path is not None else entry.path
        read = self.read(known_path) if entry is None else None
        with self.model_lock:
            with self.lock:
                entry = self._entries.setdefault(adapter, read) if read is not None else self._entries.get(adapter)
                if entry is None:  # collected between the two looks: read it again
                    entry = self._entries[adapter] = self.read(known_path)
                entry.refs += 1
            try:
                self._load(adapter)
            except BaseException:
                with self.lock:
                    entry.refs -= 1
                    if entry.refs == 0 and adapter != self.current and not entry.loaded:
                        self._entries.pop(adapter, None)
                raise
        return adapter

    def release(self, name):
        """A request bound to `name` finished."""
        if name is None:
            return
        with self.lock:
            self._entries[name].refs -= 1
            if self._entries[name].refs == 0 and name != self.current:
                self._garbage.add(name)
            self.lock.notify_all()

    def garbage_ready(self):
        """Under `lock`: whether some adapter waits to be unloaded."""
        return any(n != self.current and self._entries[n].refs == 0 for n in self._garbage)

    @property
    def has_garbage(self):
        return bool(self._garbage)

    def collect(self):
        """Unload adapters that are not current and that no request uses any more."""
        with self.model_lock, self.lock:
            unused = [n for n in self._garbage if n != self.current and self._entries[n].refs == 0]
            for name in unused:
                self._garbage.discard(name)
                adapter = self._entries.pop(name)
                if adapter.loaded:
                    self._unload_weights(name)
                    logger.info("adapter %s deleted", name)
