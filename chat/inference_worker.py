"""A dedicated inference worker: N web processes share one loaded model and its batching.

    # the worker (one per GPU/CPU host that serves; several compete for the same channel)
    REDIS_URL=redis://... manage.py inference_worker --backend auto
    # every web process
    REDIS_URL=redis://... CSP_INFERENCE_BACKEND=worker daphne csplatform.asgi:application

The web side (`WorkerEngine`, made by `chat.serving` when CSP_INFERENCE_BACKEND=worker) keeps no
model. `submit()` sends the conversation to the named channel CSP_INFERENCE_CHANNEL through the
channel layer (channels-redis: a Redis list, so whichever worker is free takes it) and waits for
the worker's answer: `accepted` (with the version that answers) or `refused` (busy, too long,
unavailable) — the same refusals a local engine raises, raised here. Tokens then come back to the
web process's own reply channel as `tokens` messages (those generated while the last message was
being sent go together: a slow link gets fewer, larger messages, not a backlog), then `done` with
the answer's stats. A cancel goes to the worker's own channel, so it reaches the worker that runs
the request.

The worker (`InferenceWorker`) runs the process's ordinary engine (`chat.serving.active_engine`,
on the backend its `--backend` names), so activation reaches it exactly as it reaches a
single-process server: it checks the active version before each new answer. It publishes its
metrics to the cache (shared through Redis) every few seconds: the admin shows them.

Every message is a small dict of JSON types (channels-redis serialises with msgpack).
"""

import asyncio
import logging
import os
import socket
import threading
import time

from asgiref.sync import sync_to_async
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.conf import settings
from django.core.cache import cache

from llm.engine.events import EngineBusy, EngineClosed, EngineError, InputTooLong
from llm.engine.remote import RemoteEngine, stats_from

logger = logging.getLogger(__name__)

WORKERS_KEY = "csp:inference-workers"  # cache: {worker name: its last metrics, with "seen" (epoch s)}
HEARTBEAT_SECONDS = 2.0


def _new_layer():
    """A channel layer of this thread's own: channels-redis lets one loop at a time receive on a
    layer instance, and the consumers of this process already use the shared one."""
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    if type(layer).__name__ == "InMemoryChannelLayer":
        raise EngineError("the inference worker needs a channel layer shared between processes (set REDIS_URL)")
    return layer


class WorkerEngine(RemoteEngine):
    """The web side: requests go to whichever inference worker takes them from the channel."""

    backend = "worker"

    def __init__(self, config, *, channel=None, wait_seconds=None):
        super().__init__(config)
        self.channel = channel or settings.CSP_INFERENCE_CHANNEL
        self.wait_seconds = wait_seconds or settings.CSP_INFERENCE_WAIT_SECONDS
        self.backend_reason = f"configured: worker, through the channel {self.channel!r}"
        self._loop = self._layer = self._reply = None
        self._answers = {}  # request id -> [threading.Event, reply message]

    # the dispatcher: one thread with its own event loop owns this process's layer connection

    def _connect(self):
        self._layer = _new_layer()
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
                    self._on_message(message)
                except Exception:
                    logger.exception("inference client: bad message %r", message)

        self._loop.run_until_complete(main())

    def _call(self, coroutine, timeout=10):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _on_message(self, message):
        kind, rid = message.get("type"), message.get("id")
        waiter = self._answers.get(rid)
        if kind in ("inference.accepted", "inference.refused") and waiter is not None:
            waiter[1] = message
            waiter[0].set()
            return
        with self._state:
            request = self._inflight.get(rid)
        if request is None:  # nobody waits for it any more (timed out, or cancelled): stop it there
            if kind in ("inference.accepted", "inference.tokens") and message.get("worker"):
                self._loop.create_task(self._layer.send(message["worker"], {"type": "inference.cancel", "id": rid}))
            return
        if kind == "inference.tokens":
            request._feed(message["text"])
        elif kind == "inference.done":
            self.requests_finished += 1
            request._end(stats_from(message["stats"], request))

    # the contract

    def _start(self, request, payload):
        waiter = self._answers[request.id] = [threading.Event(), None]
        message = {
            **payload,
            "type": "inference.submit",
            "id": request.id,
            "reply": self._reply,
            "deadline": time.time() + self.wait_seconds,  # a worker that finds it later drops it
        }
        try:
            self._call(self._layer.send(self.channel, message))
            if not waiter[0].wait(self.wait_seconds):
                raise EngineError(
                    f"no inference worker answered within {self.wait_seconds} s "
                    f"(is `manage.py inference_worker` running with the same REDIS_URL?)"
                )
        finally:
            self._answers.pop(request.id, None)
        answer = waiter[1]
        if answer["type"] == "inference.refused":
            raise _refusal(answer)
        request.remote = {"worker": answer["worker"], "served_by": answer.get("served_by", "")}
        request._accepted(answer["adapter"], prompt_tokens=answer["prompt_tokens"], dropped_turns=answer["dropped_turns"])

    def _cancel(self, request):
        if request.remote.get("worker") and not request.done:
            # Not waited for: cancel() is called from event loops (a consumer whose client left).
            message = {"type": "inference.cancel", "id": request.id}
            asyncio.run_coroutine_threadsafe(self._layer.send(request.remote["worker"], message), self._loop)

    def _disconnect(self):
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)

    def metrics(self):
        return {**super().metrics(), "workers": workers()}


