"""Stage 2, the router: when a study is complete (``completion``), the rules as data
(``rules``: YAML validated into typed models; ``registry``: reloaded on edit), their pure
evaluation (``engine``), and the queue of prioritised jobs (``queue``, ``schedule`` for the
off-hours window). It may import only the core (``airouter.core``): no other stage.
"""
