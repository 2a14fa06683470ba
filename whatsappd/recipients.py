"""Recipients: phone numbers in any human format -> E.164 -> WhatsApp JID; JIDs checked as given.

A number with '+' names its country itself. Without one, it is read in one of two ways, and an
error says which was assumed:

- `outbox.default_country` empty (the default): the digits start with the country code, as
  WhatsApp and wa.me links write numbers (5511999999999);
- `outbox.default_country = "BR"`: as a number of that country, written nationally
  ("(11) 99999-9999") or with its country code ("5511999999999").

Why not always guess the CRM's country: the daemon cannot know it. And why set it when users
type national numbers: many area codes are also country codes, so a national number can be a
valid number elsewhere ("51 99123-4567", Porto Alegre, read with a country code is in Peru).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import phonenumbers

__all__ = [
    "GROUP_JID_PATTERN",
    "PHONE_DIGITS_PATTERN",
    "USER_JID_PATTERN",
    "InvalidRecipient",
    "is_group_jid",
    "is_phone_digits",
    "normalize_phone",
    "normalize_recipient",
    "split_send_jid",
]

#: A phone number as WhatsApp writes it: E.164 digits, no "+", no leading zero (7 to 15 digits).
PHONE_DIGITS_PATTERN = r"[1-9][0-9]{6,14}"
_GROUP_ID = r"[0-9]{5,20}(?:-[0-9]{5,20})?"
#: The JIDs a recipient may be given as (anchored: the OpenAPI document uses them too).
USER_JID_PATTERN = rf"^{PHONE_DIGITS_PATTERN}(?::[0-9]{{1,3}})?@s\.whatsapp\.net$"
GROUP_JID_PATTERN = rf"^{_GROUP_ID}@g\.us$"
_USER_JID = re.compile(USER_JID_PATTERN)
_GROUP_JID = re.compile(GROUP_JID_PATTERN)
_PHONE_DIGITS = re.compile(PHONE_DIGITS_PATTERN)
#: What a message is sent to: normalize_recipient's output (a user without a device part, or a group).
_SEND_JID = re.compile(rf"({PHONE_DIGITS_PATTERN})@(s\.whatsapp\.net)|({_GROUP_ID})@(g\.us)")
_HOW = "write it with '+' and its country code, e.g. +55 11 99999-9999 for a mobile in São Paulo, Brazil"


class InvalidRecipient(ValueError):
    """The recipient is neither a valid phone number nor a JID; the message says why."""


def _country(code: int | None) -> str:
    import phonenumbers

    regions = phonenumbers.region_codes_for_country_code(code) if code else ()
    where = f"{regions[0]}{' and others' if len(regions) > 1 else ''}" if regions else "no country"
    return f"country code +{code} ({where})"


def _fault(number: phonenumbers.PhoneNumber) -> str:
    import phonenumbers

    return ("has the wrong number of digits there" if not phonenumbers.is_possible_number(number)
            else "is not a valid number there")


def normalize_phone(text: str, country: str = "") -> str:
    """'+55 11 99999-9999' -> '5511999999999' (E.164 digits, no '+').

    Without '+': read as a number of `country` (an ISO code such as "BR", from
    outbox.default_country) if given, else as digits starting with the country code.
    """
    import phonenumbers  # here, not at the top: the workers use only the JID grammar, and load faster

    if not isinstance(text, str) or not text.strip():
        raise InvalidRecipient("the recipient is empty; give a phone number such as +55 11 99999-9999")
    raw = text.strip()
    plus = raw.startswith("+")
    try:
        number = phonenumbers.parse(raw if plus or country else "+" + raw, None if plus else country or None)
    except phonenumbers.NumberParseException:
        if plus or not any(char.isdigit() for char in raw):
            raise InvalidRecipient(f"{raw!r} is not a phone number; {_HOW}") from None
        if country:
            raise InvalidRecipient(f"{raw!r} is not a phone number of {country} (outbox.default_country); "
                                   f"{_HOW}") from None
        raise InvalidRecipient(f"{raw!r} is not a phone number in international format: without '+', its "
                               f"first digits must be a country code, and they are not one; {_HOW}") from None
    if plus:
        if not phonenumbers.is_possible_number(number):
            raise InvalidRecipient(f"{raw!r} has the wrong number of digits for {_country(number.country_code)}")
        if not phonenumbers.is_valid_number(number):
            raise InvalidRecipient(f"{raw!r} is not a valid number for {_country(number.country_code)}")
    elif not phonenumbers.is_valid_number(number):
        # Say what was assumed: a CRM user who typed a national number never wrote a country code.
        read = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
        if country:
            raise InvalidRecipient(f"{raw!r} has no '+', so it was read as a number of {country} "
                                   f"(outbox.default_country): {read}, which {_fault(number)}. If it is "
                                   f"a number of another country, {_HOW}")
        raise InvalidRecipient(f"{raw!r} has no '+', so its first digits were taken as the country code: it "
                               f"was read as {read}, {_country(number.country_code)}, which {_fault(number)}. "
                               f"If it is a national number, {_HOW}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def normalize_recipient(text: str, country: str = "") -> str:
    """A phone number (see normalize_phone) or a JID -> the JID to send to."""
    if isinstance(text, str) and "@" in text:
        jid = text.strip()
        if _USER_JID.fullmatch(jid) or _GROUP_JID.fullmatch(jid):
            # A device suffix (":12") addresses one device; a message goes to the user.
            return jid.split(":")[0].split("@")[0] + "@s.whatsapp.net" if jid.endswith("@s.whatsapp.net") else jid
        raise InvalidRecipient(f"{text!r} is not a WhatsApp JID (expected digits@s.whatsapp.net or a "
                               "group id@g.us)")
    return normalize_phone(text, country) + "@s.whatsapp.net"


def is_phone_digits(value: object) -> bool:
    """Whether value is a phone number as WhatsApp writes it (PHONE_DIGITS_PATTERN)."""
    return isinstance(value, str) and _PHONE_DIGITS.fullmatch(value) is not None


def is_group_jid(value: object) -> bool:
    """Whether value is a group JID (GROUP_JID_PATTERN)."""
    return isinstance(value, str) and _GROUP_JID.fullmatch(value) is not None


def split_send_jid(value: object) -> tuple[str, str] | None:
    """(user, server) of a JID a message can be sent to, None for anything else.

    Only what normalize_recipient gives: a phone JID without a device part, or a group JID.
    """
    match = _SEND_JID.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    return (match[1], match[2]) if match[1] is not None else (match[3], match[4])
