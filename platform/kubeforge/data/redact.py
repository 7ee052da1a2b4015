"""Replace personal data and secrets with typed placeholders, counting replacements per kind.

Code is full of strings that look like personal data and are not, so every pattern is paired with
a check that keeps the obvious false positives:

* IPv4 needs four dotted numbers 0-255 not inside a longer dotted run, so versions such as
  `3.11.7` or `1.2.3.4.5` stay, and not shortly after "version", "section" or "release", which
  introduce four-part version and section numbers. Loopback, unspecified and broadcast addresses (`127.0.0.1`,
  `0.0.0.0`, `255.255.255.255`) identify nobody and are what code binds to, so they stay too.
* IPv6 candidates must parse with `ipaddress` and have at least three non-empty groups, which
  keeps slices (`a[::2]`, `x[1::3]`), times (`12:30:45`) and MAC addresses.
* Phone numbers need a `+` country code, or the North American `(555) 123-4567` /
  `555-123-4567` / `555.123.4567` shapes, with 7 to 15 digits; bare digit runs such as hex
  constants, dates and version numbers never match.
* Secrets are key-shaped: AWS access key ids, private-key blocks, GitHub and Slack tokens, and
  the quoted value of an assignment to a name such as `api_key`, `secret` or `password` when it
  is at least 8 characters without spaces or `%`/`{` formatting.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from kubeforge.spec.data import RedactStep

KINDS = ("secrets", "emails", "ip_addresses", "phone_numbers")
PLACEHOLDER = {"emails": "<EMAIL>", "ip_addresses": "<IP_ADDRESS>", "phone_numbers": "<PHONE>", "secrets": "<SECRET>"}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d|\w)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]\d{2,5}){2,4}"
    r"|(?:\(\d{3}\)\s?|\b\d{3}[-.])\d{3}[-.]\d{4})(?![\w.-]?\d)"
)
# Each secret pattern with literals one of which it cannot match without: scanning a document
# for a literal is far cheaper than running a regex over every position.
_SECRETS = [
    (
        re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----"),
        ("PRIVATE KEY",),
    ),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), ("AKIA", "ASIA")),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"), ("gh",)),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"), ("github_pat_",)),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), ("xox",)),
]
_SECRET_NAMES = ("key", "secret", "token", "pass")
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b(?P<name>[\w-]*(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd))"
    r"(?P<sep>['\"]?\s*[:=]\s*)(?P<quote>['\"])(?P<value>[^'\"\s%{}]{8,})(?P=quote)"
)
_NUMBERING_WORDS = ("version", "section", "release", "§")
_DIGIT = re.compile(r"\d")
_KEEP_IPV4 = {"127.0.0.1", "0.0.0.0", "255.255.255.255"}


def _ipv4(match: re.Match[str]) -> str | None:
    if match.group() in _KEEP_IPV4:
        return None
    before = match.string[max(0, match.start() - 24) : match.start()].lower()
    # Four-part version and section numbers ("__version__ = '1.0.0.2'", "section-6.5.1.1") look like IPs.
    if any(word in before for word in _NUMBERING_WORDS):
        return None
    return PLACEHOLDER["ip_addresses"]


def _ipv6(match: re.Match[str]) -> str | None:
    text = match.group()
    if sum(1 for group in text.split(":") if group) < 3:
        return None
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    if address.is_loopback or address.is_unspecified:
        return None
    return PLACEHOLDER["ip_addresses"]


def _phone(match: re.Match[str]) -> str | None:
    digits = sum(c.isdigit() for c in match.group())
    return PLACEHOLDER["phone_numbers"] if 7 <= digits <= 15 else None


def _substitute(pattern: re.Pattern[str], text: str, replace: Callable[[re.Match[str]], str | None]) -> tuple[str, int]:
    count = 0

    def swap(match: re.Match[str]) -> str:
        nonlocal count
        replacement = replace(match)
        if replacement is None:
            return match.group()
        count += 1
        return replacement

    return pattern.sub(swap, text), count


def redact_text(text: str, step: RedactStep) -> tuple[str, dict[str, int]]:
    """The redacted text and the number of replacements of each kind in `KINDS`."""
    counts = dict.fromkeys(KINDS, 0)
    # Secrets first: a private-key block or token could otherwise be half-eaten by the other patterns.
    if step.secrets:
        for pattern, literals in _SECRETS:
            if any(literal in text for literal in literals):
                text, n = _substitute(pattern, text, lambda m: PLACEHOLDER["secrets"])
                counts["secrets"] += n
        lowered = text.lower()
        if any(name in lowered for name in _SECRET_NAMES):
            text, n = _substitute(
                _ASSIGNED_SECRET, text,
                lambda m: f"{m['name']}{m['sep']}{m['quote']}{PLACEHOLDER['secrets']}{m['quote']}",
            )
            counts["secrets"] += n
    if step.emails and "@" in text:
        text, counts["emails"] = _substitute(_EMAIL, text, lambda m: PLACEHOLDER["emails"])
    # What an address or a phone number cannot do without, checked first: most prose has no digit
    # (IPv4, phones) or too few colons (IPv6), and a full regex scan costs several times more.
    has_digit = _DIGIT.search(text) is not None
    if step.ip_addresses:
        text, v4 = _substitute(_IPV4, text, _ipv4) if has_digit and "." in text else (text, 0)
        text, v6 = _substitute(_IPV6, text, _ipv6) if text.count(":") >= 2 else (text, 0)
        counts["ip_addresses"] = v4 + v6
    if step.phone_numbers and has_digit:
        text, counts["phone_numbers"] = _substitute(_PHONE, text, _phone)
    return text, counts
