-- The ledger's fence (ADR 0006). Every entry carries the customer account whose rule it was
-- decided against (reserve, release and settle: the source; credit and its reversal: the
-- destination) and that account's next sequence number. Two writers that decided from the same
-- state of an account take the same number and the second collides on the unique key, so the
-- ledger can decide from an unlocked read and still never spend one balance twice.
ALTER TABLE ledger_entries ADD COLUMN fence_account text, ADD COLUMN fence_seq bigint;
CREATE UNIQUE INDEX ledger_entries_fence ON ledger_entries (fence_account, fence_seq);
-- Entries written before this migration have no fence; every later one must have one, on an
-- account the entry touches. NOT VALID: checked for new rows only (the table is append-only).
-- (A CHECK passes on NULL, hence IS NOT NULL and IS TRUE.)
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_fenced CHECK (
    fence_seq IS NOT NULL AND fence_seq > 0
    AND (fence_account IN (debit_account, credit_account, hold_account)) IS TRUE
) NOT VALID;
