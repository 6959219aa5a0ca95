"""PII scrubbing: e-mail addresses, phone numbers, card numbers, Chinese resident IDs and IPv4 addresses
become typed placeholders (`<EMAIL>`, `<PHONE>`, `<CREDIT_CARD>`, `<CN_ID>`, `<IPV4>`).

Precision over recall: a number is replaced only when its shape is unambiguous or a checksum confirms it,
so years, prices, decimals and version strings survive. Known trade-offs:
- a dotted version with four parts each in 0-255 (`1.2.3.4`) is indistinguishable from an IPv4 address and
  is replaced;
- a bare 10-digit number whose first and fourth digits are 2-9 reads as a North-American phone number;
- an 18-digit number that fails the resident-ID check but passes Luhn is a plausible card number (cards
  are 13-19 digits) and is replaced as `<CREDIT_CARD>`;
- 13 digits that read as a Chinese mobile number after its `86` country code (`8613912345678`) are a
  `<PHONE>` even when Luhn-valid: 13-digit card numbers are old Visa numbers, which start with 4.

Passes run in a fixed order (e-mail, IPv4, phone, ID, card); each placeholder holds no digits, so a later
pass never matches inside an earlier one's output. Digit runs are matched whole (no digit on either side).
"""

import datetime
import re
from collections import Counter
from collections.abc import Callable

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not part of a longer dotted number (1.2.3.4.5) on either side.
_IPV4 = re.compile(rf"(?<![\d.])(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)")

# A phone number is never glued to a word, digit or decimal point on the left, nor to a digit on the right.
_LEFT = r"(?<![\w+])(?<!\d[.,])"
_RIGHT = r"(?![.,]?\d)"
_PHONE = re.compile(
    _LEFT
    + r"(?:"
    # Chinese mobile: 1[3-9]X XXXX XXXX, optional +86 / 86 prefix, spaces or dashes.
    + r"(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"
    # North American (NANP): area and exchange codes start with 2-9; one separator style throughout.
    + r"|(?:\+?1[ .-]?)?(?:\([2-9]\d\d\)[ .-]?[2-9]\d\d[ .-]?\d{4}|[2-9]\d\d(?P<sep>[ .-]?)[2-9]\d\d(?P=sep)\d{4})"
    # International (E.164-ish): + country code, then groups; 8-15 digits in all (checked below).
    + r"|\+[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}"
    + r")"
    + _RIGHT
)
# 13-19 digits with optional single spaces or dashes between them; Luhn decides.
_CARD = re.compile(r"(?<![\d.,])\d(?:[ -]?\d){12,18}" + _RIGHT)
# 6-digit region code starting 1-8, YYYYMMDD (18xx-20xx), 3-digit sequence, check character.
_CN_ID = re.compile(r"(?<![\w.,])[1-8]\d{5}(?:18|19|20)\d{6}\d{3}[\dXx](?![\w]|[.,]\d)")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def cn_id_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits of a Chinese resident ID."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def cn_id_valid(s: str) -> bool:
    if len(s) != 18 or not s[:17].isdigit():
        return False
    try:
        datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return cn_id_check_char(s[:17]) == s[17].upper()


def _is_phone(s: str) -> bool:
    return 8 <= sum(c.isdigit() for c in s) <= 15 if s.startswith("+") else True


def _is_card(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


_PASSES: tuple[tuple[str, re.Pattern[str], Callable[[str], bool]], ...] = (
    ("EMAIL", _EMAIL, lambda s: True),
    ("IPV4", _IPV4, lambda s: True),
    ("PHONE", _PHONE, _is_phone),
    ("CN_ID", _CN_ID, cn_id_valid),
    ("CREDIT_CARD", _CARD, _is_card),
)


def scrub(text: str) -> tuple[str, Counter[str]]:
    """`text` with PII replaced by typed placeholders, and how many of each type were replaced."""
    counts: Counter[str] = Counter()
    for kind, pattern, valid in _PASSES:
        placeholder = f"<{kind}>"

        def replace(m: re.Match[str], kind: str = kind, valid=valid, placeholder: str = placeholder) -> str:
            if not valid(m.group()):
                return m.group()
            counts[kind] += 1
            return placeholder

        text = pattern.sub(replace, text)
    return text, counts
