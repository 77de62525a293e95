"""Notification channels: the configured apprise URLs, what each wants, and redaction.

A channel URL is a secret (tokens, passwords, private topics live in it), so it is read
from the configuration or a file (``url_file``, ``notify.channels_file``: systemd
credentials on NixOS), kept out of every log line and API answer, and shown only as its
``target``: scheme and host (and port) for schemes whose host is a server
(``json://10.0.0.5:8080``, ``mailtos://smtp.example.org``), the scheme alone for schemes
whose "host" is itself a token or a topic (``tgram://…``, ``slack://…``, ``ntfy://…``).

``SecretFilter`` scrubs every channel's secret parts from the log records of the
libraries a delivery runs through (urllib3 logs request paths, which may hold a token);
apprise's own logger is silenced (its debug lines print URLs), and what it says about a
failure comes back, redacted, as the delivery's one-line cause.
"""

from __future__ import annotations

import functools
import logging
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from layers.config import NOTIFY_KINDS, NotifyChannelConfig, NotifyConfig
from layers.errors import UserError
from layers.events import SEVERITY_RANK

# Schemes whose host part names a server (not a token or topic).
HOST_SCHEMES = frozenset({
    "json", "jsons", "xml", "xmls", "form", "forms", "mailto", "mailtos", "gotify", "gotifys",
    "matrix", "matrixs", "ntfy", "ntfys", "mmost", "mmosts", "rocket", "rockets", "apprise",
    "apprises", "mqtt", "mqtts", "nctalk", "nctalks", "ncloud", "nclouds", "signal",
    "signals", "kodi", "kodis", "emby", "embys",
})
_URL = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:?#@\[\]]*)(?::(?P<port>[0-9]{1,5}))?(?=[/?#]|$)"
)
_NAMED_LINE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,31})\s*=\s*(?P<url>\S+://\S*)$")
_HOSTNAME = re.compile(r"^(localhost|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)$")
# Parts of a URL too common to be secrets (redacting them would garble log lines).
_NOT_SECRET = frozenset({
    "http", "https", "true", "false", "yes", "no", "post", "json", "html", "text",
    "markdown", "starttls", "ssl", "none", "localhost", "format", "mode", "from", "to",
    "method", "image", "overflow", "upstream",
})
MIN_SECRET = 4


class ChannelError(UserError):
    """A channel that cannot be used; the message is one line and holds no secret."""


def target(url: str) -> str:
    """What may be shown of ``url``: ``scheme://host[:port]`` where the host is a server,
    ``scheme://…`` otherwise."""
    m = _URL.match(url.strip())
    if m is None:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme.lower()}://…" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) \
            else "(unparseable URL)"
    scheme, host, port = m["scheme"].lower(), m["host"], m["port"]
    if scheme not in HOST_SCHEMES or not _HOSTNAME.match(host):
        return f"{scheme}://…"
    return f"{scheme}://{host.lower()}" + (f":{port}" if port else "")


def secret_parts(url: str) -> set[str]:
    """What of ``url`` must never appear in a log line: the URL, its user information
    (user, password), the host where it is not shown (a token or topic), the whole path
    and query as written and decoded, each query value, and each path segment that looks
    like a token (a digit or capital in it, or 12+ characters). Short plain words of a
    path (``hooks``, ``alerts``) are not scrubbed on their own (they would garble every
    line), but never appear without the rest of the path around them."""
    shown = target(url).partition("://")[2].lower()
    visible = set() if shown in ("", "…") else {shown, *shown.rsplit(":", 1)}
    rest = url.split("://", 1)[1] if "://" in url else url
    parts = {url, rest}
    userinfo, at, after = rest.partition("@")
    if at and "/" not in userinfo:
        parts.add(userinfo)
        parts.update(userinfo.split(":", 1))
        rest = after
    m = re.match(r"(?P<host>\[[^\]]*\]|[^/?#]*)(?P<path>[^?#]*)(?:\?(?P<query>[^#]*))?", rest)
    assert m is not None  # the pattern matches any string
    host = m["host"].split(":", 1)[0] if not m["host"].startswith("[") else m["host"]
    if host.lower() not in visible:
        parts.add(m["host"])
        parts.update(m["host"].split(":"))
    path, query = m["path"], m["query"] or ""
    parts.update({path, path.lstrip("/"), query})
    for value in re.split(r"[&;]", query):
        parts.add(value.partition("=")[2])
    for seg in path.split("/"):
        if re.search(r"[0-9A-Z]", seg) or len(seg) >= 12:
            parts.add(seg)
    decoded = {urllib.parse.unquote(p) for p in parts} | {urllib.parse.unquote_plus(p)
                                                          for p in parts}
    return {p for p in parts | decoded
            if len(p) >= MIN_SECRET and p.lower() not in _NOT_SECRET and p.lower() not in visible}


def _token_like(s: str) -> bool:
    return bool(re.search(r"[0-9A-Z]", s)) or len(s) >= 12 or not s.isalpha()


