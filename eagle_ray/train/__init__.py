"""Ray Train wiring: the pool feeds supervision refs to draft workers (feed.py); the worker loop (loop.py);
the driver entry point (trainer.py)."""
