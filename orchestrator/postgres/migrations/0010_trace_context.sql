-- Tracing (ADR 0015). A saga is one trace: its W3C trace context is kept with it, so that every
-- process that moves it on (the orchestrator on a reply without headers, the recovery worker,
-- a restore after a broker loss) sends its commands in the same trace, and a timeline links to
-- its trace.
--
-- `saga_events.trace_id` was created by 0001 and never written until now: from now on each event
-- carries the trace id of its saga, written by the statement that appends it. The ADD is a no-op
-- there; it states the column this release relies on.
ALTER TABLE saga_events ADD COLUMN IF NOT EXISTS trace_id text;

-- The saga's context as a `traceparent` (pointing at the saga's own span, whose id is derived
-- from the saga id) and the upstream's `tracestate`, passed on untouched. Written when the
-- saga's row is created; a saga created before this migration gets one on its next hop.
ALTER TABLE sagas
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate  text;
