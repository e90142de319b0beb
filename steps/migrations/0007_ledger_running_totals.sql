-- Running totals on the ledger's entries (ADR 0008). Every entry on a customer account is fenced
-- by it with the account's next number (0005), so per account the entries form one serial chain
-- and each can carry the account's totals *after* it: an account's view is its latest entry (one
-- index probe) instead of sums over its whole history. Nothing is ever updated: a total is
-- written once, with its entry. The sums stay the truth; `saga check` compares the two.
--   fence_balance       opening balance + credits - debits of fence_account, after this entry
--   fence_held          Σ hold_delta on fence_account, after this entry
--   fence_settled_total Σ amount settled out of fence_account (step 'settle', debited), ever
-- Entries written before this migration have none (NULL): the view then derives the account
-- from the sums, and the account's next entry carries exact totals from there on.
ALTER TABLE ledger_entries
    ADD COLUMN fence_balance       numeric(38,4),
    ADD COLUMN fence_held          numeric(38,4),
    ADD COLUMN fence_settled_total numeric(38,4);
-- Every new entry carries all three (NOT VALID: checked for new rows only, as the table is
-- append-only), so no writer can break the chain and quietly bring back the sums' cost.
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_running_totals CHECK (
    (fence_balance IS NOT NULL AND fence_held IS NOT NULL AND fence_settled_total IS NOT NULL)
    IS TRUE
) NOT VALID;
-- The daily outflow limit needs the settled total as it was when the UTC day began: the
-- account's latest entry recorded before then. An account's entries are serial through its
-- fence, so their order by recorded_at agrees with their order by fence_seq; fence_seq breaks a
-- tie of two entries written in one statement within the same microsecond.
CREATE INDEX ledger_entries_fence_by_time ON ledger_entries (fence_account, recorded_at, fence_seq)
    INCLUDE (fence_settled_total) WHERE fence_account IS NOT NULL;
-- Settlements written before the fence (0005) belong to no chain. The daily limit of an account
-- whose chain starts today must still subtract those recorded before today; only old rows can
-- ever be in this index (every new entry is fenced), so it stays as small as it was at 0005.
CREATE INDEX ledger_entries_unfenced_settles ON ledger_entries (debit_account, recorded_at)
    INCLUDE (amount) WHERE fence_account IS NULL AND step = 'settle';
