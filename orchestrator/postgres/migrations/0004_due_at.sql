-- Delayed retries and step deadlines live here, so a retry never blocks a Kafka partition and
-- survives every crash: `due_at` is when the recovery worker must look at an in-flight saga
-- (the end of a retry's backoff, or the deadline of the command it waits on).
ALTER TABLE sagas ADD COLUMN due_at timestamptz;
UPDATE sagas SET due_at = deadline_at WHERE status IN ('RUNNING', 'COMPENSATING');

-- What recovery scans: only in-flight sagas, ordered by when they are due. It replaces the
-- deadline index, which missed sagas waiting out a backoff (they have no deadline).
DROP INDEX sagas_in_flight_by_deadline;
CREATE INDEX sagas_due ON sagas (due_at) WHERE status IN ('RUNNING', 'COMPENSATING');
