"""Job orchestration: one job from its claim to its outputs in the outbox.

Owns the pipeline (``pipeline``: volume, models, encoders, archive, in order), the job recorder
(``recorder``: one transaction per state transition), the job's life outside a worker
(``lifecycle``: recovery after crashes with a cap on attempts, retry, cancel), the mapping from
model cards to what the encoders take (``specs``) and the artefacts a job keeps (``artefacts``).
It may import the five stages, through their public functions, and the core; never the app.
"""
