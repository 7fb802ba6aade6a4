"""The lean wire path of the agent's paho client against bytes as a broker sends them.

The socket is a stand-in that returns at most ``chunk`` bytes per recv: a real socket cannot be made to split
packets at chosen places, and that split is what the buffered reads must survive.
"""

from __future__ import annotations

import ast
import select
import socket
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.wire import WireClient, varint


class Result(NamedTuple):
    topic: str
    payload: bytes


class ChunkedSocket:
    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.pos, self.chunk = data, 0, chunk

    def recv(self, n: int) -> bytes:
        if self.pos >= len(self.data):
            raise BlockingIOError
        piece = self.data[self.pos:self.pos + min(n, self.chunk)]
        self.pos += len(piece)
        return piece

    def close(self) -> None:
        pass


def publish(topic: bytes, payload: bytes, mid: int, *, qos: int = 1, v5: bool = True, dup: bool = False,
            properties: bytes = b"") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    if v5:
        body += varint(len(properties)) + properties
    body += payload
    return bytes([0x30 | qos << 1 | (0x08 if dup else 0)]) + varint(len(body)) + body


def client(protocol: int) -> tuple[WireClient, list[tuple[Any, ...]], list[int]]:
    c = WireClient(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
    inbound: list[tuple[Any, ...]] = []
    settled: list[int] = []
    c.inbound = lambda *args: inbound.append(args)
    c.settled = settled.append
    return c, inbound, settled


def drain(c: WireClient, data: bytes, chunk: int) -> None:
    c._sock = ChunkedSocket(data, chunk)  # type: ignore[assignment]
    for _ in range(10 * len(data)):
        rc = c.loop_read()
        assert rc == paho.MQTT_ERR_SUCCESS
        sock = c._sock
        assert isinstance(sock, ChunkedSocket)
        if sock.pos >= len(sock.data) and not c.buffered():
            return
    raise AssertionError("the reader made no progress")


@pytest.mark.parametrize("chunk", [1, 7, 300, 65536])
@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_publishes_and_pubacks_survive_any_split(chunk: int, protocol: int) -> None:
    v5 = protocol == paho.MQTTv5
    big = bytes(range(256)) * 80  # 20 kB: its length takes three bytes and spans chunks
    wire = b"".join([
        publish(b"city/a/traffic/1/data", b'{"v": 1}', 7, v5=v5),
        # A user property (0x26) the agent does not use: skipped, the payload still exact.
        publish(b"city/a/noise/2/pcm", big, 8, v5=v5, dup=True,
                properties=b"\x26\x00\x01k\x00\x01v" if v5 else b""),
        publish(b"city/a/x", b"qos0", 0, qos=0, v5=v5),
        bytes([0x40, 2, 0, 9]),  # PUBACK for our result 9
    ])
    c, inbound, settled = client(protocol)
    drain(c, wire, chunk)
    assert inbound == [
        (b"city/a/traffic/1/data", b'{"v": 1}', 1, 7, False),
        (b"city/a/noise/2/pcm", big, 1, 8, True),
        (b"city/a/x", b"qos0", 0, 0, False),
    ]
    assert settled == [9]


def test_a_refused_result_is_settled_and_other_packets_take_pahos_path() -> None:
    c, _, settled = client(paho.MQTTv5)
    suback: list[Any] = []
    c.on_subscribe = lambda *args: suback.append(args[3])
    # PUBACK with reason 0x87 (not authorised), then a SUBACK granting QoS 1 for mid 3.
    drain(c, bytes([0x40, 3, 0, 5, 0x87]) + bytes([0x90, 4, 0, 3, 0, 1]), 65536)
    assert settled == [5]
    assert [int(code.value) for code in suback[0]] == [1]


@pytest.mark.parametrize(("protocol", "header"), [(paho.MQTTv5, b"\x00"), (paho.MQTTv311, b"")])
def test_result_packets_are_well_formed_for_both_protocols(protocol: int, header: bytes) -> None:
    c, _, _ = client(protocol)
    queued: list[bytes] = []
    c._packet_queue = lambda command, packet, mid, qos, info=None: queued.append(bytes(packet))  # type: ignore[method-assign]
    (mid,) = c.send_qos1([Result("edge/gw/results/a", b"{}")])
    assert c.send_qos1([Result("edge/gw/results/a", b"{}")], [mid]) == [mid]  # the resend after a reconnect
    body = (17).to_bytes(2, "big") + b"edge/gw/results/a" + mid.to_bytes(2, "big") + header + b"{}"
    assert queued == [bytes([0x32, len(body)]) + body, bytes([0x3A, len(body)]) + body]
    queued.clear()
    first, second = c.send_qos1([Result("edge/gw/results/a", b"{}"), Result("edge/gw/results/b", b"[]")])
    assert second == first + 1 and len(queued) == 1  # a batch is one queued write


class RecordingSocket(ChunkedSocket):
    """Takes at most ``chunk`` bytes per send, as a full socket buffer would."""

    def __init__(self, chunk: int) -> None:
        super().__init__(b"", chunk)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data[:self.chunk]))
        return len(self.sent[-1])


