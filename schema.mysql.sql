-- big-market schema for MySQL (>= 8.0) and MariaDB (>= 10.6), version 1.
--
-- One database per shard, named as the original's db-router names them: big_market_01,
-- big_market_02, ... The tables `task` and `user_award_record_000` ... keep the original's names,
-- columns, types and keys exactly, so the Java service's own statements keep working on the same
-- databases; the columns big-market adds come after them, each with a default, so an insert that
-- does not name them (the original's) still works. Times in the original's columns are
-- datetimes in the session time zone, as the original writes them with now(); big-market's own
-- columns hold epoch milliseconds.
--
-- `big-market init --store mysql://...` creates the databases and whatever of this is missing;
-- statements after the "@split-table" marker run once per table index with "000" replaced.
-- The schema version is kept in shard_meta; a database with another version or layout is refused.

-- Which layout this database belongs to, the schema version, and the task sequence counter.
-- Exactly one row. next_seq is bumped, under the row's lock, in the transaction that inserts
-- tasks, so committed tasks carry gap-free sequence numbers across every process.
CREATE TABLE IF NOT EXISTS shard_meta (
    id             tinyint unsigned NOT NULL,
    schema_version int unsigned     NOT NULL,
    db_idx         int unsigned     NOT NULL,
    db_count       int unsigned     NOT NULL,
    tb_count       int unsigned     NOT NULL,
    next_seq       bigint unsigned  NOT NULL DEFAULT 1,
    create_time    datetime         NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The outbox: the original's columns, then ours.
CREATE TABLE IF NOT EXISTS task (
    id              bigint unsigned NOT NULL AUTO_INCREMENT,
    user_id         varchar(32)     NOT NULL,
    topic           varchar(32)     NOT NULL,
    message_id      varchar(11)     NOT NULL,
    message         varchar(512)    NOT NULL,
    state           varchar(16)     NOT NULL DEFAULT 'create',  -- create, completed, fail; ours adds dead
    create_time     datetime        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    update_time     datetime        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    seq             bigint unsigned NULL     DEFAULT NULL,       -- per-shard, gap-free; NULL for a task the original wrote
    attempts        int unsigned    NOT NULL DEFAULT 0,
    next_attempt_at bigint          NOT NULL DEFAULT 0,          -- due time (epoch ms); while claimed, the lease expiry
    claimed_by      varchar(64)     NULL     DEFAULT NULL,
    last_error      varchar(512)    NULL     DEFAULT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_message_id (message_id),
    KEY idx_state (state),
    KEY idx_update_time (update_time),
    UNIQUE KEY uq_task_seq (seq),
    KEY idx_task_due (next_attempt_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The consumer's log: one row per message handled.
CREATE TABLE IF NOT EXISTS delivery (
    message_id   varchar(11)     NOT NULL,
    seq          bigint unsigned NOT NULL DEFAULT 0,  -- 0 for a message without one (the original's)
    order_id     varchar(12)     NOT NULL,
    receipts     int unsigned    NOT NULL DEFAULT 1,
    delivered_at bigint          NOT NULL,
    PRIMARY KEY (message_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- @split-table
-- Award records of the users routed to this table: the original's table, unchanged.
CREATE TABLE IF NOT EXISTS user_award_record_000 (
    id          bigint unsigned NOT NULL AUTO_INCREMENT,
    user_id     varchar(32)     NOT NULL,
    activity_id bigint          NOT NULL,
    strategy_id bigint          NOT NULL,
    order_id    varchar(12)     NOT NULL,
    award_id    int             NOT NULL,
    award_title varchar(128)    NOT NULL,
    award_time  datetime        NOT NULL,
    award_state varchar(16)     NOT NULL DEFAULT 'create',
    create_time datetime        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    update_time datetime        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    UNIQUE KEY uq_order_id (order_id),
    KEY idx_user_id (user_id),
    KEY idx_activity_id (activity_id),
    KEY idx_strategy_id (strategy_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
