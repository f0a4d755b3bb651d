"""Stage 1, the receivers: DIMSE C-ECHO / C-STORE (``server``, pynetdicom) and DICOMweb
STOW-RS (``stow``), both through one ingest (``ingest``) that makes an instance durable and
indexed before the sender hears "success". Services of other stages on the same AE (storage
commitment reports) are bound by the composition root as ``ExtraService`` entries. It may
import only the core (``airouter.core``): no other stage.
"""
