"""A dedicated inference worker: N web processes share one loaded model and its batching.

    # the worker (one per GPU/CPU host that serves; several compete for the same channel)
    REDIS_URL=redis://... manage.py inference_worker --backend auto
    # every web process
    REDIS_URL=redis://... CSP_INFERENCE_BACKEND=worker daphne csplatform.asgi:application

`protocol` holds the typed messages of the channel layer, `client` the WorkerEngine a web
process uses (made by chat.serving when CSP_INFERENCE_BACKEND=worker), `worker` the worker's
loop (run by `manage.py inference_worker`).
"""
