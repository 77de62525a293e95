"""One tree for every failure ai-sysadmin raises on purpose.

Each exception class of ``gateway/`` and ``layers/`` derives from :class:`AiSysadminError`
(a unit test walks both packages to keep it so), most of them through one of three
categories. The classes stay in their modules (``from layers.config import ConfigError``
keeps working); this module only gives them a common root and the attributes the two
mappers read: ``gateway/errors.py`` (:func:`gateway.errors.openai_error`) for HTTP and
``gateway/cli/__init__.py`` (``main``) for the command line, each in one place::

    AiSysadminError                    the root; alone: a failure of ours (500, logged)
    ├── UserError                      configuration or input the operator must fix
    │   ├── ConfigError                  layers/config.py        (one line per problem)
    │   ├── CliError                     gateway/cli/common.py
    │   ├── BindRefused                  gateway/server.py
    │   ├── ScenarioError                layers/quality/scenarios.py
    │   ├── RuleError                    layers/prefilter.py
    │   ├── ExamplesError                layers/pipeline/examples.py
    │   ├── ModelError                   layers/provision/model.py
    │   ├── EngineError                  layers/provision/engine.py
    │   ├── ChannelError                 layers/notify/channels.py
    │   └── HostKeyError (ValueError)    layers/store/hosts.py
    ├── Unavailable                    something we depend on cannot answer now
    │   ├── LayerError                   layers/client.py        (status per instance)
    │   │   ├── LayerTimeout
    │   │   ├── LayerBrokeOff            (an answer cut off after its head)
    │   │   └── StructuredOutputError
    │   │       └── RefusedOutput        layers/pipeline/validate.py
    │   ├── StoreError                   layers/store/base.py    (503, Retry-After)
    │   │   └── StoreUnavailable
    │   ├── HTTPError                    layers/http.py          (and its transport tree)
    │   ├── GatewayError                 layers/gateway_client.py
    │   ├── MemoryUnavailable            layers/memory.py
    │   ├── UnitsError                   layers/collectors/units.py
    │   ├── EngineFault                  layers/provision/verify.py
    │   ├── AgentError                   layers/agent.py
    │   └── EvalError                    layers/quality/runner.py
    ├── Refused                        an operation that policy or state does not allow
    │   ├── Refusal                      layers/actions/catalog.py
    │   │   └── HelperRefused            layers/actions/helper.py
    │   ├── ActionError                  layers/actions/service.py (status by its code)
    │   └── SupervisorError              layers/supervisor.py    (409 over HTTP)
    └── OpenAIError                    gateway/errors.py: an HTTP answer, already shaped

HTTP: an error whose class sets ``http_status`` is answered with that status, its
``openai_code`` and its message (``http_message``, ``{}`` being ``str(exc)``); every other
one is a 500 ``internal_error`` whose message stays in the log, because it may name
paths, addresses or be a bug's. LayerError, ActionError and OpenAIError carry their
status per instance and are read as such. CLI: every AiSysadminError ends the command
as one line on stderr, ``ai-sysadmin: <message>``, and exits with ``exit_code`` (1 for
all of them today: scripts and the NixOS units check for 1).

Only failures meant to cross a module boundary belong here; a private signal inside one
module (``layers/http.py``'s ``_StaleConnection``) stays a plain Exception.
"""

from __future__ import annotations

from typing import ClassVar


class AiSysadminError(Exception):
    """The root of every failure ai-sysadmin raises on purpose (see the module docstring).

    The class attributes are what the mappers read; subclasses override them.
    """

    # HTTP (gateway/errors.py). None: not an answer for an API client — a 500
    # ``internal_error`` with a generic message, the exception in the log.
    http_status: ClassVar[int | None] = None
    # OpenAI's ``error.code``; the ``error.type`` follows from the status.
    openai_code: ClassVar[str | None] = None
    # The client's ``error.message``; ``{}`` is ``str(exc)``.
    http_message: ClassVar[str] = "{}"
    # Seconds for a ``Retry-After`` header, where retrying later is the remedy.
    http_retry_after: ClassVar[int | None] = None
    # For a status of 500 and above: the gateway's log gets one warning line
    # ``<http_log>: <exc>`` instead of a traceback (an expected failure, not a bug).
    http_log: ClassVar[str | None] = None

    # CLI (gateway/cli): the exit status after the one line on stderr.
    exit_code: ClassVar[int] = 1


class UserError(AiSysadminError):
    """Configuration or input the operator must fix (a file, a flag, a model path).

    Over HTTP it stays a 500 whose message is only logged: the API client cannot fix
    the server's configuration, and the message may name its files.
    """


class Unavailable(AiSysadminError):
    """Something we depend on cannot answer now (a layer, the store, the gateway,
    systemctl, ChromaDB); retrying later may succeed."""


class Refused(AiSysadminError):
    """An operation that policy or the current state does not allow (an action outside
    the catalog, a decision on an action no longer pending, a layer control refused)."""
