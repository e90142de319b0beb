-- The event store: saga_events is the truth; sagas is a projection rebuilt from it.

CREATE TABLE saga_events (
    saga_id      uuid        NOT NULL,
    seq          integer     NOT NULL CHECK (seq >= 1),
    type         text        NOT NULL,
    step         text,
    attempt      integer,
    payload      jsonb       NOT NULL,
    actor        text        NOT NULL,
    causation_id text,
    trace_id     text,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Optimistic concurrency: two writers appending the same seq collide here, not on a lock.
    PRIMARY KEY (saga_id, seq)
);

CREATE FUNCTION refuse_change_to_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER saga_events_append_only
    BEFORE UPDATE OR DELETE ON saga_events
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only();
CREATE TRIGGER saga_events_no_truncate
    BEFORE TRUNCATE ON saga_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_append_only();

-- Query projection: one row per saga, a cache of fold(events) plus the columns queries need.
CREATE TABLE sagas (
    saga_id      uuid        PRIMARY KEY,
    transfer_id  uuid        NOT NULL UNIQUE,
    saga_type    text        NOT NULL,
    status       text        NOT NULL,
    current_step text,
    direction    text,
    attempt      integer     NOT NULL DEFAULT 0,
    version      integer     NOT NULL,
    deadline_at  timestamptz,
    requested_at timestamptz,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    state        jsonb       NOT NULL
);
-- What recovery scans: only in-flight sagas, ordered by their deadline.
CREATE INDEX sagas_in_flight_by_deadline ON sagas (deadline_at)
    WHERE status IN ('RUNNING', 'COMPENSATING');
CREATE INDEX sagas_by_status ON sagas (status, updated_at);

-- Every consumed message, once per consumer: dedup and the account of what became of it.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer,
    "offset"     bigint,
    verdict      text        NOT NULL,
    saga_id      uuid,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, message_id)
);

-- Messages to publish, written in the same transaction as the events that caused them.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    topic        text        NOT NULL,
    key          bytea,
    value        bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '[]',
    saga_id      uuid,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE dead_letters (
    dead_letter_id     uuid        PRIMARY KEY,
    stage              text        NOT NULL,
    reason_code        text        NOT NULL,
    reason             text        NOT NULL,
    error_class        text        NOT NULL,
    original_topic     text        NOT NULL,
    original_partition integer,
    original_offset    bigint,
    original_key       text,
    payload            bytea       NOT NULL,
    headers            jsonb       NOT NULL DEFAULT '[]',
    attempts           integer     NOT NULL DEFAULT 1,
    first_failed_at    timestamptz NOT NULL,
    last_failed_at     timestamptz NOT NULL,
    saga_id            uuid,
    transfer_id        uuid,
    redriven_at        timestamptz
);
CREATE INDEX dead_letters_by_time ON dead_letters (last_failed_at);
