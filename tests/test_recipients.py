"""whatsappd/recipients.py: what a CRM writes in "to" becomes the JID the worker sends to."""

from __future__ import annotations

import re

import pytest

from whatsappd.recipients import InvalidRecipient, normalize_phone, normalize_recipient


@pytest.mark.parametrize(("text", "jid"), [
    ("+55 11 99999-9999", "5511999999999@s.whatsapp.net"),
    ("+55 (11) 99999.9999", "5511999999999@s.whatsapp.net"),
    ("5511999999999", "5511999999999@s.whatsapp.net"),
    ("  +5511999999999\t", "5511999999999@s.whatsapp.net"),
    ("+1 (650) 253-0000", "16502530000@s.whatsapp.net"),
    ("+44 20 7946 0958", "442079460958@s.whatsapp.net"),
    ("+351 912 345 678", "351912345678@s.whatsapp.net"),
    ("+49 30 901820", "4930901820@s.whatsapp.net"),
])
def test_phone_numbers_in_human_formats_become_e164_user_jids(text, jid):
    """Spaces, dashes, dots, brackets and a missing '+' all normalise to the E.164 digits' JID."""
    assert normalize_recipient(text) == jid


def test_normalize_phone_gives_e164_digits_without_plus():
    """normalize_phone is what the contacts route uses: digits only, country code first."""
    assert normalize_phone("+55 11 99999-9999") == "5511999999999"
    assert normalize_phone("1 650 253 0000") == "16502530000"


@pytest.mark.parametrize("jid", [
    "120363000000000001@g.us",
    "5511999999999-1600000000@g.us",
])
def test_group_jids_are_taken_as_given(jid):
    """A group JID (id@g.us, old style creator-timestamp@g.us too) is the recipient itself."""
    assert normalize_recipient(jid) == jid
    assert normalize_recipient(f"  {jid} ") == jid


@pytest.mark.parametrize(("jid", "user"), [
    ("5511999999999@s.whatsapp.net", "5511999999999@s.whatsapp.net"),
    ("5511999999999:12@s.whatsapp.net", "5511999999999@s.whatsapp.net"),
    ("5511999999999:0@s.whatsapp.net", "5511999999999@s.whatsapp.net"),
])
def test_user_jids_lose_their_device_suffix(jid, user):
    """A device-suffixed JID addresses one device; a message goes to the user's plain JID."""
    assert normalize_recipient(jid) == user


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty"),
    ("   ", "empty"),
    ("abc", "not a phone number"),
    ("+999 123456789", "not a phone number"),
    ("0044 20 7946 0958", "international format"),
    ("+55 11 9999", "wrong number of digits for country code +55"),
    ("+55 11 99999-99999", "wrong number of digits for country code +55"),
    ("+1 200 555 0100", "not a valid number for country code +1"),
    ("foo@s.whatsapp.net", "not a WhatsApp JID"),
    ("5511999999999@c.us", "not a WhatsApp JID"),
    ("0511999999999@s.whatsapp.net", "not a WhatsApp JID"),
    ("5511999999999:1234@s.whatsapp.net", "not a WhatsApp JID"),
    ("12@g.us", "not a WhatsApp JID"),
    ("5511999999999@s.whatsapp.net@g.us", "not a WhatsApp JID"),
])
def test_invalid_recipients_are_refused_with_the_reason(text, reason):
    """Each invalid recipient raises InvalidRecipient whose message says what is wrong and quotes it."""
    with pytest.raises(InvalidRecipient, match=re.escape(reason)) as caught:
        normalize_recipient(text)
    if text.strip():
        assert repr(text) in str(caught.value)


@pytest.mark.parametrize("value", [None, 5511999999999, ["+5511999999999"]])
def test_a_recipient_that_is_not_a_string_is_refused(value):
    """Only strings are recipients; anything else is an InvalidRecipient, never a crash."""
    with pytest.raises(InvalidRecipient):
        normalize_recipient(value)
