"""Transport security: a stack whose services hold certificates from a CA the test makes itself. The public
gateway serves TLS to any client that trusts the CA; the services behind it take only callers with a
certificate from that CA (mutual TLS); plaintext is refused everywhere."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.rpc import balancer_pb2, balancer_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.tls import Tls, TlsError
from tests.helpers import cluster, start_stack


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA and two leaf certificates it signed (one for the services, one for a client), plus an outsider's."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("tandem test CA")).issuer_name(_name("tandem test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(issuer.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(issuer_key, hashes.SHA256()))
        paths[f"{name}_cert"] = folder / f"{name}.pem"
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"].write_bytes(_pem_key(key))

    leaf("service", ca, ca_key)
    leaf("client", ca, ca_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = (x509.CertificateBuilder().subject_name(_name("other CA")).issuer_name(_name("other CA"))
             .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(other_key, hashes.SHA256()))
    leaf("outsider", other, other_key)
    return paths


# ----- settings to credentials ---------------------------------------------------------------------------
def test_no_settings_means_plaintext():
    assert Tls.from_paths() is None


@pytest.mark.parametrize("kwargs,problem", [
    (dict(cert="service_cert"), "tls_cert and tls_key go together"),
    (dict(key="service_key"), "tls_cert and tls_key go together"),
    (dict(cert="service_cert", key="service_key", ca="missing"), "tls_ca: cannot read"),
    (dict(cert="not_pem", key="service_key"), "tls_cert:"),
])
def test_bad_tls_settings_are_named(tmp_path, kwargs, problem):
    paths = make_pki(tmp_path)
    (tmp_path / "junk.txt").write_text("not a certificate")
    files = {"missing": str(tmp_path / "nope.pem"), "not_pem": str(tmp_path / "junk.txt")}
    with pytest.raises(TlsError, match=problem):
        Tls.from_paths(**{k: files.get(v) or str(paths[v]) for k, v in kwargs.items()})


def test_client_auth_needs_a_ca(tmp_path):
    paths = make_pki(tmp_path)
    public = Tls.from_paths(str(paths["service_cert"]), str(paths["service_key"]))
    assert not public.mutual and public.channel_credentials() is None and public.server_credentials() is not None
    internal = Tls.from_paths(str(paths["service_cert"]), str(paths["service_key"]), str(paths["ca"]))
    assert internal.mutual and internal.channel_credentials() is not None


# ----- a live stack under TLS ----------------------------------------------------------------------------
@pytest.mark.slow
def test_stack_under_mutual_tls(tmp_path):
    paths = make_pki(tmp_path)
    env = {"TANDEM_TLS_CERT": str(paths["service_cert"]), "TANDEM_TLS_KEY": str(paths["service_key"]),
           "TANDEM_TLS_CA": str(paths["ca"])}
    stack = start_stack(cluster("A100-80G", "A10"), tmp_path / "logs", env=env)
    try:
        ca = paths["ca"].read_bytes()
        trusting = grpc.ssl_channel_credentials(root_certificates=ca)
        request = gateway_pb2.GenerateRequest(prompt="hello over TLS", max_tokens=4)

        # the public gateway: TLS for a client that trusts the CA, no client certificate needed
        with grpc.secure_channel(stack.gateway_address, trusting) as channel:
            replies = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=30))
        assert replies[-1].finish_reason and replies[-1].metrics.completion_tokens > 0

        # plaintext to the gateway fails
        with grpc.insecure_channel(stack.gateway_address) as channel, pytest.raises(grpc.RpcError) as info:
            list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        def list_workers(credentials: grpc.ChannelCredentials) -> int:
            with grpc.secure_channel(stack.balancer_address, credentials) as channel:
                return len(balancer_pb2_grpc.BalancerStub(channel).ListWorkers(
                    balancer_pb2.ListWorkersRequest(), timeout=5).workers)

        # an internal service: a certificate from the CA is required
        with_cert = grpc.ssl_channel_credentials(ca, paths["client_key"].read_bytes(),
                                                 paths["client_cert"].read_bytes())
        assert list_workers(with_cert) == 2
        outsider = grpc.ssl_channel_credentials(ca, paths["outsider_key"].read_bytes(),
                                                paths["outsider_cert"].read_bytes())
        for credentials in (trusting, outsider):
            with pytest.raises(grpc.RpcError) as info:
                list_workers(credentials)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(stack.balancer_address) as channel, pytest.raises(grpc.RpcError):
            balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=5)
    finally:
        stack.stop()


def test_a_service_with_an_unreadable_certificate_says_so(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "profiler", "--port", "0",
                          "--db-path", str(tmp_path / "p.sqlite"), "--tls-cert", str(tmp_path / "none.pem"),
                          "--tls-key", str(tmp_path / "none.key")], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "tls_cert: cannot read" in out.stderr
