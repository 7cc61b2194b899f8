"""The PostgreSQL store's schema, created and migrated by the library (docs/multihost.md).

``MIGRATIONS`` is an ordered list of ``(version, sql)``; ``{s}`` stands for the quoted
schema name. ``migrate`` applies the ones the database lacks, each in its own transaction
under a transaction-scoped advisory lock (released at commit, so it is safe behind a
transaction pooler such as PgBouncer; the store takes no session-level advisory lock), and
records them in ``{s}.sf_schema_version``. A database whose version is newer than this
library knows is refused (an older library must not write to a newer schema).
"""

from __future__ import annotations

import re

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "check_schema_name", "migration_sql"]

_V1 = r"""
CREATE TABLE {s}.sf_sessions (
    session_id     text PRIMARY KEY,
    writer_run_id  text,                          -- the run holding the writer claim
    revision       bigint NOT NULL DEFAULT 0,     -- bumped by every claim by another run
    superseded_run text,                          -- the run the last claim superseded
    lease_until    timestamptz,                   -- optional lease, on the server's clock
    last_seq       bigint NOT NULL DEFAULT -1,    -- seq of the last line (-1: no line)
    last_entry_id  text,                          -- id of the last entry (parentId default)
    generation     bigint NOT NULL DEFAULT 0,     -- bumped by any UPDATE/DELETE of a line
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {s}.sf_entries (
    session_id      text NOT NULL REFERENCES {s}.sf_sessions ON DELETE CASCADE,
    seq             bigint NOT NULL,              -- 0, 1, 2, ... per session, file order
    line            bytea NOT NULL,               -- the line's exact bytes, no newline
    terminated      boolean NOT NULL DEFAULT true, -- false: an imported last line w/o \n
    entry_id        text,
    entry_type      text,
    role            text NOT NULL
                    CHECK (role IN ('header', 'claimant', 'co-tenant', 'import', 'foreign')),
    writer_run_id   text,
    revision        bigint NOT NULL DEFAULT 0,    -- the claim revision it was written under
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, idempotency_key)
);
CREATE INDEX sf_entries_entry_id ON {s}.sf_entries (session_id, entry_id);

CREATE TABLE {s}.sf_claims (
    session_id     text NOT NULL REFERENCES {s}.sf_sessions ON DELETE CASCADE,
    revision       bigint NOT NULL,
    run_id         text NOT NULL,
    superseded_run text,
    at_seq         bigint NOT NULL,               -- last_seq when the claim committed
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, revision)
);

-- An UPDATE or DELETE of lines (a rewrite, a truncation, by anyone, through any client)
-- bumps the session's rewrite generation: every fence then fails closed.
CREATE FUNCTION {s}.sf_lines_rewritten() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.sf_sessions SET generation = generation + 1, updated_at = now()
     WHERE session_id IN (SELECT DISTINCT session_id FROM old_rows);
    RETURN NULL;
END $$;
CREATE TRIGGER sf_entries_updated AFTER UPDATE ON {s}.sf_entries
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {s}.sf_lines_rewritten();
-- A DELETE also moves the session's end back to its last remaining line (a truncation).
CREATE FUNCTION {s}.sf_lines_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.sf_sessions x SET generation = x.generation + 1, updated_at = now(),
           last_seq = coalesce((SELECT max(e.seq) FROM {s}.sf_entries e
                                 WHERE e.session_id = x.session_id), -1)
     WHERE x.session_id IN (SELECT DISTINCT session_id FROM old_rows);
    RETURN NULL;
END $$;
CREATE TRIGGER sf_entries_deleted AFTER DELETE ON {s}.sf_entries
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {s}.sf_lines_deleted();

-- Claim a session for p_run. A run that holds the claim keeps its revision; a claim by
-- another run bumps it and names the run it superseded. With p_lease (seconds) the claim
-- is a lease on the server's clock, and without p_force it is refused while another run's
-- lease runs. Returns status 'ok' | 'held' | 'missing'.
CREATE FUNCTION {s}.sf_claim(p_session text, p_run text, p_lease double precision,
                             p_force boolean,
                             OUT status text, OUT revision bigint, OUT superseded_run text,
                             OUT writer_run_id text, OUT last_seq bigint,
                             OUT last_entry_id text, OUT generation bigint,
                             OUT lease_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    s {s}.sf_sessions%ROWTYPE;
BEGIN
    SELECT * INTO s FROM {s}.sf_sessions x WHERE x.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        status := 'missing';
        RETURN;
    END IF;
    IF s.writer_run_id IS DISTINCT FROM p_run AND NOT p_force
       AND s.lease_until IS NOT NULL AND s.lease_until > now() THEN
        status := 'held';
        revision := s.revision; writer_run_id := s.writer_run_id;
        lease_until := s.lease_until; last_seq := s.last_seq;
        RETURN;
    END IF;
    IF s.writer_run_id IS DISTINCT FROM p_run THEN
        UPDATE {s}.sf_sessions x
           SET revision = x.revision + 1, superseded_run = x.writer_run_id,
               writer_run_id = p_run, updated_at = now(),
               lease_until = CASE WHEN p_lease IS NULL THEN NULL
                                  ELSE now() + p_lease * interval '1 second' END
         WHERE x.session_id = p_session
        RETURNING * INTO s;
        INSERT INTO {s}.sf_claims (session_id, revision, run_id, superseded_run, at_seq)
        VALUES (p_session, s.revision, p_run, s.superseded_run, s.last_seq);
    ELSIF p_lease IS NOT NULL THEN
        UPDATE {s}.sf_sessions x
           SET lease_until = now() + p_lease * interval '1 second', updated_at = now()
         WHERE x.session_id = p_session
        RETURNING * INTO s;
    END IF;
    status := 'ok';
    revision := s.revision; superseded_run := s.superseded_run;
    writer_run_id := s.writer_run_id; last_seq := s.last_seq;
    last_entry_id := s.last_entry_id; generation := s.generation;
    lease_until := s.lease_until;
END $$;

-- One append, one statement, one transaction: the session row is locked, the idempotency
-- key looked up (a retry returns the line that landed: 'duplicate'), a claimant's claim
-- checked ('superseded': nothing is written), an optimistic expected last seq checked
-- ('moved': the caller rebuilds the line on the new last entry), then the line inserted
-- and the session row advanced ('ok').
CREATE FUNCTION {s}.sf_append(p_session text, p_line bytea, p_entry_id text,
                              p_entry_type text, p_role text, p_run text,
                              p_revision bigint, p_key text, p_expect_seq bigint,
                              OUT status text, OUT seq bigint, OUT line bytea,
                              OUT entry_id text, OUT writer_run_id text,
                              OUT revision bigint, OUT last_entry_id text)
LANGUAGE plpgsql AS $$
DECLARE
    s {s}.sf_sessions%ROWTYPE;
    hit {s}.sf_entries%ROWTYPE;
BEGIN
    SELECT * INTO s FROM {s}.sf_sessions x WHERE x.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        status := 'missing';
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT * INTO hit FROM {s}.sf_entries e
         WHERE e.session_id = p_session AND e.idempotency_key = p_key;
        IF FOUND THEN
            status := 'duplicate'; seq := hit.seq; line := hit.line;
            entry_id := hit.entry_id; writer_run_id := hit.writer_run_id;
            revision := hit.revision;
            RETURN;
        END IF;
    END IF;
    IF p_role = 'claimant' AND (s.writer_run_id IS DISTINCT FROM p_run
                                OR s.revision <> p_revision) THEN
        status := 'superseded'; writer_run_id := s.writer_run_id; revision := s.revision;
        RETURN;
    END IF;
    IF p_expect_seq IS NOT NULL AND s.last_seq <> p_expect_seq THEN
        status := 'moved'; seq := s.last_seq; last_entry_id := s.last_entry_id;
        RETURN;
    END IF;
    IF p_entry_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM {s}.sf_entries e
         WHERE e.session_id = p_session AND e.entry_id = p_entry_id) THEN
        status := 'id-taken'; entry_id := p_entry_id;
        RETURN;
    END IF;
    seq := s.last_seq + 1;
    INSERT INTO {s}.sf_entries (session_id, seq, line, entry_id, entry_type, role,
                                writer_run_id, revision, idempotency_key)
    VALUES (p_session, seq, p_line, p_entry_id, p_entry_type, p_role, p_run,
            CASE WHEN p_role = 'claimant' THEN p_revision ELSE s.revision END, p_key);
    UPDATE {s}.sf_sessions x
       SET last_seq = seq, last_entry_id = COALESCE(p_entry_id, x.last_entry_id),
           updated_at = now()
     WHERE x.session_id = p_session;
    status := 'ok'; entry_id := p_entry_id; writer_run_id := s.writer_run_id;
    revision := s.revision;
END $$;
"""

