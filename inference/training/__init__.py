"""Building the bundled network: ct-lungs-unet, a small MONAI 3D UNet trained by
``python -m inference.training.lungnet`` on synthetic phantoms (``phantoms``, generated with
known truth). Run by developers, never by the node; it may import the rest of ``inference``
and the core, no other stage.
"""
