"""Stage 5, dispatch: the archive and the durable outbox (``outbox``: one delivery per object
and destination, retries with backoff, jobs finished by their deliveries), one sender per
destination kind (``senders``: C-STORE with TLS, STOW-RS, Orthanc REST, folder) and storage
commitment both ways (``commitment``: the N-ACTION we send and the N-EVENT-REPORT we receive).
It may import only the core (``airouter.core``): no other stage.
"""
