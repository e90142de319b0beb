-- Who redrove a dead letter, next to when (an operator action's actor: the console token's
-- subject or the CLI's operating system user). Before, the actor travelled only as the
-- `saga-redriven-by` header of the republished record; rows redriven before this read NULL.
ALTER TABLE dead_letters ADD COLUMN redriven_by text;