@pytest.mark.parametrize("chunk", [5, 100_000])
def test_queued_packets_go_out_together_and_whole(chunk: int) -> None:
    c, _, _ = client(paho.MQTTv5)
    sock = RecordingSocket(chunk)
    c._sock = sock  # type: ignore[assignment]
    c.on_socket_register_write = lambda *args: None  # as on the event loop: written on the next turn
    expected = b""
    for mid in range(1, 6):
        c.ack(mid, 1)  # paho's own PUBACK
        expected += bytes([0x40, 2, 0, mid])
        (sent,) = c.send_qos1([Result("edge/gw/results/a", b"{}")])
        expected += bytes([0x32, 24]) + (17).to_bytes(2, "big") + b"edge/gw/results/a" + sent.to_bytes(2, "big")
        expected += b"\x00{}"
    for _ in range(100):
        if not c.want_write():
            break
        c.loop_write()
    assert b"".join(sock.sent) == expected
    if chunk > len(expected):
        assert len(sock.sent) == 1  # ten packets, one system call


def test_a_commits_acknowledgements_are_one_write_of_pubacks() -> None:
    from agent.config import MqttSettings
    from agent.mqtt import MqttLink

    link = MqttLink(MqttSettings(), client_id="c", agent_id="gw", topic_filters=[("a/#", 1)],
                    on_message=lambda m: None, on_puback=lambda mid: None)
    c = link._client
    queued: list[tuple[int, bytes]] = []
    c._packet_queue = lambda command, packet, mid, qos, info=None: queued.append((command, bytes(packet)))  # type: ignore[method-assign]
    link.ack_many([(1, 1), (300, 1)])
    assert queued == []  # not connected: the broker redelivers, ingress recognises the message
    link.connected.set()
    link.ack_many([(1, 1), (300, 1), (7, 0)])
    assert queued == [(0x40, bytes([0x40, 2, 0, 1, 0x40, 2, 1, 44]))]


