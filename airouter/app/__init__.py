"""The application: the node (``node``, the composition root that builds each stage from its
settings sub-tree and runs them together), the HTTP API (``web``: DICOMweb and REST routers)
and the command line (``cli``, ``models_cli``, ``rules_cli``). It may import everything below
it: the jobs layer, the five stages and the core. Nothing imports it.
"""
