"""Shared pytest fixtures: real MQTT brokers on 127.0.0.1.

Broker fixtures (function-scoped: a fresh broker per test, started in a few ms and stopped
cleanly; implementation in ``tests/support/brokers.py``). Each yields an object with
``.name`` ("amqtt"/"mosquitto"), ``.host``, ``.port``, ``.tls`` (bool), ``.ca_pem_path``
(str or None), ``.ssl_context()`` (a client context trusting the broker's CA, None for plain
TCP) and ``.collect(topic, qos=1) -> Collector``:

    amqtt_broker          amqtt in a background thread, plain TCP
    amqtt_tls_broker      amqtt, TLS (server cert from a trustme CA)
    mosquitto_broker      mosquitto subprocess, plain TCP (skipped when not installed)
    mosquitto_tls_broker  mosquitto subprocess, TLS
    broker                parametrized over amqtt and mosquitto, TLS on
    plain_broker          parametrized over amqtt and mosquitto, plain TCP
    mqtt_certs            session-scoped CertFiles(ca_pem, cert_pem, key_pem)

``Collector`` (a raw paho subscriber, subscribed when ``collect`` returns)::

    with broker.collect("KeeperLogger") as col:
        ...publish 10 messages...
        msgs = col.wait_for(10, timeout=5)   # list of (topic, payload bytes)

mosquitto is looked up on PATH and in /usr/sbin; without it, mosquitto tests skip with a
reason — unless ``KEEPER_TASK_REQUIRE_TOOLS=1`` is set (``.ci/run`` sets it after installing
the Debian packages): then any test skipped because a tool is missing (mosquitto, curl) fails
instead, wherever the skip comes from, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.brokers import (
    AmqttBroker,
    BrokerBase,
    CertFiles,
    MosquittoBroker,
    find_mosquitto,
    make_ca_files,
)

_NO_MOSQUITTO = "mosquitto binary not found on PATH or in /usr/sbin (apt-get install mosquitto)"


_MISSING_TOOL = ("mosquitto", "curl", "not installed", "not found")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With KEEPER_TASK_REQUIRE_TOOLS=1, a skip for a missing tool is a failure."""
    report = yield
    if report.skipped and os.environ.get("KEEPER_TASK_REQUIRE_TOOLS") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else "")
        if any(word in reason for word in _MISSING_TOOL):
            report.outcome = "failed"
            report.longrepr = f"{reason} (KEEPER_TASK_REQUIRE_TOOLS=1: install it, do not skip)"
    return report


@pytest.fixture(scope="session")
def mqtt_certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, as PEM files."""
    return make_ca_files(tmp_path_factory.mktemp("mqtt-certs"))


def _start(kind: str, certs: CertFiles | None) -> BrokerBase:
    if kind == "mosquitto":
        if find_mosquitto() is None:
            pytest.skip(_NO_MOSQUITTO)
        return MosquittoBroker(certs=certs).start()
    return AmqttBroker(certs=certs).start()


def _broker(kind: str, certs: CertFiles | None) -> Iterator[BrokerBase]:
    b = _start(kind, certs)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def amqtt_broker() -> Iterator[BrokerBase]:
    """amqtt on a free port, plain TCP."""
    yield from _broker("amqtt", None)


@pytest.fixture
def amqtt_tls_broker(mqtt_certs: CertFiles) -> Iterator[BrokerBase]:
    """amqtt on a free port, TLS."""
    yield from _broker("amqtt", mqtt_certs)


@pytest.fixture
def mosquitto_broker() -> Iterator[BrokerBase]:
    """mosquitto on a free port, plain TCP."""
    yield from _broker("mosquitto", None)


@pytest.fixture
def mosquitto_tls_broker(mqtt_certs: CertFiles) -> Iterator[BrokerBase]:
    """mosquitto on a free port, TLS."""
    yield from _broker("mosquitto", mqtt_certs)


_KINDS = ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]


@pytest.fixture(params=_KINDS)
def broker(request: pytest.FixtureRequest, mqtt_certs: CertFiles) -> Iterator[BrokerBase]:
    """Each real broker in turn, TLS on."""
    yield from _broker(request.param, mqtt_certs)


@pytest.fixture(params=_KINDS)
def plain_broker(request: pytest.FixtureRequest) -> Iterator[BrokerBase]:
    """Each real broker in turn, plain TCP."""
    yield from _broker(request.param, None)
