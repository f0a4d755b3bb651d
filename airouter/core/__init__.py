"""The core: what every stage shares and nothing else.

Owns the state store (``db``: tables and the session factory), the vocabularies (``vocab``:
every enum and DICOM status), the settings tree (``settings``: one sub-model per stage), the
spool (``spool``: durable writes, UID-checked paths), tag extraction (``tags``), the
association tracker (``tracker``) and the PHI guard (``phi``). It may import only third-party
packages: no stage, no job, no application code.
"""
