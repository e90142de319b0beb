"""What a viewer sees of account ids: the last four characters, wherever they appear."""

from __future__ import annotations

from orchestrator.console.masking import AccountMask, mask_value
from orchestrator.settings import Settings

MASK = AccountMask(Settings().console_masked_fields)


def test_named_fields_are_masked_and_their_values_everywhere_else() -> None:
    saga = {"business_key": "t-1", "input": {"source_account": "acc-alice-1234",
                                             "destination_account": "acc-bob-9876",
                                             "amount": "10.00"},
            "events": [{"detail": "10.00 EUR acc-alice-1234 -> acc-bob-9876 ref='x'",
                        "payload": {"result": {"hold_account": "acc-alice-1234"}}}]}

    masked = MASK.json(saga)

    assert masked["input"] == {"source_account": "****1234",
                               "destination_account": "****9876", "amount": "10.00"}
    assert masked["events"][0]["detail"] == "10.00 EUR ****1234 -> ****9876 ref='x'"
    assert masked["events"][0]["payload"]["result"]["hold_account"] == "****1234"
    assert masked["business_key"] == "t-1"
    assert saga["input"]["source_account"] == "acc-alice-1234"  # a copy, not in place


def test_short_ids_are_hidden_whole_and_other_fields_untouched() -> None:
    assert mask_value("1234") == "****"
    assert mask_value("12345") == "****2345"
    assert MASK.json({"account_id": "ab", "card_id": "card-000042", "accounting": "x",
                      "n": 3}) == {"account_id": "****", "card_id": "****0042",
                                   "accounting": "x", "n": 3}


def test_payload_text_is_masked_as_json_or_by_its_pairs_when_malformed() -> None:
    good = '{"transfer_id": "t", "source_account": "acc-secret-1111"}'
    broken = '{"source_account": "acc-secret-2222", "amount": 1'

    assert "acc-secret" not in MASK.text(good) and "1111" in MASK.text(good)
    assert MASK.text(broken) == '{"source_account": "****2222", "amount": 1'


def test_the_field_rule_is_configurable() -> None:
    iban_only = AccountMask(r"^iban$")

    assert iban_only.json({"iban": "DE00123456789", "source_account": "a-1"}) == {
        "iban": "****6789", "source_account": "a-1"}


def test_account_ids_of_a_payload_are_found_for_the_rest_of_its_dead_letter() -> None:
    payload = '{"destination_account": "acc-dest-3333", "amount": "1"'  # malformed

    found = MASK.values_in_text(payload)
    masked = MASK.json({"reason": "account acc-dest-3333 is closed"}, also=found)

    assert found == {"acc-dest-3333"}
    assert masked == {"reason": "account ****3333 is closed"}
