"""A bare pynetdicom storage SCP that acknowledges without storing: the ceiling that
pynetdicom itself sets on this machine (for bench/ingest.py).

    python -m bench.bare_scp PORT
"""

from __future__ import annotations

import sys
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt


def _ok(_event: Any) -> int:
    return 0x0000


def main() -> None:
    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, _ok)])


if __name__ == "__main__":
    main()