@functools.lru_cache(maxsize=64)
def _pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    if not secrets:
        return None

    def alternation(items: Iterable[str]) -> str:
        return "|".join(re.escape(s) for s in sorted(items, key=len, reverse=True))

    tokens = [s for s in secrets if _token_like(s)]
    words = [s for s in secrets if not _token_like(s)]
    # Tokens wherever they appear (``bot<token>/…``); plain words as whole words only, so
    # that a topic "crit" leaves "critical" alone.
    branches = ([f"(?:{alternation(tokens)})"] if tokens else []) + (
        [f"(?<![A-Za-z0-9])(?:{alternation(words)})(?![A-Za-z0-9])"] if words else [])
    return re.compile("|".join(branches))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret piece replaced by ``***``."""
    pattern = _pattern(frozenset(secrets))
    return text if pattern is None else pattern.sub("***", text)


@dataclass(frozen=True)
class Channel:
    """A usable channel: its URL (secret: kept out of ``repr``) and its filters."""

    name: str
    url: str = field(repr=False)
    kinds: frozenset[str]
    min_severity: str
    max_per_hour: int
    quiet_hours: tuple[int, int] | None  # minutes after local midnight: start, end
    quiet_action: str
    enabled: bool = True

    @property
    def target(self) -> str:
        return target(self.url)

    @property
    def min_rank(self) -> int:
        return SEVERITY_RANK[self.min_severity]

    def public(self) -> dict[str, object]:
        """What the API and the CLI show of this channel (no secret)."""
        return {
            "name": self.name, "target": self.target, "enabled": self.enabled,
            "kinds": sorted(self.kinds, key=NOTIFY_KINDS.index), "min_severity": self.min_severity,
            "max_per_hour": self.max_per_hour, "quiet_action": self.quiet_action,
            "quiet_hours": None if self.quiet_hours is None else "-".join(
                f"{m // 60:02d}:{m % 60:02d}" for m in self.quiet_hours),
        }


def parse_quiet_hours(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    start, end = spec.split("-")
    h1, m1 = start.split(":")
    h2, m2 = end.split(":")
    return int(h1) * 60 + int(m1), int(h2) * 60 + int(m2)


def _first_line(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ChannelError(f"{what}: cannot read {path}: {reason}") from None
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ChannelError(f"{what}: {path} holds no URL")


def _channel(cfg: NotifyConfig, name: str, url: str,
             c: NotifyChannelConfig | None = None) -> Channel:
    if "://" not in url:
        raise ChannelError(f"notify channel {name!r}: not a URL (expected scheme://…)")
    pick = (lambda own, default: default if own is None else own)  # noqa: E731
    return Channel(
        name=name, url=url,
        kinds=frozenset(pick(c.kinds if c else None, cfg.kinds)),
        min_severity=pick(c.min_severity if c else None, cfg.min_severity),
        max_per_hour=pick(c.max_per_hour if c else None, cfg.max_per_hour),
        quiet_hours=parse_quiet_hours(pick(c.quiet_hours if c else None, cfg.quiet_hours)),
        quiet_action=pick(c.quiet_action if c else None, cfg.quiet_action),
        enabled=c.enabled if c else True,
    )


def load_channels(cfg: NotifyConfig) -> tuple[list[Channel], list[str]]:
    """The configured channels that could be read, and one line (no secret) for each that
    could not."""
    channels: list[Channel] = []
    problems: list[str] = []
    for c in cfg.channels:
        try:
            url = (c.url.get_secret_value().strip() if c.url is not None else
                   _first_line(c.url_file, f"notify channel {c.name!r}"))  # type: ignore[arg-type]
            channels.append(_channel(cfg, c.name, url, c))
        except ChannelError as exc:
            problems.append(str(exc))
    if cfg.channels_file is not None:
        try:
            lines = cfg.channels_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            problems.append(f"notify.channels_file: cannot read {cfg.channels_file}: {reason}")
            lines = []
        taken = {c.name for c in channels} | {c.name for c in cfg.channels}
        n = 0
        for i, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _NAMED_LINE.match(line)
            if m:
                name, url = m["name"], m["url"]
            else:
                n += 1
                name, url = f"file{n}", line
            if name in taken:
                problems.append(f"notify.channels_file line {i}: channel {name!r} defined twice")
                continue
            taken.add(name)
            try:
                channels.append(_channel(cfg, name, url))
            except ChannelError as exc:
                problems.append(f"notify.channels_file line {i}: {exc}")
    return channels, problems


class SecretFilter(logging.Filter):
    """Replaces channel secrets in log records by ``***`` (attached to the loggers of the
    libraries a delivery runs through)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: frozenset[str] = frozenset()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is dropped, not shown raw
            return False
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


SECRET_FILTER = SecretFilter()
_LIBRARY_LOGGERS = ("urllib3", "urllib3.connectionpool", "urllib3.connection",
                    "urllib3.response", "urllib3.poolmanager", "urllib3.util.retry",
                    "requests", "requests_oauthlib", "oauthlib", "markdown")


def guard_logs(channels: Iterable[Channel]) -> None:
    """Keep these channels' secrets out of every log: silence apprise's own logger (its
    debug lines print URLs; the delivery reports its cause instead) and scrub the
    libraries it uses."""
    SECRET_FILTER.secrets = SECRET_FILTER.secrets.union(*(secret_parts(c.url) for c in channels))
    apprise_log = logging.getLogger("apprise")
    if SECRET_FILTER in apprise_log.filters:
        return  # installed by an earlier call: loggers are per process
    apprise_log.propagate = False
    apprise_log.addHandler(logging.NullHandler())
    # Its debug lines carry the underlying cause of a failure (errno, SMTP reply) into
    # the delivery's result; scrubbed too, should anything ever attach a handler here.
    apprise_log.setLevel(logging.DEBUG)
    apprise_log.addFilter(SECRET_FILTER)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).addFilter(SECRET_FILTER)
