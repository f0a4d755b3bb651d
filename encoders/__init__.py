"""Stage 4, the encoders: SEG and TID 1500 SR (highdicom), RTSTRUCT (pydicom), each valid per
dciodvfy. One entry point, ``outputs.encode_outputs``, builds the output set a job asks for
from typed segment specs and one record per structure; the builders (``seg``, ``sr``,
``rtstruct``) take keyword-only arguments and required provenance. It knows nothing of model
cards. It may import only the core (``airouter.core``): no other stage.
"""
