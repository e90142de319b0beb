-- The ledger participant's tables. Balances are never stored: they are derived from entries.

CREATE TABLE accounts (
    account_id          text          PRIMARY KEY,
    currency            char(3)       NOT NULL,
    kind                text          NOT NULL CHECK (kind IN ('customer', 'clearing')),
    -- The only money not explained by an entry: what the account held when it was opened.
    opening_balance     numeric(38,4) NOT NULL CHECK (opening_balance >= 0),
    daily_outflow_limit numeric(38,4) CHECK (daily_outflow_limit > 0),
    closed              boolean       NOT NULL DEFAULT false,
    created_at          timestamptz   NOT NULL DEFAULT clock_timestamp()
);

-- One row per (saga, step, direction): a journal entry that moves `amount` from debit_account to
-- credit_account, and/or changes the hold on hold_account by hold_delta.
CREATE TABLE ledger_entries (
    entry_id       bigserial     PRIMARY KEY,
    saga_id        uuid          NOT NULL,
    step           text          NOT NULL,
    direction      text          NOT NULL CHECK (direction IN ('forward', 'compensate')),
    currency       char(3)       NOT NULL,
    amount         numeric(38,4) NOT NULL CHECK (amount > 0),
    debit_account  text          REFERENCES accounts,
    credit_account text          REFERENCES accounts,
    hold_account   text          REFERENCES accounts,
    hold_delta     numeric(38,4) NOT NULL DEFAULT 0,
    recorded_at    timestamptz   NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (saga_id, step, direction),
    CHECK ((debit_account IS NULL) = (credit_account IS NULL)),
    CHECK (debit_account IS NULL OR debit_account <> credit_account),
    CHECK (debit_account IS NOT NULL OR (hold_account IS NOT NULL AND hold_delta <> 0))
);
CREATE INDEX ledger_entries_by_debit ON ledger_entries (debit_account) INCLUDE (amount);
CREATE INDEX ledger_entries_by_credit ON ledger_entries (credit_account) INCLUDE (amount);
CREATE INDEX ledger_entries_by_hold ON ledger_entries (hold_account) INCLUDE (hold_delta)
    WHERE hold_account IS NOT NULL;

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_append_only();

CREATE TABLE notifications (
    saga_id     uuid        PRIMARY KEY,
    recipient   text        NOT NULL,
    message     text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
