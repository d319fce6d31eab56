"""Run the whole platform in the foreground: the ASGI server (daphne) and the django-q2 cluster.

    python manage.py serve            # http://127.0.0.1:8000 (CSP_HOST / CSP_PORT)

With CSP_INFERENCE_BACKEND=worker it also starts the inference worker. Ctrl-C (or SIGTERM)
stops them all. If one exits on its own, the others are stopped too and the command exits
non-zero, so a supervisor sees the failure. For several machines, run
`daphne` and `manage.py qcluster` separately instead (docs/deployment.md).
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connections

from chat.answering import answers_close_interrupted
from knowledge.retrieval import serving_index
from training.services import training_runs_reconcile

logger = logging.getLogger(__name__)

# How long Ctrl-C waits for a clean stop before killing; a training step killed mid-way is
# marked failed by the reconciler and can be resumed from its last checkpoint.
STOP_GRACE_SECONDS = 10

# What each child's process group gets on stop (others: SIGTERM). The q2 cluster gets SIGINT: its
# parent stops the sentinel, which (ignoring SIGINT, as its pusher, monitor and workers do) stops
# them in order, 3 s when idle; a training worker notes SIGINT like SIGTERM and ends its run
# interrupted at a checkpoint (training.tasks.Termination). A SIGTERM to the group killed the
# sentinel at once (q2 leaves it the default action) and the parent then waited for good on an
# Event the dead sentinel would have acknowledged: every Ctrl-C ran out the grace.
STOP_SIGNALS = {"qcluster": signal.SIGINT}


def daphne_ping_args():
    """daphne's keepalive options from the settings: idle sockets are pinged, silent ones dropped."""
    return ["--ping-interval", str(settings.CSP_WS_PING_INTERVAL), "--ping-timeout", str(settings.CSP_WS_PING_TIMEOUT)]


class Command(BaseCommand):
    help = "Start daphne (web, API, websockets) and the django-q2 cluster (training) together."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.CSP_HOST)
        parser.add_argument("--port", type=int, default=settings.CSP_PORT)

    def _warm_index(self):
        started = time.monotonic()
        try:
            index = serving_index()
        except Exception:  # the first question builds it again, and reports what failed
            logger.exception("the knowledge index could not be built at start-up")
            return
        finally:
            connections.close_all()
        self.stdout.write(f"Knowledge index ready: {len(index)} approved pairs ({time.monotonic() - started:.1f} s).")

    def handle(self, *args, host, port, **options):
        python = sys.executable
        # Each child leads its own process group, so stopping it also stops the workers it forked.
        children = {
            "daphne": subprocess.Popen(
                [python, "-m", "daphne", "-b", host, "-p", str(port), *daphne_ping_args(), "csplatform.asgi:application"],
                start_new_session=True,
            ),
            "qcluster": subprocess.Popen([python, "manage.py", "qcluster"], start_new_session=True),
        }
        if settings.CSP_INFERENCE_BACKEND == "worker":  # daphne keeps no model: its inference worker does
            children["inference_worker"] = subprocess.Popen([python, "manage.py", "inference_worker"], start_new_session=True)
        if settings.CSP_GROUNDING:
            # Embed the approved pairs now (into the database's cache, which every process reads)
            # rather than on the first customer's message: about half a second a pair on 2 cores.
            threading.Thread(target=self._warm_index, name="warm-index", daemon=True).start()
        reconciled = training_runs_reconcile()
        if reconciled:
            self.stdout.write(self.style.WARNING(f"{reconciled} training run(s) whose worker had died were marked failed."))
        # Only answers unsaved for longer than any live process keeps one open: another daphne on
        # this database may be streaming the younger ones (the schedule closes them in a minute).
        closed = answers_close_interrupted()
        if closed:
            self.stdout.write(self.style.WARNING(f"{closed} answer(s) cut off by a stopped web process were closed as interrupted."))
        base = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
        self.stdout.write(self.style.SUCCESS(
            f"\ncsplatform is starting:\n"
            f"  chat    {base}/\n"
            f"  admin   {base}/admin/\n"
            f"  API     {base}/api/v1/   (docs: {base}/api/docs/)\n"
            f"Press Ctrl-C to stop.\n"
        ))
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        exited = None
        while not stopping and exited is None:
            time.sleep(0.5)
            exited = next((name for name, proc in children.items() if proc.poll() is not None), None)
        for name, proc in children.items():
            self._signal_group(proc, STOP_SIGNALS.get(name, signal.SIGTERM))
        for name, proc in children.items():
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop within {STOP_GRACE_SECONDS} s; killing it.")
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
        if exited and not stopping:
            self.stderr.write(self.style.ERROR(f"{exited} exited with code {children[exited].returncode}; stopped the rest."))
            sys.exit(1)
        self.stdout.write("Stopped.")

    @staticmethod
    def _signal_group(proc, signum):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
