"""Moved to the package chat.inference (protocol, client, worker). Kept only for
training/admin.py's `from chat.inference_worker import workers` until it imports the inference
workers' status from chat.serving.engine_status() (training must not import chat)."""

from chat.inference.client import WORKERS_KEY, WorkerEngine, workers
from chat.inference.worker import InferenceWorker

__all__ = ["WORKERS_KEY", "InferenceWorker", "WorkerEngine", "workers"]
