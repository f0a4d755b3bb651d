"""The revisions, oldest first: ``r0001_...``, ``r0002_...``."""
