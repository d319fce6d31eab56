"""Run a dedicated inference worker: the process that holds the model for web processes that
run with CSP_INFERENCE_BACKEND=worker (see chat/inference/ and docs/deployment.md).

    REDIS_URL=redis://127.0.0.1:6379/0 python manage.py inference_worker            # backend: auto
    REDIS_URL=... CSP_CHAT_DEVICE=cuda python manage.py inference_worker --backend transformers

It loads the base model and the active version before it takes the first request, follows
activations like any server process, and stops cleanly on Ctrl-C or SIGTERM (answers in flight
end as cancelled; their web processes tell their clients).
"""

import asyncio
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chat import serving
from chat.inference.worker import InferenceWorker
from llm.engine.events import EngineError


class Command(BaseCommand):
    help = "Serve chat answers to the web processes through the channel layer (CSP_INFERENCE_BACKEND=worker)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--backend", choices=("auto", "transformers", "llamacpp"), default="auto",
            help="the inference backend this worker runs (default: auto, as a single-process server chooses)",
        )
        parser.add_argument(
            "--channel", default=settings.CSP_INFERENCE_CHANNEL,
            help="the channel to take requests from (default: CSP_INFERENCE_CHANNEL, %(default)s)",
        )

    def handle(self, *args, backend, channel, **options):
        serving.serve_locally(backend)
        worker = InferenceWorker(serving.holder, channel)

        async def main():
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, worker.stop)
            await worker.serve(ready=lambda: self._say(f"inference worker {worker.name} ready on {channel!r}"))

        try:
            asyncio.run(main())
        except EngineError as error:
            raise CommandError(str(error)) from error
        finally:
            serving.reset_engine()
        self._say("inference worker stopped")

    def _say(self, text):
        self.stdout.write(text)
        self.stdout.flush()  # supervisors and tests wait for the "ready" line
