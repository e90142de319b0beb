-- The participant kit's stored replies, now the engine's own table: an application's
-- migrations no longer create it. A database from before has it already (from 0002_ledger).
-- A participant's stored reply per effect: a redelivered command gets this, never a new effect.
CREATE TABLE IF NOT EXISTS participant_replies (
    saga_id     uuid        NOT NULL,
    step        text        NOT NULL,
    direction   text        NOT NULL,
    participant text        NOT NULL,
    outcome     text        NOT NULL,
    reply       jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (saga_id, step, direction)
);
