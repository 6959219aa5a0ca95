"""PII scrubbing: generated valid PII in random text is always replaced and counted; ordinary numbers never are."""

import datetime
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lmforge.data.pii import cn_id_check_char, cn_id_valid, luhn_valid, scrub

# Filler text with no digits, '@' or '+', so the only PII is what a test puts in.
words = st.text(alphabet="abcdefghij klmnop,;:!?()你好世界", max_size=40)
digits = st.text(alphabet="0123456789", min_size=1, max_size=1)


def _luhn_complete(body: str) -> str:
    return next(body + c for c in "0123456789" if luhn_valid(body + c))


@st.composite
def emails(draw):
    local = draw(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9_+-]{1,5})?", fullmatch=True))
    domain = draw(st.from_regex(r"[a-z0-9]{1,10}(-[a-z0-9]{1,5})?(\.[a-z0-9]{1,8})?", fullmatch=True))
    return f"{local}@{domain}.{draw(st.sampled_from(['com', 'org', 'cn', 'co.uk', 'io']))}"


@st.composite
def phones(draw):
    n = draw(st.integers(2, 9)), draw(st.integers(10, 99)), draw(st.integers(2, 9)), draw(st.integers(10, 99))
    area, exchange, line = f"{n[0]}{n[1]}", f"{n[2]}{n[3]}", f"{draw(st.integers(0, 9999)):04d}"
    mobile = f"1{draw(st.integers(3, 9))}{draw(st.integers(0, 9))}"
    a, b = f"{draw(st.integers(0, 9999)):04d}", f"{draw(st.integers(0, 9999)):04d}"
    sep = draw(st.sampled_from(["", " ", "-", "."]))
    cn_sep = draw(st.sampled_from(["", " ", "-"]))
    return draw(
        st.sampled_from(
            [
                f"{area}{sep}{exchange}{sep}{line}",
                f"({area}) {exchange}-{line}",
                f"+1 {area}{sep}{exchange}{sep}{line}",
                f"{mobile}{cn_sep}{a}{cn_sep}{b}",
                f"+86 {mobile}{cn_sep}{a}{cn_sep}{b}",
                f"+44 20 {a} {b}",
                f"+49 30 {a}{b[:2]}",
            ]
        )
    )


_CN_MOBILE_WITH_86 = re.compile(r"861[3-9]\d{9}")


@st.composite
def cards(draw):
    length = draw(st.integers(13, 19))
    body = str(draw(st.integers(1, 9))) + "".join(draw(digits) for _ in range(length - 2))
    number = _luhn_complete(body)
    # the two shapes the scrubber gives another type, as documented: a phone number after its 86 (test_examples)
    # and a valid resident ID (its check runs first)
    assume(not _CN_MOBILE_WITH_86.fullmatch(number) and not cn_id_valid(number))
    sep = draw(st.sampled_from(["", " ", "-"]))
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


@st.composite
def cn_ids(draw):
    region = f"{draw(st.integers(1, 8))}{draw(st.integers(0, 99999)):05d}"
    born = draw(st.dates(datetime.date(1900, 1, 1), datetime.date(2024, 12, 31)))
    first17 = f"{region}{born:%Y%m%d}{draw(st.integers(0, 999)):03d}"
    return first17 + cn_id_check_char(first17)


ipv4s = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))


@pytest.mark.parametrize(
    ("kind", "strategy"),
    [
        ("EMAIL", emails()),
        ("PHONE", phones()),
        ("CREDIT_CARD", cards()),
        ("CN_ID", cn_ids()),
        ("IPV4", ipv4s),
    ],
)
def test_valid_pii_is_replaced_and_counted(kind, strategy):
    @given(words, strategy, words)
    def check(before, pii, after):
        text = f"{before} {pii} {after}"
        out, counts = scrub(text)
        assert out == f"{before} <{kind}> {after}", pii
        assert counts == {kind: 1}

    check()


@st.composite
def ordinary_numbers(draw):
    body = "".join(draw(digits) for _ in range(15))
    bad_card = next(body + c for c in "0123456789" if not luhn_valid(body + c))
    first17 = "".join(draw(digits) for _ in range(17))
    bad_id = next(
        first17 + c for c in "0123456789X" if not cn_id_valid(first17 + c) and not luhn_valid(first17 + c)
    )
    return draw(
        st.sampled_from(
            [
                bad_card,
                " ".join(bad_card[i : i + 4] for i in range(0, 16, 4)),
                bad_id,
                str(draw(st.integers(1000, 2100))),  # a year
                f"{draw(st.integers(0, 999999))}.{draw(st.integers(0, 99999))}",  # a decimal
                f"${draw(st.integers(0, 999))},{draw(st.integers(0, 999)):03d}.{draw(st.integers(0, 99)):02d}",
                f"{draw(st.integers(0, 20))}.{draw(st.integers(0, 30))}.{draw(st.integers(0, 300))}",  # version
            ]
        )
    )


@given(words, ordinary_numbers(), words)
def test_ordinary_numbers_are_left_alone(before, number, after):
    text = f"{before} {number} {after}"
    assert scrub(text) == (text, {})


def test_examples():
    text = "Mail bob@example.com or call +86 138-1234-5678; card 4111 1111 1111 1111, id 11010519491231002X."
    out, counts = scrub(text)
    assert out == "Mail <EMAIL> or call <PHONE>; card <CREDIT_CARD>, id <CN_ID>."
    assert counts == {"EMAIL": 1, "PHONE": 1, "CREDIT_CARD": 1, "CN_ID": 1}
    # Python 3.11.7 is a version; a four-part version in range reads as an address (documented).
    assert scrub("Python 3.11.7 on 10.0.0.1 since 2024, $19.99") == (
        "Python 3.11.7 on <IPV4> since 2024, $19.99",
        {"IPV4": 1},
    )
    assert scrub("11010519491231002X1")[1] == {}  # glued to more characters: not an ID
    # 13 digits that are both a Chinese mobile number after its 86 prefix and Luhn-valid: a phone (documented)
    assert scrub("8613000000002") == ("<PHONE>", {"PHONE": 1})
