"""Code that runs inside tritonserver's Python backend: the adapter for classic
``(hu, affine) -> labels`` models (``python_model``) and the TorchScript model runner
(``torchscript``). It may import only ``inference.algorithms`` and third-party packages: the
Triton container holds nothing else of the project.
"""
