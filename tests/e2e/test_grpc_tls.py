"""Worker gRPC over TLS, end to end: a CA and a worker certificate generated here, a cluster
configured with them (router -> decode, decode -> prefill, prefill -> decode lease renewals all
over TLS), the openai client served through it; a client without the CA (plain text, or trusting
another CA) is refused before any call, so it never sends the token."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.decode_client import DecodeClient, DecodeRequestError
from protocol.grpc_auth import GrpcTls
from protocol.prefill_client import PrefillClient
from splitserve.serve import LocalCluster
from tests.e2e.harness import MODEL, client, make_config, running_cluster, wait_pools_full

pytestmark = pytest.mark.slow

LONG = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(folder: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(_name("worker")).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "worker.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "worker.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    _leaf(folder, *_ca(folder, "cluster-ca"))
    _ca(folder, "other-ca")
    return folder


@pytest.fixture(scope="module")
def cluster(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tls = {"cert_file": str(certs / "worker.pem"), "key_file": str(certs / "worker.key"),
           "ca_file": str(certs / "cluster-ca.pem")}
    with running_cluster(make_config(None, tls=tls), tmp_path_factory.mktemp("logs")) as c:
        yield c


def test_requests_are_served_over_tls(cluster: LocalCluster) -> None:
    api = client(cluster)
    chat = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
        temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content
    before = _prefill_computed(cluster)
    long = api.completions.create(model=MODEL, prompt=LONG, max_tokens=4, temperature=0)  # disaggregated
    assert long.choices[0].text and _prefill_computed(cluster) > before
    wait_pools_full(cluster)


def test_a_client_without_the_ca_is_refused(cluster: LocalCluster, certs: Path) -> None:
    decode = cluster.pool("decode")[0]
    plain = DecodeClient(decode.address, cluster.token)
    other = DecodeClient(decode.address, cluster.token, GrpcTls(str(certs / "other-ca.pem")))
    right = DecodeClient(decode.address, cluster.token, GrpcTls(str(certs / "cluster-ca.pem")))
    try:
        for wrong in (plain, other):
            with pytest.raises(DecodeRequestError) as e:
                wrong.status(timeout=5)
            assert e.value.code == "UNAVAILABLE"
        assert right.status(timeout=30).worker_id == decode.worker_id
    finally:
        for c in (plain, other, right):
            c.close()


def _prefill_computed(cluster: LocalCluster) -> int:
    prefill = cluster.pool("prefill")[0]
    with PrefillClient(prefill.address, cluster.token, GrpcTls(cluster.config.tls.ca_file)) as c:
        return c.status().prompt_tokens_computed
