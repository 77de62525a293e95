"""The trigger → review → meta pipeline (see docs/pipeline.md).

``trigger``: prefilter and classify stored events (runs in the gateway).
``stages``: review and diagnose incidents (runs in the daemon).
``prompts``: the messages and JSON schemas sent to the layers.
"""
