"""ct-lungs-unet: the bundled network model (a small MONAI 3D UNet), trained by ``train.py``."""
