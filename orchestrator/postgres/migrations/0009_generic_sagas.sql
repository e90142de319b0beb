-- Generic saga types. A saga is named by its saga type and its business key (the idempotency
-- key its type derives from the start message; the saga id is uuid5 of "<type>:<key>"), and runs
-- to its end on the version of its type's definition it started on. Before this migration the
-- only type was "transfer", its key the transfer id and its definition unversioned: every
-- existing saga is a transfer on version 1 (a rejected one never ran a definition: none).
--
-- The events are not touched: `saga_events` is append-only (its triggers refuse UPDATE) and old
-- rows are read as they were written (`schemas.events` reads a transfer id as the business key,
-- `str(transfer_id)`, which gives the saga id they always had). Only the projection and the dead
-- letters change.

ALTER TABLE sagas
    ADD COLUMN business_key       text,
    ADD COLUMN definition_version integer;

-- The cached state (`SagaState` as JSON) speaks the same words as the columns, so a rebuild or
-- a replay compares equal (`saga check`, I4).
UPDATE sagas SET
    business_key = transfer_id::text,
    definition_version = CASE WHEN status <> 'REJECTED' THEN 1 END,
    state = (state - 'transfer_id') || jsonb_build_object(
        'business_key', transfer_id::text,
        'definition_version', CASE WHEN status <> 'REJECTED' THEN 1 END);

ALTER TABLE sagas ALTER COLUMN business_key SET NOT NULL;
-- One saga per key and type (the derived saga id says the same; this says it in the data).
ALTER TABLE sagas ADD CONSTRAINT sagas_type_key UNIQUE (saga_type, business_key);
-- A saga that ran (or runs) names the definition version it runs on; only a rejected one has
-- none. Workers refuse to start without a version that sagas in flight run on.
ALTER TABLE sagas ADD CONSTRAINT sagas_definition_version CHECK (
    (definition_version >= 1 OR (definition_version IS NULL AND status = 'REJECTED')) IS TRUE);

-- Dropped, not kept beside business_key: the engine no longer knows what a transfer is, so the
-- column would be NULL for every saga from now on, and a reader still asking for
-- `transfer_id = ...` would quietly find only the old ones. Dropped, such a reader fails loudly.
-- Nothing is lost: a transfer's id is its business key, and it is in its events.
ALTER TABLE sagas DROP COLUMN transfer_id;

-- Dead letters likewise: the saga type (of the start topic a record came from, or of the saga it
-- concerns) and the saga's business key. Before, every intake record was a transfer request and
-- every saga a transfer.
ALTER TABLE dead_letters
    ADD COLUMN saga_type    text,
    ADD COLUMN business_key text;
UPDATE dead_letters SET
    saga_type = CASE WHEN transfer_id IS NOT NULL OR stage = 'intake' THEN 'transfer' END,
    business_key = transfer_id::text;
ALTER TABLE dead_letters DROP COLUMN transfer_id;
