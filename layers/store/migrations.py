"""Versioned schema migrations, one list for both backends.

Each migration is SQL with a few dialect tokens (``{serial}``, ``{float}``, ``{bigint}``)
filled in per backend. Applied versions are recorded in ``schema_migrations``; a store
opens only after every migration has run, each in its own transaction. Never edit a
released migration: append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

DIALECT_TOKENS: dict[str, dict[str, str]] = {
    "sqlite": {
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "float": "REAL",
        "bigint": "INTEGER",
    },
    "postgres": {
        "serial": "BIGSERIAL PRIMARY KEY",
        "float": "DOUBLE PRECISION",
        "bigint": "BIGINT",
    },
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    # Statements only one backend runs (e.g. the idempotency table PostgreSQL needs because
    # a TimescaleDB hypertable cannot carry a unique index on the event id alone).
    sqlite_only: tuple[str, ...] = ()
    postgres_only: tuple[str, ...] = ()

    def sql(self, dialect: str) -> list[str]:
        tokens = DIALECT_TOKENS[dialect]
        extra = self.sqlite_only if dialect == "sqlite" else self.postgres_only
        return [s.format(**tokens) for s in (*self.statements, *extra)]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events, verdicts, incidents, timeline, cursors",
        (
            """CREATE TABLE events (
                seq {serial},
                id TEXT NOT NULL,
                host TEXT NOT NULL,
                source TEXT NOT NULL,
                unit TEXT,
                priority INTEGER NOT NULL,
                message TEXT NOT NULL,
                fields TEXT NOT NULL,
                ts {float} NOT NULL,
                received_at {float} NOT NULL,
                state TEXT NOT NULL,
                fingerprint TEXT,
                rule TEXT
            )""",
            "CREATE INDEX events_state_seq ON events (state, seq)",
            "CREATE INDEX events_received ON events (received_at)",
            "CREATE INDEX events_fingerprint ON events (fingerprint)",
            """CREATE TABLE verdicts (
                seq {serial},
                event_id TEXT NOT NULL UNIQUE,
                incident_id TEXT,
                host TEXT NOT NULL,
                unit TEXT,
                fingerprint TEXT NOT NULL,
                rule TEXT,
                anomaly INTEGER NOT NULL,
                severity TEXT NOT NULL,
                severity_rank INTEGER NOT NULL,
                category TEXT NOT NULL,
                summary TEXT NOT NULL,
                message TEXT NOT NULL,
                unreviewed INTEGER NOT NULL,
                created_at {float} NOT NULL
            )""",
            "CREATE INDEX verdicts_incident ON verdicts (incident_id)",
            "CREATE INDEX verdicts_created ON verdicts (created_at)",
            """CREATE TABLE incidents (
                id TEXT PRIMARY KEY,
                key TEXT NOT NULL,
                host TEXT NOT NULL,
                unit TEXT,
                fingerprint TEXT NOT NULL,
                title TEXT NOT NULL,
                status TEXT NOT NULL,
                stage TEXT NOT NULL,
                severity TEXT NOT NULL,
                verdict_count INTEGER NOT NULL,
                opened_at {float} NOT NULL,
                updated_at {float} NOT NULL,
                resolved_at {float},
                review TEXT,
                decision TEXT
            )""",
            "CREATE INDEX incidents_key ON incidents (key, status)",
            "CREATE INDEX incidents_stage ON incidents (stage, updated_at)",
            """CREATE TABLE timeline (
                seq {serial},
                incident_id TEXT NOT NULL,
                ts {float} NOT NULL,
                kind TEXT NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX timeline_incident ON timeline (incident_id, seq)",
            """CREATE TABLE cursors (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL,
                updated_at {float} NOT NULL
            )""",
        ),
        sqlite_only=("CREATE UNIQUE INDEX events_id ON events (id)",),
        postgres_only=("CREATE TABLE event_ids (id TEXT PRIMARY KEY, seq {bigint})",),
    ),
    Migration(
        2,
        "action stage: proposals/actions and the append-only audit log",
        (
            """CREATE TABLE proposals (
                id TEXT PRIMARY KEY,
                incident_id TEXT,
                action TEXT NOT NULL,
                params TEXT NOT NULL,
                params_key TEXT NOT NULL,
                unit TEXT,
                rationale TEXT NOT NULL,
                status TEXT NOT NULL,
                risk TEXT,
                dry_run TEXT,
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL,
                decided_at {float},
                expires_at {float},
                decided_by TEXT,
                exit_code INTEGER,
                output TEXT,
                duration {float},
                merge_count INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX proposals_status ON proposals (status, created_at)",
            "CREATE INDEX proposals_incident ON proposals (incident_id)",
            "CREATE INDEX proposals_dedup ON proposals (action, params_key, status)",
            """CREATE TABLE audit (
                seq {serial},
                ts {float} NOT NULL,
                actor TEXT NOT NULL,
                kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX audit_kind ON audit (kind, seq)",
            "CREATE INDEX audit_subject ON audit (subject, seq)",
        ),
    ),
    Migration(
        3,
        "incidents: the category and rule they were opened by (facts, not model text)",
        (
            "ALTER TABLE incidents ADD COLUMN category TEXT",
            "ALTER TABLE incidents ADD COLUMN rule TEXT",
        ),
    ),
    Migration(
        4,
        "notification outbox: notifications and their per-channel deliveries",
        (
            # One row per fact worth telling (incident opened, approval pending, …), written
            # in the transaction of the fact itself (or keyed so a retry cannot double it).
            """CREATE TABLE notifications (
                seq {serial},
                id TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                severity TEXT NOT NULL,
                severity_rank INTEGER NOT NULL,
                detail TEXT NOT NULL,
                created_at {float} NOT NULL,
                routed_at {float}
            )""",
            "CREATE INDEX notifications_unrouted ON notifications (routed_at, seq)",
            "CREATE INDEX notifications_created ON notifications (created_at)",
            # One row per notification and channel: the delivery worker's queue. ``state``:
            # pending (due at ``next_at``; a claimed one is leased until then) → delivered |
            # failed (gave up); dropped (duplicate, rate limit, quiet hours) with ``reason``.
            """CREATE TABLE notification_deliveries (
                seq {serial},
                notification_id TEXT NOT NULL,
                channel TEXT NOT NULL,
                dedupe_key TEXT NOT NULL,
                severity_rank INTEGER NOT NULL,
                state TEXT NOT NULL,
                reason TEXT,
                suppressed INTEGER NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_at {float} NOT NULL,
                last_error TEXT,
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL,
                delivered_at {float},
                UNIQUE (notification_id, channel)
            )""",
            "CREATE INDEX deliveries_due ON notification_deliveries (state, next_at)",
            "CREATE INDEX deliveries_channel ON notification_deliveries (channel, created_at)",
            "CREATE INDEX deliveries_dedupe ON notification_deliveries (channel, dedupe_key, created_at)",
        ),
    ),
    Migration(
        5,
        "fleet: host keys (hashed); the host an action is for, and its agent's lease",
        (
            # A host key is shown once; only its SHA-256 is kept (keys are 32 random bytes:
            # a fast hash is enough, there is nothing to brute-force).
            """CREATE TABLE hosts (
                name TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                created_at {float} NOT NULL,
                revoked_at {float},
                last_seen {float}
            )""",
            # NULL: this machine (the single-machine default); else the host whose agent
            # runs it. An agent holds a claimed action until ``lease_until``.
            "ALTER TABLE proposals ADD COLUMN host TEXT",
            "ALTER TABLE proposals ADD COLUMN lease_owner TEXT",
            "ALTER TABLE proposals ADD COLUMN lease_until {float}",
            "CREATE INDEX proposals_dispatch ON proposals (host, status, created_at)",
        ),
    ),
    Migration(
        6,
        "work leases: several gateways on one store share events and incident stages",
        (
            # Who took an event (in ``lease_state``) or an incident's stage (in
            # ``lease_stage``) until when: a lease of another worker that has not run out
            # is skipped; one for an earlier state/stage, or run out, is free to take.
            "ALTER TABLE events ADD COLUMN lease_owner TEXT",
            "ALTER TABLE events ADD COLUMN lease_state TEXT",
            "ALTER TABLE events ADD COLUMN lease_until {float}",
            "ALTER TABLE incidents ADD COLUMN lease_owner TEXT",
            "ALTER TABLE incidents ADD COLUMN lease_stage TEXT",
            "ALTER TABLE incidents ADD COLUMN lease_until {float}",
        ),
    ),
    Migration(
        7,
        "verdicts: the labelled example a verdict follows",
        ("ALTER TABLE verdicts ADD COLUMN example TEXT",),
    ),
)
