"""airouter: a DICOM-native AI router.

Two layers live here, around the five stages (``scp``, ``router``, ``inference``,
``encoders``, ``dispatch``, each its own top-level package): ``airouter.core`` below them (the
state store, vocabularies, settings, spool, tag extraction, PHI guard) and ``airouter.jobs``
and ``airouter.app`` above them. An import only points down: app > jobs > stages > core, and no
stage imports another (import-linter checks it in ``make test``).
"""
