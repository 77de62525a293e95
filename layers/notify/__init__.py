"""Notifications: facts the admin must see (incidents opened, escalated, resolved;
approvals pending; actions that ran, failed or were refused) delivered through apprise
URLs (ntfy, e-mail, Matrix, Gotify, Slack, Discord, Telegram, JSON webhooks).

- ``facts``: what a notification says, as data, written to the store's outbox in the
  transaction of the fact that causes it (importable by the store: no other imports);
- ``channels``: channels from the configuration, their URLs (secrets) and redaction;
- ``routing``: which channel gets which notification (kinds, severity, quiet hours,
  de-duplication, rate limits);
- ``messages``: the title and body a channel receives;
- ``send``: one apprise delivery, in a worker thread with a timeout;
- ``worker``: the gateway's delivery loop (route, claim, send, retry with backoff).

See docs/notifications.md.
"""
