"""Redaction: each kind is replaced and counted; code that only looks like personal data is left alone."""

from __future__ import annotations

import pytest

from kubeforge.data.redact import redact_text
from kubeforge.spec.data import RedactStep

pytestmark = pytest.mark.unit

ALL = RedactStep()


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Author: Barry Warsaw <barry@python.org>", "Author: Barry Warsaw <<EMAIL>>", "emails"),
        ("mail perky@FreeBSD.org today", "mail <EMAIL> today", "emails"),
        ("first.last+tag@mail.example.co.uk", "<EMAIL>", "emails"),
        ("server at 192.168.1.20:8080", "server at <IP_ADDRESS>:8080", "ip_addresses"),
        ("addr = '10.0.0.255'", "addr = '<IP_ADDRESS>'", "ip_addresses"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 <IP_ADDRESS> here", "ip_addresses"),
        ("full fe80:0:0:0:202:b3ff:fe1e:8329", "full <IP_ADDRESS>", "ip_addresses"),
        ("call +1 555 123 4567 now", "call <PHONE> now", "phone_numbers"),
        ("office (555) 123-4567", "office <PHONE>", "phone_numbers"),
        ("fax 555.123.4567.", "fax <PHONE>.", "phone_numbers"),
        ("London +44 20 7946 0958", "London <PHONE>", "phone_numbers"),
        ("key AKIAIOSFODNN7EXAMPLE end", "key <SECRET> end", "secrets"),
        ('api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"', 'api_key = "<SECRET>"', "secrets"),
        ("{'password': 'hunter2hunter2'}", "{'password': '<SECRET>'}", "secrets"),
        ("token ghp_" + "A1b2" * 9, "token <SECRET>", "secrets"),
        ("xoxb-123456789012-abcdefABCDEF", "<SECRET>", "secrets"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIBOg\n-----END RSA PRIVATE KEY-----\n", "<SECRET>\n", "secrets"),
    ],
)
def test_each_kind_is_replaced_and_counted(text: str, expected: str, kind: str) -> None:
    redacted, counts = redact_text(text, ALL)
    assert redacted == expected
    assert counts[kind] == 1
    assert sum(counts.values()) == 1


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.7 and libfoo 1.2.3.4.5",
        "__version__ = '1.0.0.2'",
        "see RFC 7231 section-6.5.1.1",
        "mask = 0xdeadbeef; table = [0x1234, 0x00ff]",
        "released 2023-01-15, build 20230115",
        "values 100 200 3000 and 555 1234",
        "x[::2] a[1::3] b[::-1] at 12:30:45 mac 00:1a:2b:3c:4d:5e",
        "bind to 127.0.0.1 or 0.0.0.0 or ::1",
        "@property\ndef matmul(a, b): return a@b.T",
        "locale ks_in@devanagari.utf8",
        "password = '%s' % secret; password = ''",
        "float 1e+10 20 30",
        "u'\\u00e9' # 0x00e9 -> LATIN SMALL LETTER E WITH ACUTE",
    ],
)
def test_lookalikes_are_not_redacted(text: str) -> None:
    redacted, counts = redact_text(text, ALL)
    assert redacted == text
    assert sum(counts.values()) == 0


def test_switches_turn_kinds_off() -> None:
    text = "a@example.com 192.168.0.9 +1 555 123 4567 AKIAIOSFODNN7EXAMPLE"
    redacted, counts = redact_text(
        text, RedactStep(emails=False, ip_addresses=False, phone_numbers=False, secrets=False)
    )
    assert redacted == text and sum(counts.values()) == 0
    redacted, counts = redact_text(text, RedactStep(emails=True, ip_addresses=False, phone_numbers=False, secrets=False))
    assert redacted == "<EMAIL> 192.168.0.9 +1 555 123 4567 AKIAIOSFODNN7EXAMPLE"
    assert counts == {"secrets": 0, "emails": 1, "ip_addresses": 0, "phone_numbers": 0}


def test_counts_every_occurrence() -> None:
    redacted, counts = redact_text("x@y.org, z@w.net and 8.8.8.8 / 1.1.1.1", ALL)
    assert redacted == "<EMAIL>, <EMAIL> and <IP_ADDRESS> / <IP_ADDRESS>"
    assert counts["emails"] == 2 and counts["ip_addresses"] == 2
