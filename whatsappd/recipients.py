"""Recipients: phone numbers in any human format -> E.164 -> WhatsApp JID; JIDs checked as given."""

from __future__ import annotations

import re

import phonenumbers

__all__ = ["GROUP_JID_PATTERN", "USER_JID_PATTERN", "InvalidRecipient", "normalize_phone", "normalize_recipient"]

#: The JIDs a recipient may be given as (anchored: the OpenAPI document uses them too).
USER_JID_PATTERN = r"^[1-9][0-9]{6,14}(?::[0-9]{1,3})?@s\.whatsapp\.net$"
GROUP_JID_PATTERN = r"^[0-9]{5,20}(?:-[0-9]{5,20})?@g\.us$"
_USER_JID = re.compile(USER_JID_PATTERN)
_GROUP_JID = re.compile(GROUP_JID_PATTERN)


class InvalidRecipient(ValueError):
    """The recipient is neither a valid phone number nor a JID; the message says why."""


def normalize_phone(text: str) -> str:
    """'+55 11 99999-9999' -> '5511999999999' (E.164 digits, no '+').

    Numbers must be international: with a '+' or as bare digits starting with the country code.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidRecipient("the recipient is empty; give a phone number such as +55 11 99999-9999")
    raw = text.strip()
    candidate = raw if raw.startswith("+") else "+" + raw
    try:
        number = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException:
        raise InvalidRecipient(f"{raw!r} is not a phone number; "
                               "write it in international format, e.g. +55 11 99999-9999") from None
    if not phonenumbers.is_possible_number(number):
        raise InvalidRecipient(f"{raw!r} has the wrong number of digits for country code +{number.country_code}")
    if not phonenumbers.is_valid_number(number):
        raise InvalidRecipient(f"{raw!r} is not a valid number for country code +{number.country_code}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def normalize_recipient(text: str) -> str:
    """A phone number or a JID -> the JID to send to."""
    if isinstance(text, str) and "@" in text:
        jid = text.strip()
        if _USER_JID.fullmatch(jid) or _GROUP_JID.fullmatch(jid):
            # A device suffix (":12") addresses one device; a message goes to the user.
            return jid.split(":")[0].split("@")[0] + "@s.whatsapp.net" if jid.endswith("@s.whatsapp.net") else jid
        raise InvalidRecipient(f"{text!r} is not a WhatsApp JID (expected digits@s.whatsapp.net or a "
                               "group id@g.us)")
    return normalize_phone(text) + "@s.whatsapp.net"
