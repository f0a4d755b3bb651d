"""Who may do what: users, roles, tokens, sessions and CSRF on the HTTP server; the refusal
to serve HTTP beyond loopback with no user; DICOM TLS and HTTPS on the ways in.

The HTTP rules are tested on the node's own application over a real state store (the gate is
middleware: what TestClient sees is what a socket sees); the start refusal, the CLI and TLS
with the node as a process, DCMTK's storescu as the modality."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from airouter.app import accounts
from airouter.app.web import create_app
from airouter.app.web.auth import LOGIN_CSRF_COOKIE, AuthPolicy
from airouter.core.db import Event, Job, Store
from airouter.core.vocab import JobState, Role
from tests.peers import (
    ROOT,
    free_port,
    fresh_copy,
    head_ct_files,
    http_json,
    start_node,
    stop_process,
    storescu,
    wait_for,
)
from tests.pki import issue, make_ca

PASSWORD = "a long enough password"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'state.db'}")


def _app(store: Store, open_when_no_users: bool = False, **policy: float) -> TestClient:
    health = {"status": "ok", "triton_ready": False, "models_ready": {}}
    app = create_app(
        store,
        lambda: health,
        policy=AuthPolicy(open_when_no_users=open_when_no_users, **policy),
        hosts=frozenset({"testserver", "localhost", "127.0.0.1"}),
    )
    return TestClient(app)


def _failed_job(store: Store) -> int:
    with store.session() as s:
        job = Job(
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            rule="r",
            models=["m"],
            outputs=["SEG"],
            destinations=[],
            state=JobState.FAILED,
            error="boom",
        )
        s.add(job)
        s.flush()
        return job.id


def _sign_in(client: TestClient, name: str, password: str) -> str:
    """Log in through the form; returns the page's CSRF token."""
    client.get("/login")
    csrf = client.cookies.get(LOGIN_CSRF_COOKIE)
    assert csrf
    answer = client.post(
        "/login",
        content=f"username={name}&password={password.replace(' ', '+')}&csrf={csrf}",
        headers={"content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard"
    page = client.get("/dashboard/jobs")
    assert page.status_code == 200
    match = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert match, "the page carries the session's CSRF token"
    return match.group(1)


def test_open_with_no_user_on_loopback_and_401_once_users_exist(store: Store) -> None:
    """No user, loopback: as before users existed. Once one exists, every route but login and
    health wants credentials: JSON 401 with a Basic challenge, a browser is sent to login."""
    client = _app(store, open_when_no_users=True)
    assert client.get("/api/jobs").status_code == 200
    assert client.get("/dashboard").status_code == 200
    accounts.add_user(store, "alice", Role.ADMIN, PASSWORD)
    for path in (
        "/api/jobs",
        "/api/deliveries",
        "/api/events",
        "/dicomweb/studies",
        "/dashboard/jobs",
    ):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert answer.json()["status"] == 401
        assert answer.headers["www-authenticate"].startswith("Basic")
    assert client.post("/api/jobs/1/retry").status_code == 401
    page = client.get("/dashboard/jobs", headers={"accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/dashboard/jobs"
    assert client.get("/api/health").status_code == 200  # load balancers, health checks
    assert client.get("/login").status_code == 200
    assert client.get("/api/jobs", auth=("alice", PASSWORD)).status_code == 200
    assert client.get("/api/jobs", auth=("alice", "not the password")).status_code == 401
    assert client.get("/api/jobs", auth=("nobody", PASSWORD)).status_code == 401


def test_a_server_off_loopback_with_its_last_user_gone_is_closed(store: Store) -> None:
    """The node refuses to start so; a server whose users were all removed while it ran
    answers 401, never open."""
    client = _app(store, open_when_no_users=False)
    answer = client.get("/api/jobs")
    assert answer.status_code == 401 and "airouter users add" in answer.json()["error"]
    assert client.get("/api/health").status_code == 200


def test_roles_tokens_and_the_audit_of_every_action(store: Store) -> None:
    """viewer reads, gets 403 for an action; operator acts, by token; a revoked token stops
    at once; each state-changing request is in the audit trail with its user."""
    accounts.add_user(store, "vera", Role.VIEWER, PASSWORD)
    accounts.add_user(store, "otto", Role.OPERATOR, PASSWORD)
    job_id = _failed_job(store)
    client = _app(store)
    assert client.get(f"/api/jobs/{job_id}", auth=("vera", PASSWORD)).status_code == 200
    refused = client.post(f"/api/jobs/{job_id}/retry", auth=("vera", PASSWORD))
    assert refused.status_code == 403 and "operator" in refused.json()["error"]
    token_id, token = accounts.create_token(store, "otto", "ci")
    bearer = {"Authorization": f"Bearer {token}"}
    retried = client.post(f"/api/jobs/{job_id}/retry", headers=bearer)
    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "queued"
    accounts.revoke_token(store, token_id)
    gone = client.get("/api/jobs", headers=bearer)
    assert gone.status_code == 401 and "revoked" in gone.json()["error"]
    with store.session() as s:
        events = s.scalars(select(Event).order_by(Event.id)).all()
        requests = [(e.actor, e.detail) for e in events if e.kind == "http_request"]
        retry_event = [e for e in events if e.kind == "job_retried"]
    assert ("otto", f"POST /api/jobs/{job_id}/retry -> 200") in requests
    assert ("vera", f"POST /api/jobs/{job_id}/retry -> 403") in requests
    assert retry_event and "otto" in retry_event[0].detail
    users = {name: role for name, role, _ in accounts.list_users(store)}
    assert users == {"otto": Role.OPERATOR, "vera": Role.VIEWER}


def test_sessions_want_their_csrf_token_and_cross_origin_posts_are_refused(store: Store) -> None:
    """A dashboard session's POST without the session's token (what a forged form sends) is
    refused; with it, it goes through; another origin is refused whatever it carries; a
    login form without its own token is refused."""
    accounts.add_user(store, "otto", Role.OPERATOR, PASSWORD)
    job_id = _failed_job(store)
    client = _app(store)
    forged = client.post(
        "/login",
        content=f"username=otto&password={PASSWORD.replace(' ', '+')}&csrf=guess",
        headers={"content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    csrf = _sign_in(client, "otto", PASSWORD)
    without = client.post(f"/api/jobs/{job_id}/retry")
    assert without.status_code == 403 and "CSRF" in without.json()["error"]
    wrong = client.post(f"/api/jobs/{job_id}/retry", headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    other_site = client.post(
        f"/api/jobs/{job_id}/retry",
        headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    )
    assert other_site.status_code == 403
    done = client.post(f"/api/jobs/{job_id}/retry", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200, done.text
    # signing out ends the session at the server: the cookie opens nothing any more
    cookie = client.cookies.get("airouter_session")
    client.post("/logout", content=f"csrf={csrf}", follow_redirects=False)
    client.cookies.set("airouter_session", cookie or "")
    assert client.get("/api/jobs").status_code == 401


def test_failed_logins_are_rate_limited_and_audited(store: Store) -> None:
    """After login_max_failures wrong passwords in the window, even the right one gets 429
    until the window has passed; each failure is in the audit trail."""
    accounts.add_user(store, "alice", Role.ADMIN, PASSWORD)
    client = _app(store, login_max_failures=3, login_window_s=60)
    for _ in range(3):
        assert client.get("/api/jobs", auth=("alice", "guess")).status_code == 401
    locked = client.get("/api/jobs", auth=("alice", PASSWORD))
    assert locked.status_code == 429 and "too many failed logins" in locked.json()["error"]
    with store.session() as s:
        kinds = [(e.kind, e.actor) for e in s.scalars(select(Event).order_by(Event.id))]
    assert kinds.count(("login_failed", "alice")) == 3
    assert ("login_refused", "alice") in kinds
    # the form says so too, without telling which of name or password was wrong
    client.get("/login")
    csrf = client.cookies.get(LOGIN_CSRF_COOKIE)
    answer = client.post(
        "/login",
        content=f"username=alice&password=x&csrf={csrf}",
        headers={"content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and "too+many" in answer.headers["location"].replace(
        "%20", "+"
    )


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airouter.app.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_the_node_refuses_open_http_off_loopback_then_serves_its_users(tmp_path: Path) -> None:
    """``http.host: 0.0.0.0`` with no user: the node does not start and says what to do.
    With a user made by ``airouter users add``, it starts; anonymous requests get 401, the
    CLI works with a token, and ``airouter tokens revoke`` stops that token at once."""
    config = tmp_path / "node" / "airouter.yaml"
    config.parent.mkdir(parents=True)
    data = tmp_path / "node" / "var"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(data),
                "http": {"host": "0.0.0.0", "port": free_port()},
                "scp": {"dimse_port": free_port(), "processes": 1},
                "inference": {"models_dir": str(ROOT / "config" / "models")},
                "router": {"rules_dir": str(ROOT / "rules")},
            }
        )
    )
    refused = subprocess.run(
        [sys.executable, "-m", "airouter.app.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "no user to sign in" in refused.stderr and "airouter users add" in refused.stderr

    added = _cli("users", "add", "ops", "--role", "operator", "--data-dir", str(data),
                 "--password-stdin", stdin=PASSWORD + "\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    short = _cli("users", "add", "x", "--role", "viewer", "--data-dir", str(data), stdin="short\n")
    assert short.returncode == 1 and "at least" in short.stderr
    made = _cli("tokens", "create", "ops", "--label", "cli", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("air_")
    listed = _cli("users", "list", "--data-dir", str(data))
    assert "ops" in listed.stdout and "operator" in listed.stdout
    changed = _cli("users", "password", "ops", "--data-dir", str(data), "--password-stdin",
                   stdin="a new and longer password\n")  # fmt: skip
    assert changed.returncode == 0, changed.stderr
    store = Store(f"sqlite:///{data / 'airouter.db'}")
    assert accounts.Passwords(store).check("ops", "a new and longer password") is not None
    assert accounts.Passwords(store).check("ops", PASSWORD) is None

    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        token=token,
        http={"host": "0.0.0.0"},
    )
    try:
        assert http_json(f"{node.url}/api/jobs") is None  # 401: urllib raises, None here
        assert node.get("/api/jobs") == []
        port = str(node.http_port)
        jobs = _cli("jobs", "--http-port", port, "--token", token)
        assert jobs.returncode == 0, jobs.stderr
        anonymous = _cli("jobs", "--http-port", port)
        assert anonymous.returncode == 2 and "sign in" in anonymous.stderr
        token_id = _cli("tokens", "list", "--data-dir", str(data)).stdout.split()[0]
        assert _cli("tokens", "revoke", token_id, "--data-dir", str(data)).returncode == 0
        after = _cli("jobs", "--http-port", port, "--token", token)
        assert after.returncode == 2 and "revoked" in after.stderr
    finally:
        stop_process(node.process)
    assert "Traceback" not in node.log_text()


def _same_certificate(port: int, cert: Path) -> bool:
    served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
    return served == ssl.PEM_cert_to_DER_cert(cert.read_text())


def test_dicom_tls_with_client_certificates_and_https(tmp_path: Path) -> None:
    """storescu +tls with a certificate of the configured CA stores over DICOM TLS (whichever
    of the node's two processes takes the association); one with
    a certificate of another CA is refused at the handshake and nothing of it is stored;
    HTTPS serves QIDO-RS with the configured certificate."""
    pki = tmp_path / "pki"
    ca, other_ca = make_ca(pki, "site-ca"), make_ca(pki, "other-ca")
    server, client = issue(ca, pki, "airouter"), issue(ca, pki, "modality")
    stranger = issue(other_ca, pki, "stranger")
    tls_port = free_port()
    (tmp_path / "no-rules").mkdir()
    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        ca_file=ca.cert,
        scp={
            "processes": 2,  # both serve the TLS port, as they do the plain one
            "tls": {
                "port": tls_port,
                "cert_file": str(server.cert),
                "key_file": str(server.key),
                "ca_file": str(ca.cert),
            },
        },
        http={"cert_file": str(server.cert), "key_file": str(server.key)},
        router={"rules_dir": str(tmp_path / "no-rules")},
    )
    try:
        assert node.get("/api/health")["dimse_tls_port"] == tls_port
        trusted = fresh_copy(head_ct_files(), tmp_path / "trusted", count=5)
        # a client that connects and never begins its handshake holds no one else back
        silent = socket.create_connection(("127.0.0.1", tls_port))
        sent = storescu(tls_port, trusted, "AIROUTER",
                        "+tls", str(client.key), str(client.cert), "+cf", str(ca.cert))  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        silent.close()
        study = str(_study_uid(trusted[0]))
        found = wait_for(
            lambda: node.get(f"/dicomweb/studies?StudyInstanceUID={study}"),
            30,
            "the study over HTTPS",
        )
        assert found[0]["00201208"]["Value"] == [5]
        untrusted = fresh_copy(head_ct_files(), tmp_path / "untrusted", count=2)
        refused = storescu(
            tls_port, untrusted, "AIROUTER",
            "+tls", str(stranger.key), str(stranger.cert), "+cf", str(ca.cert),
        )  # fmt: skip
        assert refused.returncode != 0
        plain = storescu(tls_port, untrusted, "AIROUTER")  # clear text on the TLS port
        assert plain.returncode != 0
        other = str(_study_uid(untrusted[0]))
        assert node.get(f"/dicomweb/studies?StudyInstanceUID={other}") == []
        assert _same_certificate(node.http_port, server.cert)
        port = str(node.http_port)
        listed = _cli("deliveries", "--http-port", port, "--https", "--ca-file", str(ca.cert))
        assert listed.returncode == 0, listed.stderr
        unverified = _cli("deliveries", "--http-port", port, "--https")  # the system's CAs
        assert unverified.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
        assert "Traceback" not in unverified.stderr
        with (
            pytest.raises(ssl.SSLCertVerificationError),  # not trusted without the site's CA
            socket.create_connection(("127.0.0.1", node.http_port)) as raw,
        ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    finally:
        stop_process(node.process)
    log = node.log_text()
    assert log.count("DIMSE (TLS) listening on") == 2  # the node and its worker process
    assert "DICOM TLS connection from 127.0.0.1 refused" in log
    assert "Traceback" not in log


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_basic_credentials_are_checked_once_a_minute_not_per_request(store: Store) -> None:
    """A PACS that sends basic credentials with every request pays argon2 once: the second
    check is served from memory, and a changed password is never taken from it."""
    accounts.add_user(store, "pacs", Role.VIEWER, PASSWORD)
    passwords = accounts.Passwords(store)
    assert passwords.check("pacs", PASSWORD) is not None
    assert passwords.check("pacs", "wrong") is None
    assert len(passwords._verified) == 1
    accounts.remove_user(store, "pacs")
    assert passwords.check("pacs", PASSWORD) is None  # the user is looked up each time


def test_the_first_start_creates_the_bootstrap_admin_and_never_again(tmp_path: Path) -> None:
    """A container listening on all addresses starts with the admin its secret names; a
    later start with another password changes nothing; a missing secret stops the start."""
    from airouter.app.shared import refuse_open_http
    from airouter.core.settings import ConfigError, Settings

    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    secret = tmp_path / "admin-password"
    secret.write_text(PASSWORD + "\n")
    http = {"host": "0.0.0.0", "bootstrap_admin": "admin", "bootstrap_password_file": str(secret)}
    refuse_open_http(Settings(http=http), store)
    assert accounts.Passwords(store).check("admin", PASSWORD) is not None
    secret.write_text("another password entirely")
    refuse_open_http(Settings(http=http), store)
    assert accounts.Passwords(store).check("admin", PASSWORD) is not None
    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    missing = {**http, "bootstrap_password_file": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match="cannot create the admin"):
        refuse_open_http(Settings(http=missing), empty)
    with pytest.raises(ConfigError, match="no user to sign in"):
        refuse_open_http(Settings(http={"host": "0.0.0.0"}), empty)


def test_admins_manage_users_and_tokens_over_http(store: Store) -> None:
    """Only an admin reaches /api/users and /api/tokens; a user added there signs in; a token
    made there works until revoked there; the last admin cannot be removed."""
    accounts.add_user(store, "ada", Role.ADMIN, PASSWORD)
    accounts.add_user(store, "otto", Role.OPERATOR, PASSWORD)
    client = _app(store)
    admin = ("ada", PASSWORD)
    assert client.get("/api/users", auth=("otto", PASSWORD)).status_code == 403
    assert client.post("/api/users/otto/tokens", auth=("otto", PASSWORD)).status_code == 403
    added = client.post(
        "/api/users", json={"name": "vera", "role": "viewer", "password": PASSWORD}, auth=admin
    )
    assert added.status_code == 201, added.text
    assert client.get("/api/jobs", auth=("vera", PASSWORD)).status_code == 200
    again = client.post(
        "/api/users", json={"name": "VERA", "role": "viewer", "password": PASSWORD}, auth=admin
    )
    assert again.status_code == 409
    bad_role = client.post(
        "/api/users", json={"name": "x", "role": "root", "password": PASSWORD}, auth=admin
    )
    assert bad_role.status_code == 400 and "role" in bad_role.json()["error"]
    made = client.post("/api/users/vera/tokens", json={"label": "viewer app"}, auth=admin)
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    token = made.json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/jobs", headers=bearer).status_code == 200
    listed = client.get("/api/tokens", auth=admin).json()
    assert [t["label"] for t in listed] == ["viewer app"] and "token" not in listed[0]
    revoked = client.post(f"/api/tokens/{made.json()['id']}/revoke", auth=admin)
    assert revoked.status_code == 200
    assert client.get("/api/jobs", headers=bearer).status_code == 401
    last = client.delete("/api/users/ada", auth=admin)
    assert last.status_code == 409 and "last admin" in last.json()["error"]
    assert client.delete("/api/users/vera", auth=admin).status_code == 200
    assert client.get("/api/jobs", auth=("vera", PASSWORD)).status_code == 401
    users = {u["name"] for u in client.get("/api/users", auth=admin).json()}
    assert users == {"ada", "otto"}


def test_a_sender_inventing_ae_titles_cannot_grow_the_metrics() -> None:
    """Past MAX_CALLING_AE_LABELS titles, new ones count as (other)."""
    from airouter.core import metrics

    seen = {metrics.calling_ae_label(f"AE{n}") for n in range(metrics.MAX_CALLING_AE_LABELS * 2)}
    assert len(seen) <= metrics.MAX_CALLING_AE_LABELS + 1
    assert metrics.OTHER_AE in seen
    assert metrics.calling_ae_label("AE0") in ("AE0", metrics.OTHER_AE)  # stable once seen


def test_hostile_login_and_user_forms_get_a_clear_answer(store: Store) -> None:
    """An oversized form is refused with 413 unread; bytes that are not UTF-8, a missing
    field, a non-JSON body and a next= pointing elsewhere get an answer, never a crash."""
    accounts.add_user(store, "ada", Role.ADMIN, PASSWORD)
    client = _app(store)
    client.get("/login")
    csrf = client.cookies.get(LOGIN_CSRF_COOKIE)
    form = {"content-type": "application/x-www-form-urlencoded"}
    huge = client.post("/login", content=b"username=" + b"a" * 100_000, headers=form)
    assert huge.status_code == 413 and huge.json()["status"] == 413
    garbled = client.post(
        "/login", content=b"username=\xff\xfe&password=\x80&csrf=" + csrf.encode(), headers=form,
        follow_redirects=False,
    )  # fmt: skip
    assert garbled.status_code == 303 and "error=" in garbled.headers["location"]
    elsewhere = client.post(
        "/login",
        content=f"username=ada&password={PASSWORD.replace(' ', '+')}&csrf={csrf}"
        "&next=//evil.example/x",
        headers=form,
        follow_redirects=False,
    )
    assert elsewhere.status_code == 303 and elsewhere.headers["location"] == "/dashboard"
    admin = ("ada", PASSWORD)
    not_json = client.post(
        "/api/users", content=b"{not json", headers={"content-type": "application/json"}, auth=admin
    )
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]
    listed = client.post("/api/users", json=["a", "list"], auth=admin)
    assert listed.status_code == 400
    empty = client.post("/api/users", json={}, auth=admin)
    assert empty.status_code == 400
    client.cookies.clear()  # signed out: only the header speaks
    garbage_basic = client.get("/api/jobs", headers={"Authorization": "Basic %%%"})
    assert garbage_basic.status_code == 401
    unknown_scheme = client.get("/api/jobs", headers={"Authorization": "Negotiate abc"})
    assert unknown_scheme.status_code == 401


def test_the_dimse_port_itself_may_speak_tls(tmp_path: Path) -> None:
    """``scp.tls.same_port``: the DIMSE port takes DICOM TLS only; clear text is refused
    there, and no second port opens."""
    pki = tmp_path / "pki"
    ca = make_ca(pki, "site-ca")
    server, client = issue(ca, pki, "airouter"), issue(ca, pki, "modality")
    (tmp_path / "no-rules").mkdir()
    tls = {"same_port": True, "cert_file": str(server.cert), "key_file": str(server.key)}
    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        scp={"tls": {**tls, "ca_file": str(ca.cert)}},
        router={"rules_dir": str(tmp_path / "no-rules")},
    )
    try:
        assert node.get("/api/health")["dimse_tls_port"] == node.dimse_port
        files = fresh_copy(head_ct_files(), tmp_path / "ct", count=3)
        plain = storescu(node.dimse_port, files)
        assert plain.returncode != 0  # clear text: the handshake fails, nothing stored
        study = _study_uid(files[0])
        assert node.get(f"/dicomweb/studies?StudyInstanceUID={study}") == []
        sent = storescu(
            node.dimse_port, files, "AIROUTER",
            "+tls", str(client.key), str(client.cert), "+cf", str(ca.cert),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        found = wait_for(
            lambda: node.get(f"/dicomweb/studies?StudyInstanceUID={study}"), 30, "the study"
        )
        assert found[0]["00201208"]["Value"] == [3]
    finally:
        stop_process(node.process)
    log = node.log_text()
    assert log.count("DIMSE (TLS) listening on") == 1 and "DIMSE listening on" not in log
    assert "Traceback" not in log
