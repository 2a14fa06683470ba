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


@pytest.mark.parametrize(("text", "read_as"), [
    ("11 99999-9999", "+1 1999999999, country code +1 (US and others), which is not a valid number there"),
    ("(11) 99999-9999", "+1 1999999999, country code +1 (US and others), which is not a valid number there"),
    ("1199999999", "+1 199999999, country code +1 (US and others), which has the wrong number of digits there"),
    ("44 9999 9999", "+44 99999999, country code +44 (GB and others), which "),
])
def test_a_number_without_plus_says_how_it_was_read_and_how_to_write_it(text, read_as):
    """Without '+', the error says the first digits were taken as the country code, what that gave,
    and how to write the number (no country is guessed: a national number never silently passes)."""
    with pytest.raises(InvalidRecipient) as caught:
        normalize_recipient(text)
    message = str(caught.value)
    assert message.startswith(f"{text!r} has no '+', so its first digits were taken as the country code: "
                              f"it was read as {read_as}"), message
    assert message.endswith("If it is a national number, write it with '+' and its country code, "
                            "e.g. +55 11 99999-9999 for a mobile in São Paulo, Brazil")


@pytest.mark.parametrize("text", ["011 99999-9999", "21 98765 4321"])
def test_digits_that_start_with_no_country_code_say_so(text):
    """Bare digits whose start is no country code (a trunk 0, a Brazilian area code) say how to write them."""
    with pytest.raises(InvalidRecipient) as caught:
        normalize_recipient(text)
    assert str(caught.value) == (
        f"{text!r} is not a phone number in international format: without '+', its first digits must be a "
        "country code, and they are not one; write it with '+' and its country code, e.g. +55 11 99999-9999 "
        "for a mobile in São Paulo, Brazil")


@pytest.mark.parametrize(("text", "without", "with_br"), [
    ("(11) 99999-9999", None, "5511999999999"),
    ("011 99999-9999", None, "5511999999999"),
    ("5511999999999", "5511999999999", "5511999999999"),
    ("51 99123-4567", "51991234567", "5551991234567"),  # Porto Alegre, or Peru with a country code
    ("+51 99123-4567", "51991234567", "51991234567"),
])
def test_default_country_reads_numbers_without_plus_as_that_countrys(text, without, with_br):
    """With outbox.default_country "BR", digits without '+' are a Brazilian number (national or with
    55); without it they start with the country code; a '+' always wins."""
    assert normalize_phone(text, "BR") == with_br
    if without is None:
        with pytest.raises(InvalidRecipient):
            normalize_phone(text)
    else:
        assert normalize_phone(text) == without


def test_with_a_default_country_the_error_names_it():
    """An invalid number without '+' under outbox.default_country says it was read as that country's."""
    with pytest.raises(InvalidRecipient) as caught:
        normalize_recipient("99999-9999", "BR")
    assert str(caught.value) == (
        "'99999-9999' has no '+', so it was read as a number of BR (outbox.default_country): +55 999999999, "
        "which is not a valid number there. If it is a number of another country, write it with '+' and its "
        "country code, e.g. +55 11 99999-9999 for a mobile in São Paulo, Brazil")


@pytest.mark.parametrize("value", [None, 5511999999999, ["+5511999999999"]])
def test_a_recipient_that_is_not_a_string_is_refused(value):
    """Only strings are recipients; anything else is an InvalidRecipient, never a crash."""
    with pytest.raises(InvalidRecipient):
        normalize_recipient(value)
