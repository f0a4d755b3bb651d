"""Stage 3, inference: model cards (``cards``), the series as a volume (``volume``), one model
run with MONAI pre/post-processing (``runner``), the Triton client and the local tritonserver
(``triton``), MONAI bundle import (``bundles``). Two sub-packages: ``serving`` runs inside
tritonserver (it imports nothing of the project outside ``inference``: the NGC image holds
only this folder), ``training`` builds the bundled network and its synthetic phantoms. It may
import only the core (``airouter.core``): no other stage.
"""