# Version 2. Never edit a released version in place: a database at version N runs the
# migrations above N, each once.
#
# - sf_append checks a claimant's claim BEFORE its idempotency key, as the file store does:
#   a superseded run's retry of an append that landed is refused like any other write of
#   that run (a co-tenant has no claim to check: its key is looked up first, as before).
# - Leases that live while the writer is active: sf_claim records the lease's length
#   (lease_seconds); every append of the claimant renews it on the server's clock;
#   sf_renew renews it without writing (a check without an append), sf_release ends it
#   (the run's attempt is over: the next claimant need not wait).
# - A DELETE of lines also moves last_entry_id back to the last remaining entry (the
#   default parent of the next append), as it moves last_seq back.
# - sf_claims records each claim's lease length (NULL: no lease).
_V2 = r"""
ALTER TABLE {s}.sf_sessions ADD COLUMN lease_seconds double precision;
ALTER TABLE {s}.sf_claims ADD COLUMN lease_seconds double precision;

CREATE OR REPLACE FUNCTION {s}.sf_lines_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.sf_sessions x SET generation = x.generation + 1, updated_at = now(),
           last_seq = coalesce((SELECT max(e.seq) FROM {s}.sf_entries e
                                 WHERE e.session_id = x.session_id), -1),
           last_entry_id = (SELECT e.entry_id FROM {s}.sf_entries e
                             WHERE e.session_id = x.session_id AND e.entry_id IS NOT NULL
                             ORDER BY e.seq DESC LIMIT 1)
     WHERE x.session_id IN (SELECT DISTINCT session_id FROM old_rows);
    RETURN NULL;
END $$;

-- As version 1, and: the lease's length is kept (lease_seconds) so that the claimant's
-- appends renew it; a claim by the same run without p_lease keeps the lease it has.
CREATE OR REPLACE FUNCTION {s}.sf_claim(p_session text, p_run text, p_lease double precision,
                             p_force boolean,
                             OUT status text, OUT revision bigint, OUT superseded_run text,
                             OUT writer_run_id text, OUT last_seq bigint,
                             OUT last_entry_id text, OUT generation bigint,
                             OUT lease_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    s {s}.sf_sessions%ROWTYPE;
BEGIN
    SELECT * INTO s FROM {s}.sf_sessions x WHERE x.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        status := 'missing';
        RETURN;
    END IF;
    IF s.writer_run_id IS DISTINCT FROM p_run AND NOT p_force
       AND s.lease_until IS NOT NULL AND s.lease_until > now() THEN
        status := 'held';
        revision := s.revision; writer_run_id := s.writer_run_id;
        lease_until := s.lease_until; last_seq := s.last_seq;
        RETURN;
    END IF;
    IF s.writer_run_id IS DISTINCT FROM p_run THEN
        UPDATE {s}.sf_sessions x
           SET revision = x.revision + 1, superseded_run = x.writer_run_id,
               writer_run_id = p_run, updated_at = now(), lease_seconds = p_lease,
               lease_until = CASE WHEN p_lease IS NULL THEN NULL
                                  ELSE now() + p_lease * interval '1 second' END
         WHERE x.session_id = p_session
        RETURNING * INTO s;
        INSERT INTO {s}.sf_claims (session_id, revision, run_id, superseded_run, at_seq,
                                   lease_seconds)
        VALUES (p_session, s.revision, p_run, s.superseded_run, s.last_seq, p_lease);
    ELSIF p_lease IS NOT NULL THEN
        UPDATE {s}.sf_sessions x
           SET lease_until = now() + p_lease * interval '1 second', lease_seconds = p_lease,
               updated_at = now()
         WHERE x.session_id = p_session
        RETURNING * INTO s;
    END IF;
    status := 'ok';
    revision := s.revision; superseded_run := s.superseded_run;
    writer_run_id := s.writer_run_id; last_seq := s.last_seq;
    last_entry_id := s.last_entry_id; generation := s.generation;
    lease_until := s.lease_until;
END $$;

-- One append, one statement, one transaction: the session row is locked; for a claimant,
-- its claim is checked first ('superseded': nothing is written, a retry of an append that
-- landed included); then the idempotency key is looked up (a retry returns the line that
-- landed: 'duplicate'); an optimistic expected last seq checked ('moved': the caller
-- rebuilds the line on the new last entry); then the line is inserted, the session row
-- advanced and a claimant's lease renewed ('ok').
CREATE OR REPLACE FUNCTION {s}.sf_append(p_session text, p_line bytea, p_entry_id text,
                              p_entry_type text, p_role text, p_run text,
                              p_revision bigint, p_key text, p_expect_seq bigint,
                              OUT status text, OUT seq bigint, OUT line bytea,
                              OUT entry_id text, OUT writer_run_id text,
                              OUT revision bigint, OUT last_entry_id text)
LANGUAGE plpgsql AS $$
DECLARE
    s {s}.sf_sessions%ROWTYPE;
    hit {s}.sf_entries%ROWTYPE;
BEGIN
    SELECT * INTO s FROM {s}.sf_sessions x WHERE x.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        status := 'missing';
        RETURN;
    END IF;
    IF p_role = 'claimant' AND (s.writer_run_id IS DISTINCT FROM p_run
                                OR s.revision <> p_revision) THEN
        status := 'superseded'; writer_run_id := s.writer_run_id; revision := s.revision;
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT * INTO hit FROM {s}.sf_entries e
         WHERE e.session_id = p_session AND e.idempotency_key = p_key;
        IF FOUND THEN
            status := 'duplicate'; seq := hit.seq; line := hit.line;
            entry_id := hit.entry_id; writer_run_id := hit.writer_run_id;
            revision := hit.revision;
            RETURN;
        END IF;
    END IF;
    IF p_expect_seq IS NOT NULL AND s.last_seq <> p_expect_seq THEN
        status := 'moved'; seq := s.last_seq; last_entry_id := s.last_entry_id;
        RETURN;
    END IF;
    IF p_entry_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM {s}.sf_entries e
         WHERE e.session_id = p_session AND e.entry_id = p_entry_id) THEN
        status := 'id-taken'; entry_id := p_entry_id;
        RETURN;
    END IF;
    seq := s.last_seq + 1;
    INSERT INTO {s}.sf_entries (session_id, seq, line, entry_id, entry_type, role,
                                writer_run_id, revision, idempotency_key)
    VALUES (p_session, seq, p_line, p_entry_id, p_entry_type, p_role, p_run,
            CASE WHEN p_role = 'claimant' THEN p_revision ELSE s.revision END, p_key);
    UPDATE {s}.sf_sessions x
       SET last_seq = seq, last_entry_id = COALESCE(p_entry_id, x.last_entry_id),
           updated_at = now(),
           lease_until = CASE WHEN p_role = 'claimant' AND x.lease_seconds IS NOT NULL
                              THEN now() + x.lease_seconds * interval '1 second'
                              ELSE x.lease_until END
     WHERE x.session_id = p_session;
    status := 'ok'; entry_id := p_entry_id; writer_run_id := s.writer_run_id;
    revision := s.revision;
END $$;

-- Renew the lease of a claim without writing: 'ok' (lease_until moved to now() + its
-- length), 'no-lease' (the claim has none), 'superseded' (another run or revision holds
-- the session: nothing changed), 'missing'.
CREATE FUNCTION {s}.sf_renew(p_session text, p_run text, p_revision bigint,
                             OUT status text, OUT writer_run_id text, OUT revision bigint,
                             OUT lease_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    s {s}.sf_sessions%ROWTYPE;
BEGIN
    SELECT * INTO s FROM {s}.sf_sessions x WHERE x.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        status := 'missing';
        RETURN;
    END IF;
    writer_run_id := s.writer_run_id; revision := s.revision;
    IF s.writer_run_id IS DISTINCT FROM p_run OR s.revision <> p_revision THEN
        status := 'superseded';
        RETURN;
    END IF;
    IF s.lease_seconds IS NULL THEN
        status := 'no-lease';
        RETURN;
    END IF;
    UPDATE {s}.sf_sessions x
       SET lease_until = now() + x.lease_seconds * interval '1 second', updated_at = now()
     WHERE x.session_id = p_session
    RETURNING x.lease_until INTO lease_until;
    status := 'ok';
END $$;

-- End the lease of a claim (the run is done with the session: the next claimant need not
-- wait for it to expire). The claim itself stays: it is superseded by the next one.
-- 'ok', 'superseded' (not this run's claim any more: nothing changed) or 'missing'.
CREATE FUNCTION {s}.sf_release(p_session text, p_run text, p_revision bigint,
                               OUT status text)
LANGUAGE plpgsql AS $$
DECLARE
    s {s}.sf_sessions%ROWTYPE;
BEGIN
    SELECT * INTO s FROM {s}.sf_sessions x WHERE x.session_id = p_session FOR UPDATE;
    IF NOT FOUND THEN
        status := 'missing';
        RETURN;
    END IF;
    IF s.writer_run_id IS DISTINCT FROM p_run OR s.revision <> p_revision THEN
        status := 'superseded';
        RETURN;
    END IF;
    UPDATE {s}.sf_sessions x SET lease_until = NULL, updated_at = now()
     WHERE x.session_id = p_session;
    status := 'ok';
END $$;
"""

_V3 = r"""
-- A TRUNCATE of the lines fires no row trigger: without this one, every session row would
-- still name its old end, and a fence would read "nothing new" over an emptied session.
-- It moves every session's end back to nothing and bumps its rewrite generation (every
-- fence fails closed, reason "truncated"; local copies are made again).
CREATE FUNCTION {s}.sf_lines_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.sf_sessions SET generation = generation + 1, updated_at = now(),
           last_seq = -1, last_entry_id = NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER sf_entries_truncated AFTER TRUNCATE ON {s}.sf_entries
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.sf_lines_truncated();
"""

MIGRATIONS: list[tuple[int, str]] = [(1, _V1), (2, _V2), (3, _V3)]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


def check_schema_name(name: str) -> str:
    """The schema name, checked: lower-case letters, digits and ``_`` (it is spliced into
    SQL as an identifier, so nothing else is accepted)."""
    if not _NAME.match(name):
        raise ValueError(f"schema name must match [a-z_][a-z0-9_]*, not {name!r}")
    return name


def migration_sql(sql: str, schema: str) -> str:
    return sql.replace("{s}", '"' + check_schema_name(schema) + '"')
