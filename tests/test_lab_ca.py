"""The emulated root's CA bundle is refreshed from the host's at every use that reaches a
registry, and a pip failure inside the root says why (issue 16, item 5). Pure file logic: no
registry is reached here."""

import pytest

from edgekit.lab import emulated


def test_refresh_replaces_a_stale_bundle_and_points_pip_at_it(tmp_path, monkeypatch):
    host = tmp_path / "host-ca.crt"
    host.write_text("-----BEGIN CERTIFICATE-----\ntoday\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(emulated, "HOST_CA", host)
    root = tmp_path / "root"
    (root / "etc/ssl/certs").mkdir(parents=True)
    stale = root / emulated.ROOT_CA.lstrip("/")
    stale.write_text("the day the root was built\n")
    assert emulated.refresh_ca(root) == emulated.ROOT_CA
    assert stale.read_text() == host.read_text()
    assert (root / "etc/pip.conf").read_text() == f"[global]\ncert = {emulated.ROOT_CA}\n"
    assert not [p for p in (root / "etc").rglob(".*")]   # no temporary file left behind
    monkeypatch.setattr(emulated, "HOST_CA", tmp_path / "none.crt")
    assert emulated.refresh_ca(root) is None


@pytest.mark.parametrize("log, expect", [
    ("Collecting numpy<2\nWARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement "
     "tflite-runtime==9\nERROR: No matching distribution found for tflite-runtime==9\n",
     "ERROR: No matching distribution found for tflite-runtime==9"),
    ("Collecting numpy<2\n  ... [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate "
     "in certificate chain (_ssl.c:1006)\nERROR: No matching distribution found for numpy<2\n",
     "CERTIFICATE_VERIFY_FAILED"),
])
def test_pip_failure_names_the_cause(log, expect):
    why = emulated.pip_failure(log)
    assert expect in why
    assert ("PIP_CERT" in why) == ("CERTIFICATE" in expect)
