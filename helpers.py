"""Talk to the CI daemons from a script, in a line or two.

From a checkout of commit-ci (this file sits beside the ``commit_ci`` package)::

    import helpers

    helpers.communicate("127.0.0.1", 8888, "status")
    # 'OK queued=0 running=1 runners=2 idle=1'
    helpers.communicate("127.0.0.1", 8888, "dispatch " + full_commit_id)
    # 'OK job=queued new=1'
    helpers.query("127.0.0.1", 8888, "lookup 3f786850e387")["summary"]["status"]
    # 'passed'

A request is one line as docs/protocol.md writes it; it is checked before it is sent
(a typo gets a ProtocolError, not a round trip). Where the daemons are authenticated,
give the file of the shared secret or of an operator key (as ``ci-ctl key add NAME
--role operator`` prints it) as ``secret_file``, or set CI_SECRET in the environment;
``tls_ca`` connects with TLS. Every wait is bounded: OSError when the daemon cannot be
reached or does not answer in time. Installed (``pip install .``), the same comes from
the package: ``commit_ci.client.communicate`` with ``commit_ci.protocol.request``.
"""

from __future__ import annotations

import json

from commit_ci import client, protocol, security
from commit_ci.wire import IO_TIMEOUT_S, ProtocolError

__all__ = ["communicate", "query", "ProtocolError"]


def communicate(host: str, port: int, request: str, secret_file: str | None = None, tls_ca: str | None = None,
                timeout: float = IO_TIMEOUT_S) -> str:
    """Send one request line to the daemon at ``host:port``; its reply as text.

    The reply is its header line (``OK ...``, ``BUSY`` or ``ERR <reason>``), followed,
    for the queries that answer with JSON, by the JSON document on the next line.
    ProtocolError if ``request`` is not a request the protocol knows.
    """
    answer = _ask(host, port, request, secret_file, tls_ca, timeout)
    text = protocol.encode_header(answer, protocol.REPLIES)
    if "json" in answer.sections:
        text += "\n" + answer.sections["json"].decode("utf-8")
    return text


def query(host: str, port: int, request: str, secret_file: str | None = None, tls_ca: str | None = None,
          timeout: float = IO_TIMEOUT_S) -> dict:
    """The JSON answer of a read-only query (``queue``, ``runners``, ``recent``,
    ``lookup <commit>``) as a dict; RuntimeError with the reason if it is refused."""
    answer = _ask(host, port, request, secret_file, tls_ca, timeout)
    if answer.verb != "OK" or "json" not in answer.sections:
        raise RuntimeError("%s: %s" % (request, answer.get("reason") or answer.verb))
    return json.loads(answer.sections["json"])


def _ask(host: str, port: int, line: str, secret_file: str | None, tls_ca: str | None,
         timeout: float) -> protocol.Message:
    message, sections = protocol.decode_header(line.strip().encode("utf-8"), protocol.REQUESTS)
    if sections:
        raise ProtocolError("%s carries sections; send it with commit_ci.client instead" % message.verb)
    key = security.read_key(secret_file)
    settings = security.Security(
        auth=security.Authenticator(key) if key is not None else None,
        client_tls=security.client_tls_context(tls_ca) if tls_ca else None,
    )
    return client.communicate((host, port), message, timeout=timeout, security=settings)
