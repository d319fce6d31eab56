"""The worker side: `InferenceWorker` takes requests from the channel and answers them with this
process's ordinary engine (the `EngineHolder` of chat.serving it is given, on the backend
`--backend` names), so activation reaches it exactly as it reaches a single-process server: it
checks the active version before each new answer. (Given, not imported: chat.serving imports
this package's client.) It publishes its metrics to the cache (shared through Redis)
every few seconds: the admin shows them. Run by `manage.py inference_worker`.
"""

import asyncio
import logging
import os
import socket
import time

from asgiref.sync import sync_to_async
from django.conf import settings

from chat.inference import protocol
from chat.inference.client import HEARTBEAT_SECONDS, new_layer, publish
from llm.engine.events import Done, EngineError, InvalidRequest

logger = logging.getLogger(__name__)


class InferenceWorker:
    def __init__(self, engines, channel=None):
        self.engines = engines  # chat.serving.holder: .active() before each answer, .get() for metrics
        self.channel = channel or settings.CSP_INFERENCE_CHANNEL
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.running = {}  # request id -> the engine's Request
        self.layer = self.own = None
        self._stopping = asyncio.Event()

    async def serve(self, ready=None):
        self.layer = new_layer()
        self.own = await self.layer.new_channel("inference-worker.")
        engine = await sync_to_async(self.engines.active, thread_sensitive=False)()
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
                message = protocol.parse(await self.layer.receive(channel))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("inference worker: receiving from %s failed; retrying in 1 s", channel)
                await asyncio.sleep(1)
                continue
            if isinstance(message, protocol.Submit):
                asyncio.create_task(self._answer(message))
            elif isinstance(message, protocol.Cancel) and message.id in self.running:
                self.running[message.id].cancel()

    async def _answer(self, message):
        if time.time() > message.deadline:
            return  # its web process stopped waiting: answering would generate for nobody
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        options = {
            "system": message.system,
            "max_new_tokens": message.max_new_tokens,
            "temperature": message.temperature,
            "top_p": message.top_p,
            "seed": message.seed,
            "on_event": lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
        }
        if message.pinned:
            options.update(adapter=message.adapter, adapter_path=message.adapter_path)
        history = [{"role": role, "text": text} for role, text in message.history]
        try:
            engine = await sync_to_async(self.engines.active, thread_sensitive=False)()
            request = await engine.asubmit(history, **options)
        except EngineError as exc:
            return await self._send(message, protocol.Refused, error=exc.wire())
        except (ValueError, TypeError) as exc:
            return await self._send(message, protocol.Refused, error=InvalidRequest(str(exc)).wire())
        except OSError as exc:  # the base model or adapter files are missing
            return await self._send(message, protocol.Refused, error=EngineError(str(exc)).wire())
        self.running[message.id] = request
        try:
            await self._send(
                message, protocol.Accepted, adapter=request.adapter, prompt_tokens=request.stats.prompt_tokens,
                dropped_turns=request.stats.dropped_turns, served_by=self.name,
            )
            await self._relay(message, queue)
        except Exception:
            logger.exception("inference worker: request %s could not be relayed; cancelling it", message.id)
            request.cancel()
        finally:
            self.running.pop(message.id, None)

    async def _relay(self, message, queue):
        while True:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            text = "".join(event.text for event in events if not isinstance(event, Done))
            if text:
                await self._send(message, protocol.Tokens, text=text)
            done = next((event for event in events if isinstance(event, Done)), None)
            if done is not None:
                await self._send(message, protocol.Finished, stats=done.stats.as_dict())
                return

    async def _send(self, submit, kind, **fields):
        reply = kind(id=submit.id, worker=self.own, **fields)
        await self.layer.send(submit.reply, reply.to_message())

    async def _heartbeat(self):
        while True:
            metrics = {**self.engines.get().metrics(), "seen": time.time(), "channel": self.channel}
            await sync_to_async(publish, thread_sensitive=False)(self.name, metrics)
            await asyncio.sleep(HEARTBEAT_SECONDS)
