-- The card top-up example's own tables (docs/examples/card_topup): its wallet participant and
-- its card processor's stand-in. Applied after the engine's migrations (which give it
-- participant_replies and refuse_change_to_append_only); names are unique across folders.

CREATE TABLE topup_wallets (
    wallet_id       text          PRIMARY KEY,
    currency        char(3)       NOT NULL,
    -- The only money not explained by a movement.
    opening_balance numeric(38,4) NOT NULL CHECK (opening_balance >= 0)
);

-- One row per (saga, step, direction), as the kit writes it with the stored reply: what the
-- wallet's balance and hold moved by. Append-only; balances are derived from it.
CREATE TABLE topup_wallet_movements (
    saga_id       uuid          NOT NULL,
    step          text          NOT NULL,
    direction     text          NOT NULL CHECK (direction IN ('forward', 'compensate')),
    wallet_id     text          NOT NULL REFERENCES topup_wallets,
    balance_delta numeric(38,4) NOT NULL,
    hold_delta    numeric(38,4) NOT NULL,
    recorded_at   timestamptz   NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (saga_id, step, direction)
);
CREATE INDEX topup_wallet_movements_by_wallet ON topup_wallet_movements (wallet_id)
    INCLUDE (balance_delta, hold_delta);
CREATE TRIGGER topup_wallet_movements_append_only
    BEFORE UPDATE OR DELETE ON topup_wallet_movements
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only();
CREATE TRIGGER topup_wallet_movements_no_truncate
    BEFORE TRUNCATE ON topup_wallet_movements
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_append_only();

CREATE TABLE topup_cards (
    card_id       text    PRIMARY KEY,
    currency      char(3) NOT NULL,
    blocked       boolean NOT NULL DEFAULT false,
    -- The stand-in's switch for an issuer outage: while false, loads are refused retryably.
    issuer_online boolean NOT NULL DEFAULT true
);

-- At most one load per saga.
CREATE TABLE topup_card_loads (
    saga_id     uuid          PRIMARY KEY,
    card_id     text          NOT NULL REFERENCES topup_cards,
    amount      numeric(38,4) NOT NULL CHECK (amount > 0),
    currency    char(3)       NOT NULL,
    recorded_at timestamptz   NOT NULL DEFAULT clock_timestamp()
);