def _refusal(answer):
    error, text = answer.get("error"), answer.get("message", "")
    if error == "busy":
        return EngineBusy(retry_after=answer.get("retry_after", 1))
    if error == "too_long":
        return InputTooLong(text, limit=answer.get("limit"), size=answer.get("size"), unit=answer.get("unit"))
    if error == "closed":
        return EngineClosed(text)
    if error == "invalid":
        return ValueError(text)
    return EngineError(text)


def workers():
    """The inference workers heard from recently: {name: metrics with "seen"} (empty without any)."""
    now = time.time()
    return {name: info for name, info in (cache.get(WORKERS_KEY) or {}).items() if now - info["seen"] < 5 * HEARTBEAT_SECONDS}


class InferenceWorker:
    """The worker side: takes requests from the channel, answers them with this process's engine."""

    def __init__(self, channel=None):
        self.channel = channel or settings.CSP_INFERENCE_CHANNEL
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.running = {}  # request id -> the engine's Request
        self.layer = self.own = None
        self._stopping = asyncio.Event()

    async def serve(self, ready=None):
        from chat.serving import active_engine

        self.layer = _new_layer()
        self.own = await self.layer.new_channel("inference-worker.")
        engine = await sync_to_async(active_engine, thread_sensitive=False)()
        await engine.aload()  # before taking requests: the first customer does not wait for the load
        logger.info("inference worker %s serving %s on %s (channel %r)", self.name, engine.current_adapter or "the base model", engine.backend, self.channel)
        if ready is not None:
            ready()
        tasks = [
            asyncio.create_task(self._receive(self.channel)),
            asyncio.create_task(self._receive(self.own)),
            asyncio.create_task(self._heartbeat()),
        ]
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        for request in list(self.running.values()):
            request.cancel()

    def stop(self):
        self._stopping.set()

    async def _receive(self, channel):
        while True:
            try:
                message = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("inference worker: receiving from %s failed; retrying in 1 s", channel)
                await asyncio.sleep(1)
                continue
            if message.get("type") == "inference.submit":
                asyncio.create_task(self._answer(message))
            elif message.get("type") == "inference.cancel" and message.get("id") in self.running:
                self.running[message["id"]].cancel()

    async def _answer(self, message):
        from chat.serving import active_engine

        rid, reply = message["id"], message["reply"]
        if time.time() > message.get("deadline", float("inf")):
            return  # its web process stopped waiting: answering would generate for nobody
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        options = {
            "system": message.get("system"),
            "max_new_tokens": message.get("max_new_tokens"),
            "temperature": message.get("temperature"),
            "top_p": message.get("top_p"),
            "seed": message.get("seed"),
            "on_event": lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
        }
        if message.get("pinned"):
            options.update(adapter=message.get("adapter"), adapter_path=message.get("adapter_path"))
        history = [{"role": role, "text": text} for role, text in message["history"]]
        try:
            engine = await sync_to_async(active_engine, thread_sensitive=False)()
            request = await engine.asubmit(history, **options)
        except EngineBusy as exc:
            return await self._send(reply, rid, "refused", error="busy", retry_after=exc.retry_after)
        except InputTooLong as exc:
            return await self._send(
                reply, rid, "refused", error="too_long", message=str(exc), limit=exc.limit, size=exc.size, unit=exc.unit
            )
        except EngineClosed as exc:
            return await self._send(reply, rid, "refused", error="closed", message=str(exc))
        except (ValueError, TypeError) as exc:
            return await self._send(reply, rid, "refused", error="invalid", message=str(exc))
        except (EngineError, OSError) as exc:
            return await self._send(reply, rid, "refused", error="unavailable", message=str(exc))
        self.running[rid] = request
        try:
            await self._send(
                reply, rid, "accepted", adapter=request.adapter, prompt_tokens=request.stats.prompt_tokens,
                dropped_turns=request.stats.dropped_turns, served_by=self.name,
            )
            await self._relay(reply, rid, queue)
        except Exception:
            logger.exception("inference worker: request %s could not be relayed; cancelling it", rid)
            request.cancel()
        finally:
            self.running.pop(rid, None)

    async def _relay(self, reply, rid, queue):
        from llm.engine.events import Done

        while True:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            text = "".join(event.text for event in events if not isinstance(event, Done))
            if text:
                await self._send(reply, rid, "tokens", text=text)
            done = next((event for event in events if isinstance(event, Done)), None)
            if done is not None:
                await self._send(reply, rid, "done", stats=done.stats.as_dict())
                return

    async def _send(self, reply, rid, kind, **fields):
        await self.layer.send(reply, {"type": f"inference.{kind}", "id": rid, "worker": self.own, **fields})

    async def _heartbeat(self):
        from chat.serving import get_engine

        while True:
            metrics = {**get_engine().metrics(), "seen": time.time(), "channel": self.channel}
            await sync_to_async(_publish, thread_sensitive=False)(self.name, metrics)
            await asyncio.sleep(HEARTBEAT_SECONDS)


def _publish(name, metrics):
    known = {n: info for n, info in (cache.get(WORKERS_KEY) or {}).items() if time.time() - info["seen"] < 60}
    known[name] = metrics
    cache.set(WORKERS_KEY, known, timeout=120)