def test_the_log_names_the_filters_the_broker_confirmed_and_those_it_refused() -> None:
    # Mosquitto's own ACL file grants every SUBSCRIBE and filters at delivery; a refusal comes from an auth
    # plugin or another broker, so the SUBACK is handed to the callback here.
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
    from structlog.testing import capture_logs

    from agent.config import MqttSettings
    from agent.mqtt import MqttLink

    link = MqttLink(MqttSettings(shared_group="g"), client_id="c", agent_id="gw",
                    topic_filters=[("city/+/traffic/+/data", 1), ("city/+/noise/+/pcm", 1)],
                    on_message=lambda m: None, on_puback=lambda mid: None)
    sent: list[list[Any]] = []

    def subscribe(subscriptions: list[Any]) -> tuple[int, int]:
        sent.append(subscriptions)
        return 0, 17

    link._client.subscribe = subscribe  # type: ignore[method-assign, assignment]
    link._subs.send()
    assert [f for f, _ in sent[0]] == ["$share/g/city/+/traffic/+/data", "$share/g/city/+/noise/+/pcm"]
    with capture_logs() as logs:
        link._subs.on_suback(link._client, None, 17, [ReasonCode(PacketTypes.SUBACK, identifier=1),
                                                    ReasonCode(PacketTypes.SUBACK, "Not authorized")], None)
        link._subs.on_suback(link._client, None, 18, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert [{k: v for k, v in e.items() if k != "logger"} for e in logs] == [
        {"event": "mqtt_subscribe_refused", "log_level": "error", "reasons": ["Not authorized"],
         "filters": ["$share/g/city/+/noise/+/pcm"]},
        {"event": "mqtt_subscribed", "log_level": "info", "filters": ["$share/g/city/+/traffic/+/data"]},
        {"event": "mqtt_subscribed", "log_level": "info", "filters": ["?"]},  # a SUBACK we did not expect
    ]


# ------------------------------------------------------------------ against paho's own encoder and decoder
#
# The packets above are built by hand. These are built by paho itself (a plain paho client publishing and
# acknowledging over a real TCP connection), and what the wire path builds is read back by a plain paho client:
# a paho release whose packets or whose internals differ from what wire.py assumes fails here.

CONNACK = {paho.MQTTv5: bytes([0x20, 3, 0, 0, 0]), paho.MQTTv311: bytes([0x20, 2, 0, 0])}


def split_packets(data: bytes) -> list[bytes]:
    packets, pos = [], 0
    while pos < len(data):
        length = shift = 0
        i = pos + 1
        while True:
            length |= (data[i] & 0x7F) << shift
            shift += 7
            i += 1
            if data[i - 1] < 0x80:
                break
        packets.append(data[pos:i + length])
        pos = i + length
    return packets


class BrokerEnd:
    """The broker's end of a real TCP connection to a paho client: what the client wrote, and bytes to it."""

    def __init__(self, client: paho.Client, protocol: int) -> None:
        server = socket.create_server(("127.0.0.1", 0))
        self.client = client
        client.connect("127.0.0.1", server.getsockname()[1])
        self.conn, _ = server.accept()
        server.close()
        connect = self.written()
        assert [p[0] for p in connect] == [0x10]
        self.send(CONNACK[protocol])
        assert self.client.is_connected()

    def written(self) -> list[bytes]:
        while self.client.want_write():
            assert self.client.loop_write() == paho.MQTT_ERR_SUCCESS
        data = b""
        while select.select([self.conn], [], [], 0.05)[0]:
            chunk = self.conn.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        return split_packets(data)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)
        for _ in range(1000):
            if not select.select([self.client.socket()], [], [], 0.05)[0] and not (
                    isinstance(self.client, WireClient) and self.client.buffered()):
                return
            assert self.client.loop_read() == paho.MQTT_ERR_SUCCESS
        raise AssertionError("the client did not read what was sent")

    def close(self) -> None:
        self.conn.close()
        self.client.socket().close()  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk", [1, 5, 65536])
