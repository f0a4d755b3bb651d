"""``airouter``: run the node, send DICOM to a node, look at and act on jobs and deliveries."""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from airouter.core.phi import guard
from airouter.core.settings import ConfigError, Settings, load_settings
from airouter.core.vocab import DeliveryState, StoreStatus, status_text

TOKEN_HELP = "a bearer token (airouter tokens create; AIROUTER_TOKEN)"


def configure_logging(settings: Settings) -> None:
    """One line per record with the thread (a job's worker, an association); PHI redacted
    unless ``log_phi``."""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    for noisy in ("pynetdicom", "apscheduler", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" is by design (max_instances=1, coalesce)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    guard(settings.log_phi)


def _serve(args: argparse.Namespace) -> int:
    from airouter.app.node import Node

    settings = _settings(args)
    configure_logging(settings)
    Node(settings).serve_forever()
    return 0


def _pruned(tree: dict[str, Any]) -> dict[str, Any]:
    """Flags not given (None) removed, and sections left empty."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _pruned(value)
        if value not in (None, {}):
            out[key] = value
    return out


def _settings(args: argparse.Namespace) -> Settings:
    flags = {
        "scp": {
            "ae_title": args.ae_title,
            "dimse_port": args.dimse_port,
            "processes": args.workers,
        },
        "http": {"host": args.http_host, "port": args.http_port},
        "data_dir": args.data_dir,
        "database_url": args.database_url,
        "inference": {"triton_url": args.triton_url},
        "router": {"rules_dir": args.rules_dir},
    }
    return load_settings(args.config, **_pruned(flags))


def _files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def _send(args: argparse.Namespace) -> int:
    """C-STORE files to a node; files are sent as stored (file meta gives SOP class/instance)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    # Stream each file as stored, identified by its file meta: no decoding, no re-encoding.
    _config.STORE_SEND_CHUNKED_DATASET = True

    items = []
    for f in _files(args.paths):
        try:
            meta = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            items.append((f, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            print(f"skipped {f}: not a DICOM file ({exc})", file=sys.stderr)
    if not items:
        print("nothing to send", file=sys.stderr)
        return 1
    ae = AE(ae_title=args.calling_ae)
    pairs = sorted({(c, ts) for _, c, ts in items})
    ae.requested_contexts = [build_context(c, [ts]) for c, ts in pairs][:128]
    assoc = ae.associate(args.host, args.port, ae_title=args.called_ae)
    if not assoc.is_established:
        print(f"association with {args.called_ae}@{args.host}:{args.port} failed", file=sys.stderr)
        return 2
    failed = 0
    try:
        for f, _, _ in items:
            status = assoc.send_c_store(f)
            code = int(status.Status) if status and "Status" in status else None
            if code != StoreStatus.SUCCESS:
                failed += 1
                comment = status.get("ErrorComment", "") if status else "no response"
                print(f"{f}: status {status_text(code)} {comment}", file=sys.stderr)
    finally:
        assoc.release()
    print(f"sent {len(items) - failed} of {len(items)}")
    return 0 if failed == 0 else 3


class _Api:
    """The node's REST API as the CLI reaches it: ``--http-host``/``--http-port``, HTTPS
    with ``--https`` (verified against ``--ca-file`` or the system's CAs), the bearer token of
    ``--token`` or AIROUTER_TOKEN (needed once the node has users)."""

    def __init__(self, args: argparse.Namespace) -> None:
        scheme = "https" if args.https else "http"
        self.base = f"{scheme}://{args.http_host}:{args.http_port}/api"
        self.token: str | None = args.token
        ca = str(args.ca_file) if args.ca_file else None
        self.tls = ssl.create_default_context(cafile=ca) if args.https else None

    def _open(self, path: str, method: str, body: Any = None) -> Any:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=10, context=self.tls)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"cannot reach the node at {self.base}: {reason}") from exc

    def get(self, path: str) -> Any:
        """GET the JSON answer; :class:`ConfigError` with the node's error."""
        import urllib.error

        try:
            with self._open(path, "GET") as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"{self.base}{path}: {json.load(exc).get('error')}") from exc

    def post(self, path: str, body: Any = None) -> int:
        """POST (``body`` as JSON); print the answer, or the node's error on stderr (exit
        status 1)."""
        import urllib.error

        try:
            with self._open(path, "POST", body) as response:
                print(json.dumps(json.load(response), indent=2))
        except urllib.error.HTTPError as exc:
            print(f"airouter: {json.load(exc).get('error')}", file=sys.stderr)
            return 1
        return 0


def _jobs(args: argparse.Namespace) -> int:
    import getpass
    import urllib.parse

    api = _Api(args)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    actor = urllib.parse.quote(f"{user} (CLI)")
    if args.retry is not None:
        return api.post(f"/jobs/{args.retry}/retry?actor={actor}")
    if args.cancel is not None:
        return api.post(f"/jobs/{args.cancel}/cancel?actor={actor}")
    if args.approve is not None:
        chosen = {"structures": args.structure} if args.structure else {}
        return api.post(f"/jobs/{args.approve}/approve?actor={actor}", chosen)
    if args.reject is not None:
        if not args.reason:
            print("airouter: --reject needs --reason", file=sys.stderr)
            return 2
        return api.post(f"/jobs/{args.reject}/reject?actor={actor}", {"reason": args.reason})
    jobs: list[dict[str, Any]] = api.get("/jobs")
    for job in jobs:
        kinds = ",".join(o["kind"] for o in job["outputs"])
        print(
            f"{job['id']:>5} {job['state']:<12} {job['rule']:<24} {kinds:<18} {job['error'] or ''}"
        )
    return 0


