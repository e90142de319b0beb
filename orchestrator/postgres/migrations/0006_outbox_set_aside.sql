-- An outbox row the broker refuses must not stall the relay (issue 9). A refusal is counted on
-- the row (`attempts`, `last_error`); a row refused for what it is, or refused for its topic
-- `SAGA_OUTBOX_MAX_ATTEMPTS` times, is set aside (`set_aside_at`) and never tried again by the
-- relay: `saga check` reports it as a finding and `saga stuck` lists it. `next_attempt_at` is
-- the backoff after a refusal, so a refused row costs a few tries, not one per relay pass.
ALTER TABLE outbox
    ADD COLUMN attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error      text,
    ADD COLUMN next_attempt_at timestamptz,
    ADD COLUMN set_aside_at    timestamptz;

-- What the relay scans: rows still to publish and not set aside, oldest first. It replaces the
-- index on every unpublished row, which a set-aside row would stay in for ever.
DROP INDEX outbox_unpublished;
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL AND set_aside_at IS NULL;
-- What the checker and `saga stuck` list: a handful of rows, if any.
CREATE INDEX outbox_set_aside ON outbox (set_aside_at)
    WHERE set_aside_at IS NOT NULL AND published_at IS NULL;
