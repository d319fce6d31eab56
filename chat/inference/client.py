"""The web side of the inference worker: `WorkerEngine`, made by chat.serving when
CSP_INFERENCE_BACKEND=worker. It keeps no model: `submit()` sends the conversation to the
inference channel and waits for the worker's Accepted or Refused (the same refusals a local
engine raises, raised here); tokens and the end come back to this process's reply channel.
"""

import asyncio
import logging
import threading
import time

from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.conf import settings
from django.core.cache import cache

from chat.inference import protocol
from llm.engine.events import EngineError, error_from_wire
from llm.engine.remote import RemoteEngine, stats_from

logger = logging.getLogger(__name__)

WORKERS_KEY = "csp:inference-workers"  # cache: {worker name: its last metrics, with "seen" (epoch s)}
HEARTBEAT_SECONDS = 2.0


def new_layer():
    """A channel layer of this thread's own: channels-redis lets one loop at a time receive on a
    layer instance, and the consumers of this process already use the shared one."""
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    if type(layer).__name__ == "InMemoryChannelLayer":
        raise EngineError("the inference worker needs a channel layer shared between processes (set REDIS_URL)")
    return layer


def workers():
    """The inference workers heard from recently: {name: metrics with "seen"} (empty without any)."""
    now = time.time()
    return {name: info for name, info in (cache.get(WORKERS_KEY) or {}).items() if now - info["seen"] < 5 * HEARTBEAT_SECONDS}


def publish(name, metrics):
    """Record a worker's metrics for the admin (the cache is shared through Redis)."""
    known = {n: info for n, info in (cache.get(WORKERS_KEY) or {}).items() if time.time() - info["seen"] < 60}
    known[name] = metrics
    cache.set(WORKERS_KEY, known, timeout=120)


class WorkerEngine(RemoteEngine):
    """Requests go to whichever inference worker takes them from the channel."""

    backend = "worker"

    def __init__(self, config, *, channel=None, wait_seconds=None):
        super().__init__(config)
        self.channel = channel or settings.CSP_INFERENCE_CHANNEL
        self.wait_seconds = wait_seconds or settings.CSP_INFERENCE_WAIT_SECONDS
        self.backend_reason = f"configured: worker, through the channel {self.channel!r}"
        self._loop = self._layer = self._reply = None
        self._answers = {}  # request id -> [threading.Event, Accepted or Refused]

    # the dispatcher: one thread with its own event loop owns this process's layer connection

    def _connect(self):
        self._layer = new_layer()
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._dispatch, args=(ready,), name="inference-client", daemon=True).start()
        if not ready.wait(10):
            raise EngineError("the inference client could not reach the channel layer")

    def _dispatch(self, ready):
        asyncio.set_event_loop(self._loop)

        async def main():
            self._reply = await self._layer.new_channel("inference-reply.")
            ready.set()
            while not self._closed:
                try:
                    message = await self._layer.receive(self._reply)
                except asyncio.CancelledError:
                    return
                except Exception:
                    logger.exception("inference client: receiving failed; retrying in 1 s")
                    await asyncio.sleep(1)
                    continue
                try:
                    self._on_message(protocol.parse(message))
                except Exception:
                    logger.exception("inference client: bad message %r", message)

        self._loop.run_until_complete(main())

    def _call(self, coroutine, timeout=10):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _on_message(self, message):
        waiter = self._answers.get(message.id)
        if isinstance(message, (protocol.Accepted, protocol.Refused)) and waiter is not None:
            waiter[1] = message
            waiter[0].set()
            return
        request = self._inflight_request(message.id)
        if request is None:  # nobody waits for it any more (timed out, or cancelled): stop it there
            if isinstance(message, (protocol.Accepted, protocol.Tokens)) and message.worker:
                self._loop.create_task(self._layer.send(message.worker, protocol.Cancel(message.id).to_message()))
            return
        if isinstance(message, protocol.Tokens):
            request.feed(message.text)
        elif isinstance(message, protocol.Finished):
            self.requests_finished += 1
            request.end(stats_from(message.stats, request))

    # what RemoteEngine asks of a subclass

    def _start(self, request, payload):
        waiter = self._answers[request.id] = [threading.Event(), None]
        # a worker that finds it after the deadline drops it
        message = protocol.Submit(id=request.id, reply=self._reply, deadline=time.time() + self.wait_seconds, **payload)
        try:
            self._call(self._layer.send(self.channel, message.to_message()))
            if not waiter[0].wait(self.wait_seconds):
                raise EngineError(
                    f"no inference worker answered within {self.wait_seconds} s "
                    f"(is `manage.py inference_worker` running with the same REDIS_URL?)"
                )
        finally:
            self._answers.pop(request.id, None)
        answer = waiter[1]
        if isinstance(answer, protocol.Refused):
            raise error_from_wire(answer.error)
        request.remote = {"worker": answer.worker, "served_by": answer.served_by}
        request.accepted(answer.adapter, prompt_tokens=answer.prompt_tokens, dropped_turns=answer.dropped_turns)

    def _cancel(self, request):
        if request.remote.get("worker") and not request.done:
            # Not waited for: cancel() is called from event loops (a consumer whose client left).
            message = protocol.Cancel(request.id).to_message()
            asyncio.run_coroutine_threadsafe(self._layer.send(request.remote["worker"], message), self._loop)

    def _disconnect(self):
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)

    def metrics(self):
        return {**super().metrics(), "workers": workers()}