@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_packets_encoded_by_paho_reach_the_wire_path_intact(chunk: int, protocol: int) -> None:
    v5 = protocol == paho.MQTTv5
    device = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
    end = BrokerEnd(device, protocol)
    props = None
    if v5:  # properties the wire path skips without reading them
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("k", "v"), ("site", "aarhus")]
        props.MessageExpiryInterval = 60
        props.ContentType = "application/json"
        props.CorrelationData = b"\x00\x01"
    big = bytes(range(256)) * 80  # 20 kB: the remaining length takes three bytes
    first = device.publish("city/a/traffic/1/data", b'{"v": 1}', qos=1, properties=props)
    second = device.publish("city/a/noise/2/pcm", big, qos=1)
    device.publish("city/a/x", b"qos0", qos=0, properties=props)
    retained = device.publish("city/ä/retained", b"", qos=1, retain=True)  # UTF-8 topic, empty payload
    device.ack(9, 1)  # paho's PUBACK (for our result 9)
    packets = end.written()
    end.close()
    assert [p[0] & 0xF0 for p in packets] == [0x30, 0x30, 0x30, 0x30, 0x40]
    # A SUBACK between them, with the reason codes and properties paho packs, takes paho's own path.
    codes = [ReasonCode(PacketTypes.SUBACK, identifier=1), ReasonCode(PacketTypes.SUBACK, "Not authorized")]
    body = (3).to_bytes(2, "big") + (Properties(PacketTypes.SUBACK).pack() if v5 else b"")  # type: ignore[no-untyped-call]
    body += b"".join(bytes(code.pack()) for code in codes) if v5 else bytes([1, 0x80])
    suback = bytes([0x90]) + varint(len(body)) + body

    c, inbound, settled = client(protocol)
    granted: list[Any] = []
    c.on_subscribe = lambda *args: granted.append([int(code.value) for code in args[3]])
    drain(c, b"".join(packets[:2]) + suback + b"".join(packets[2:]), chunk)
    assert inbound == [
        (b"city/a/traffic/1/data", b'{"v": 1}', 1, first.mid, False),
        (b"city/a/noise/2/pcm", big, 1, second.mid, False),
        (b"city/a/x", b"qos0", 0, 0, False),
        ("city/ä/retained".encode(), b"", 1, retained.mid, False),
    ]
    assert settled == [9]
    assert granted == [[1, 0x87 if v5 else 0x80]]


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_what_the_wire_path_writes_is_what_paho_reads_and_writes(protocol: int) -> None:
    agent = WireClient(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
    end = BrokerEnd(agent, protocol)
    big = bytes(range(256)) * 80
    mids = agent.send_qos1([Result("edge/gw/results/city/ä/1", b'{"x":1}'), Result("edge/gw/results/b", big)])
    agent.send_qos1([Result("edge/gw/results/b", b"[]")], [mids[1]])  # a resend after a reconnect: DUP
    agent.send_pubacks([7, 300])
    agent.ack(7, 1)  # paho's own PUBACKs, to compare
    agent.ack(300, 1)
    packets = end.written()
    end.close()
    assert packets[3:5] == packets[5:7]  # our PUBACKs are paho's, byte for byte

    consumer = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
    received: list[tuple[Any, ...]] = []
    consumer.on_message = lambda _c, _u, m: received.append((m.topic, m.payload, m.qos, m.mid, m.dup, m.retain))
    end = BrokerEnd(consumer, protocol)
    end.send(b"".join(packets[:3]))
    end.close()
    assert received == [
        ("edge/gw/results/city/ä/1", b'{"x":1}', 1, mids[0], False, False),
        ("edge/gw/results/b", big, 1, mids[1], False, False),
        ("edge/gw/results/b", b"[]", 1, mids[1], True, False),
    ]


def test_pahos_private_names_are_used_in_wire_py_only_and_paho_still_has_them() -> None:
    from agent.mqtt import wire

    root = Path(wire.__file__).resolve().parents[1]
    tree = ast.parse(Path(wire.__file__).read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}  # overrides
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    instance, message = paho.Client(CallbackAPIVersion.VERSION2), paho.MQTTMessage()
    source = Path(paho.__file__).read_text()  # _OutPacket is a TypedDict paho defines for type checkers only
    of_paho = {name for name in names if name.startswith("_") and not name.startswith("__")
               and (any(hasattr(owner, name) for owner in (instance, message, paho)) or f"class {name}(" in source)}
    # The list in wire.py is the whole truth, and this paho still has every name on it.
    assert of_paho == wire.PAHO_PRIVATE_NAMES

    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == Path(wire.__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in wire.PAHO_PRIVATE_NAMES
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}: .{node.attr}")
    assert offenders == []
