-- big-market shard schema, version 2 (version 1 files are upgraded when opened: the
-- compaction watermark and the delivery log's sequence index are added).
--
-- One SQLite file per database: data/big_market_01.db, data/big_market_02.db, ...
-- Tables keep the original MySQL system's names and columns; times are epoch milliseconds.
-- The store applies this file in one transaction when it creates a shard and records the
-- version in PRAGMA user_version. Statements after the "@split-table" marker are applied once
-- per table index, with "000" replaced by that index (user_award_record_000 ... _NNN).

-- Which layout this file belongs to, and the task sequence counter. Exactly one row.
-- next_seq is bumped in the same transaction that inserts a task, so committed tasks carry
-- gap-free sequence numbers (a rolled-back write leaves no hole).
-- compacted_seq is the compaction watermark: every sequence number up to it was committed,
-- delivered and its task completed, and their task and delivery rows were folded away (a
-- delivery row received more than once is kept, so redeliveries stay visible).
CREATE TABLE shard_meta (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    db_idx        INTEGER NOT NULL,          -- 1-based database index of this file
    db_count      INTEGER NOT NULL,          -- layout the file was created with
    tb_count      INTEGER NOT NULL,
    next_seq      INTEGER NOT NULL DEFAULT 1,
    create_time   INTEGER NOT NULL,
    compacted_seq INTEGER NOT NULL DEFAULT 0
);

-- The outbox: one row per message to send, written in the same transaction as its award.
CREATE TABLE task (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id         TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,      -- shard (2 digits) + seq (9 digits): cannot collide
    message         TEXT    NOT NULL,      -- the JSON body
    state           TEXT    NOT NULL DEFAULT 'create'
                    CHECK (state IN ('create', 'completed', 'fail', 'dead')),
    seq             INTEGER NOT NULL,      -- per-shard, gap-free among committed tasks
    attempts        INTEGER NOT NULL DEFAULT 0,  -- refused publishes (outages do not count)
    next_attempt_at INTEGER NOT NULL,      -- due time; while claimed_by is set, the lease expiry
    claimed_by      TEXT,                  -- owner of the claim (process id), NULL when free
    last_error      TEXT,
    create_time     INTEGER NOT NULL,
    update_time     INTEGER NOT NULL
);
-- The message id is unique, as in the original (uq_message_id).
CREATE UNIQUE INDEX uq_message_id ON task (message_id);
-- Sequence numbers are unique per shard; the audit walks them in order.
CREATE UNIQUE INDEX uq_task_seq ON task (seq);
-- The scanner's claim query: due tasks that are not completed or dead, oldest due first.
CREATE INDEX idx_task_due ON task (next_attempt_at) WHERE state IN ('create', 'fail');
-- No index on state or update_time: every index is one more page written by every commit, and
-- only rare reads (status counts, the retention purge) would use them; those scan.

-- The consumer's log: one row per message handled, so a redelivery is recognised in the same
-- transaction that would deliver it (receipts counts how often it arrived).
CREATE TABLE delivery (
    message_id   TEXT    PRIMARY KEY,
    seq          INTEGER NOT NULL,
    order_id     TEXT    NOT NULL,
    receipts     INTEGER NOT NULL DEFAULT 1,
    delivered_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Compaction walks and folds the log by sequence number.
CREATE INDEX idx_delivery_seq ON delivery (seq);

-- @split-table
-- Award records of the users routed to this table.
CREATE TABLE user_award_record_000 (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     TEXT    NOT NULL,
    activity_id INTEGER NOT NULL,
    strategy_id INTEGER NOT NULL,
    order_id    TEXT    NOT NULL,          -- the idempotency key
    award_id    INTEGER NOT NULL,
    award_title TEXT    NOT NULL,
    award_time  INTEGER NOT NULL,
    award_state TEXT    NOT NULL DEFAULT 'create' CHECK (award_state IN ('create', 'completed')),
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL
);
-- A repeated order id is refused (uq_order_id in the original).
CREATE UNIQUE INDEX uq_order_id_000 ON user_award_record_000 (order_id);
CREATE INDEX idx_user_id_000 ON user_award_record_000 (user_id);
CREATE INDEX idx_activity_id_000 ON user_award_record_000 (activity_id);
CREATE INDEX idx_strategy_id_000 ON user_award_record_000 (strategy_id);
