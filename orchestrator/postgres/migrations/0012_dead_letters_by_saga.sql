-- A saga's timeline reads its dead letters (`ops.queries.timeline`): by saga id, or, for intake
-- letters written before 0009, by type and business key. Without these every timeline read the
-- whole table, which grows with every poison record until an operator purges it. Partial: a
-- letter has one or the other. (Built in the migration's transaction, which blocks writes to
-- dead_letters while it runs: the table is small where the engine is healthy.)
CREATE INDEX dead_letters_by_saga ON dead_letters (saga_id) WHERE saga_id IS NOT NULL;
CREATE INDEX dead_letters_by_key ON dead_letters (saga_type, business_key) WHERE saga_id IS NULL;