def _deliveries(args: argparse.Namespace) -> int:
    api = _Api(args)
    if args.retry is not None:
        return api.post(f"/deliveries/{args.retry}/retry")
    query = f"?state={args.state}" if args.state else ""
    for d in api.get("/deliveries" + query):
        print(
            f"{d['id']:>6} job {d['job_id']:<5} {d['kind']:<9} {d['destination']:<12} "
            f"{d['state']:<8} attempts {d['attempts']:<3} {d['last_status'] or ''}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``airouter`` command: run the sub-command; exit status 2 for invalid settings."""
    parser = argparse.ArgumentParser(prog="airouter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node in the foreground (Ctrl-C stops it)")
    serve.add_argument("--config", type=Path, help="YAML settings file (AIROUTER_CONFIG)")
    serve.add_argument("--ae-title", help="our AE title (AIROUTER_SCP__AE_TITLE, AIROUTER)")
    serve.add_argument("--dimse-port", type=int, help="DIMSE port (AIROUTER_SCP__DIMSE_PORT)")
    serve.add_argument("--http-host", help="HTTP address (AIROUTER_HTTP__HOST, 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="HTTP port (AIROUTER_HTTP__PORT, 8080)")
    serve.add_argument("--data-dir", type=Path, help="state and spool (AIROUTER_DATA_DIR, ./var)")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the DIMSE and HTTP ports (AIROUTER_SCP__PROCESSES, one per core)",
    )
    serve.add_argument(
        "--database-url",
        help="state store, a SQLAlchemy URL: sqlite:///... (default, in the data dir) or "
        "postgresql+psycopg://user@host/db (AIROUTER_DATABASE_URL)",
    )
    serve.add_argument("--triton-url", help="'local' or host:port (AIROUTER_INFERENCE__TRITON_URL)")
    serve.add_argument(
        "--rules-dir", type=Path, help="rule files (AIROUTER_ROUTER__RULES_DIR, ./rules)"
    )
    serve.set_defaults(func=_serve)

    send = sub.add_parser("send", help="C-STORE files or folders to a DICOM node")
    send.add_argument("paths", nargs="+", type=Path)
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=11112)
    send.add_argument("--called-ae", default="AIROUTER")
    send.add_argument("--calling-ae", default="AIROUTER-SCU")
    send.set_defaults(func=_send)

    jobs = sub.add_parser(
        "jobs", help="list the node's jobs; retry a failed one, cancel one, review one"
    )
    jobs.add_argument("--retry", type=int, metavar="ID", help="run failed job ID again")
    jobs.add_argument("--cancel", type=int, metavar="ID", help="cancel queued job ID")
    jobs.add_argument("--approve", type=int, metavar="ID", help="send job ID's reviewed results")
    jobs.add_argument(
        "--structure", action="append", metavar="NAME", help="with --approve: send only these"
    )
    jobs.add_argument("--reject", type=int, metavar="ID", help="withhold job ID's results")
    jobs.add_argument("--reason", help="with --reject: why (kept with the job)")
    jobs.add_argument("--http-host", default="127.0.0.1")
    jobs.add_argument("--http-port", type=int, default=8080)
    jobs.add_argument("--token", default=os.environ.get("AIROUTER_TOKEN"), help=TOKEN_HELP)
    jobs.add_argument("--https", action="store_true", help="the node serves HTTPS")
    jobs.add_argument("--ca-file", type=Path, help="the CA of its certificate (--https)")
    jobs.set_defaults(func=_jobs)

    deliveries = sub.add_parser("deliveries", help="the outbox; retry a failed or dead delivery")
    deliveries.add_argument("--state", choices=[s.value for s in DeliveryState])
    deliveries.add_argument("--retry", type=int, metavar="ID", help="send delivery ID again")
    deliveries.add_argument("--http-host", default="127.0.0.1")
    deliveries.add_argument("--http-port", type=int, default=8080)
    deliveries.add_argument("--token", default=os.environ.get("AIROUTER_TOKEN"), help=TOKEN_HELP)
    deliveries.add_argument("--https", action="store_true", help="the node serves HTTPS")
    deliveries.add_argument("--ca-file", type=Path, help="the CA of its certificate (--https)")
    deliveries.set_defaults(func=_deliveries)

    from airouter.app.models_cli import add_parser as add_models_parser
    from airouter.app.rules_cli import add_parser as add_rules_parser
    from airouter.app.users_cli import add_parsers as add_users_parsers

    add_rules_parser(sub, Path("rules"))
    add_models_parser(sub)
    add_users_parsers(sub)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"airouter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
