-- Which workers are up and consuming: written when a worker's consumer gets its partitions.
CREATE TABLE workers (
    worker     text        PRIMARY KEY,
    kind       text        NOT NULL,
    pid        integer     NOT NULL,
    ready_at   timestamptz NOT NULL,
    stopped_at timestamptz
);
